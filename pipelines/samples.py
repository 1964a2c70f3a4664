"""Input samples: the LLaVA conversation format, read from JSON or JSONL.

A sample is one image (or none) and a conversation of alternating ``human`` / ``gpt``
turns; every ``gpt`` turn is supervised. The ``<image>`` placeholder in a human turn marks
where the image goes. Image paths are relative to an image root and must stay inside it.

Preference pairs (the RLAIF-V layout, JSONL): {"id", "image", "question", "chosen",
"rejected"}; each pair becomes two one-turn samples that differ only in the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class SampleError(ValueError):
    """A sample that cannot be used; the message names the sample and the problem."""


@dataclass
class Sample:
    id: str
    image: str | None  # path relative to the image root
    messages: list[dict]  # [{"role": "user"|"assistant", "content": str}], in order
    meta: dict = field(default_factory=dict)  # extra keys of the record (e.g. "task")

    @classmethod
    def from_llava(cls, record: dict, where: str = "") -> "Sample":
        sid = record.get("id")
        if sid is None:
            raise SampleError(f"{where}: record has no 'id' field; every sample needs a unique id")
        sid = str(sid)
        convs = record.get("conversations")
        if not convs:
            raise SampleError(f"sample {sid} ({where}): empty or missing 'conversations'")
        messages = []
        for turn in convs:
            role = _ROLES.get(turn.get("from", ""))
            if role is None:
                raise SampleError(
                    f"sample {sid} ({where}): turn speaker {turn.get('from')!r} is not one of "
                    f"{sorted(_ROLES)}"
                )
            messages.append({"role": role, "content": str(turn.get("value", ""))})
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError(f"sample {sid} ({where}): no assistant ('gpt') turn to supervise")
        n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        image = record.get("image")
        if image is not None and n_placeholders != 1:
            raise SampleError(
                f"sample {sid} ({where}): has an image but {n_placeholders} '{IMAGE_PLACEHOLDER}' "
                "placeholders; put exactly one in the first human turn"
            )
        if image is None and n_placeholders:
            raise SampleError(f"sample {sid} ({where}): '{IMAGE_PLACEHOLDER}' placeholder but no 'image'")
        meta = {k: v for k, v in record.items() if k not in ("id", "image", "conversations")}
        return cls(sid, image, messages, meta)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "image": self.image, "messages": self.messages, "meta": self.meta})

    @classmethod
    def from_json(cls, text: str) -> "Sample":
        d = json.loads(text)
        return cls(d["id"], d["image"], d["messages"], d.get("meta", {}))


def read_llava(path: str | Path) -> list[Sample]:
    """Read a LLaVA conversation file (.json list or .jsonl); refuses duplicate ids."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    samples = [Sample.from_llava(r, f"{path}#{i}") for i, r in enumerate(records)]
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise SampleError(f"{path}: sample id {s.id!r} appears twice; ids must be unique")
        seen.add(s.id)
    return samples


@dataclass
class PreferencePair:
    id: str
    image: str | None
    question: str
    chosen: str
    rejected: str

    def sample(self, which: str) -> Sample:
        """The one-turn conversation with the chosen or the rejected answer."""
        answer = {"chosen": self.chosen, "rejected": self.rejected}[which]
        question = self.question if self.image is None or IMAGE_PLACEHOLDER in self.question \
            else f"{IMAGE_PLACEHOLDER}\n{self.question}"
        return Sample(self.id, self.image, [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}])


def read_preference(path: str | Path) -> list[PreferencePair]:
    """Read preference pairs (JSONL or a JSON list); refuses missing fields and duplicate ids."""
    path = Path(path)
    text = path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    pairs, seen = [], set()
    for i, r in enumerate(records):
        missing = [k for k in ("id", "question", "chosen", "rejected") if not r.get(k)]
        if missing:
            raise SampleError(f"{path}#{i}: preference record lacks {missing}; each needs id, image (optional), "
                              "question, chosen, rejected")
        pid = str(r["id"])
        if pid in seen:
            raise SampleError(f"{path}: pair id {pid!r} appears twice; ids must be unique")
        seen.add(pid)
        pairs.append(PreferencePair(pid, r.get("image"), str(r["question"]), str(r["chosen"]), str(r["rejected"])))
    return pairs


def resolve_image(image_root: str | Path, rel: str) -> Path:
    """The image's path inside image_root; refuses paths that escape the root."""
    root = Path(image_root).resolve()
    p = (root / rel).resolve()
    if root not in p.parents:
        raise SampleError(f"image path {rel!r} escapes the image root {root}")
    return p


def load_image(image_root: str | Path, sample: Sample) -> Image.Image | None:
    if sample.image is None:
        return None
    path = resolve_image(image_root, sample.image)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise SampleError(f"sample {sample.id}: cannot read image {path}: {e}") from e
