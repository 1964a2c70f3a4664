"""Input samples: the LLaVA conversation format (and its JSON / JSONL reader), preference
pairs, and the checks of an image's path and bytes.

A sample is one image (or none) and a conversation of alternating ``human`` / ``gpt``
turns; every ``gpt`` turn is supervised. The ``<image>`` placeholder in a human turn marks
where the image goes. A sample's image is either a file path relative to an image root
(it must stay inside it) or an ImageRef: a cell of a Hugging Face / Parquet data set's
image column, decoded on demand (common/inputs.py reads those data sets and loads every
sample's image: load_image).

Preference pairs (the RLAIF-V layout, JSONL): {"id", "image", "question", "chosen",
"rejected"}; each pair becomes two one-turn samples that differ only in the answer.

Every consumer reads its inputs through common.inputs.read_inputs, which calls the
JSON readers here for .json / .jsonl files.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class SampleError(ValueError):
    """A sample that cannot be used; the message names the sample and the problem."""


@dataclass(frozen=True)
class ImageRef:
    """An image held inside a data set's rows instead of a file: the cell at row `row` of
    column `column` of the data set at `data` (a save_to_disk folder or Parquet file(s),
    split `split`), whose `id_column` holds the owning sample's id. Loaders reopen the data
    set (memory-mapped, once per process), check the id and decode that one cell, so the
    driver never holds the image bytes and only this small reference travels to workers."""

    data: str
    split: str | None
    row: int
    column: str
    id_column: str


def _image_field(image):
    """JSON form of a sample's image field -> str | ImageRef | None."""
    if isinstance(image, dict):
        return ImageRef(**image)
    return image


@dataclass
class Sample:
    id: str
    image: str | ImageRef | None  # a path relative to the image root, a data set cell, or no image
    messages: list[dict]  # [{"role": "user"|"assistant", "content": str}], in order
    meta: dict = field(default_factory=dict)  # extra keys of the record (e.g. "task")

    def __post_init__(self):
        self.image = _image_field(self.image)

    @classmethod
    def from_llava(cls, record: dict, where: str = "") -> "Sample":
        sid = record.get("id")
        if sid is None:
            raise SampleError(f"{where}: record has no 'id' field; every sample needs a unique id")
        sid = str(sid)
        convs = record.get("conversations")
        if not convs:
            raise SampleError(f"sample {sid} ({where}): empty or missing 'conversations'")
        if not isinstance(convs, list) or not all(isinstance(t, dict) for t in convs):
            raise SampleError(f"sample {sid} ({where}): 'conversations' must be a list of {{\"from\", \"value\"}} "
                              f"objects, got {type(convs).__name__}")
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
        if image is not None and not isinstance(image, (str, ImageRef)):
            raise SampleError(f"sample {sid} ({where}): 'image' is {type(image).__name__}, expected one path "
                              "(string) relative to the image root; samples with several images are not supported")
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
        image = asdict(self.image) if isinstance(self.image, ImageRef) else self.image
        return json.dumps({"id": self.id, "image": image, "messages": self.messages, "meta": self.meta})

    @classmethod
    def from_json(cls, text: str) -> "Sample":
        d = json.loads(text)
        return cls(d["id"], d["image"], d["messages"], d.get("meta", {}))


def refuse_or_set_aside(errors: list | None, key: str, e: SampleError) -> None:
    """Strict reading (errors None) raises; otherwise the record is set aside as (key, reason)."""
    if errors is None:
        raise e
    errors.append((key, str(e)))


def _record_key(r, where: str) -> str:
    """A bad record's name in the errors file: its id when it has one, else where it is."""
    return str(r["id"]) if isinstance(r, dict) and r.get("id") is not None else where


def _read_records(path: Path, id_column: str, image_column: str, errors: list | None = None) -> list[tuple[str, dict]]:
    """(where, record) for the records of a .json list or .jsonl file, with the id / image
    keys renamed to "id" / "image" (image_column "" = the records have no image); where is
    "path:N" for the record on line N of a .jsonl file, "path#i" for the i-th (from 0) of a
    .json list.

    errors: None refuses the file at its first bad record (SampleError); a list receives
    (key, reason) for each bad JSONL line (not UTF-8, not JSON, not an object) or record
    without the id key, and the others are returned. A .json file that does not parse is
    refused either way (one document: nothing to keep)."""
    what = "JSON Lines" if path.suffix == ".jsonl" else "JSON"
    if path.suffix == ".jsonl":
        records = []
        for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"  # JSON Lines: a record is named by its (1-based) line, as broken lines are
            try:
                r = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                refuse_or_set_aside(errors, f"{path}:{lineno}", SampleError(
                    f"{path}: line {lineno} is not UTF-8 text ({e}); re-encode the file as UTF-8"))
                continue
            except json.JSONDecodeError as e:
                refuse_or_set_aside(errors, f"{path}:{lineno}",
                                    SampleError(f"{path}: line {lineno} is not valid {what}: {e}"))
                continue
            if not isinstance(r, dict):
                refuse_or_set_aside(errors, f"{path}:{lineno}", SampleError(
                    f"{path}: line {lineno} is a JSON {type(r).__name__}, expected an object (one sample a line)"))
                continue
            records.append((where, r))
    else:
        try:
            loaded = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SampleError(f"{path}: not UTF-8 text ({e}); re-encode the file as UTF-8") from e
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}: not valid {what}: {e}") from e
        if not isinstance(loaded, list):
            raise SampleError(f"{path}: expected a list of JSON objects (one per sample)")
        records = []
        for i, r in enumerate(loaded):
            if isinstance(r, dict):
                records.append((f"{path}#{i}", r))
            else:
                refuse_or_set_aside(errors, f"{path}#{i}", SampleError(
                    f"{path}#{i}: a JSON {type(r).__name__}, expected an object (one per sample)"))
    if (id_column, image_column) == ("id", "image"):
        return records
    out = []
    for where, r in records:
        if id_column not in r:
            refuse_or_set_aside(errors, where, SampleError(
                f"{where}: record has no {id_column!r} key (the id column); its keys are {sorted(r)}: name the id "
                "key with --id-column"))
            continue
        renamed = {k: v for k, v in r.items() if k not in ("id", "image", id_column, image_column)}
        renamed["id"] = r[id_column]
        if image_column and r.get(image_column) is not None:
            renamed["image"] = r[image_column]
        out.append((where, renamed))
    return out


def check_unique_ids(items: list, where: str, what: str = "sample") -> None:
    """Refuse two items (samples or pairs) with the same .id."""
    seen: dict[str, int] = {}
    for i, x in enumerate(items):
        if x.id in seen:
            raise SampleError(f"{where}: {what} id {x.id!r} appears twice (records {seen[x.id]} and {i}); "
                              "ids must be unique (the cache is keyed by them)")
        seen[x.id] = i


def read_llava(path: str | Path, id_column: str = "id", image_column: str = "image",
               errors: list | None = None) -> list[Sample]:
    """Read a LLaVA conversation file (.json list or .jsonl); refuses duplicate ids.

    id_column / image_column: the record keys holding the id and the image path (relative
    to the image root); "" as image_column = no images. errors: None refuses the file at
    its first bad record; a list receives (id or "file#row", reason) per bad record, which
    is left out (the teacher pass quarantines them: pipelines/quarantine.py)."""
    path = Path(path)
    records = _read_records(path, id_column, image_column, errors)
    first = records[0][1] if records else {}
    if records and "conversations" not in first and {"chosen", "rejected"} <= set(first):
        raise SampleError(f"{path}: holds preference pairs (question, chosen, rejected), not LLaVA conversations; "
                          "use it with --records preference (teacher pass) or --objective preference (train)")
    samples = []
    for where, r in records:
        try:
            samples.append(Sample.from_llava(r, where))
        except SampleError as e:
            refuse_or_set_aside(errors, _record_key(r, where), e)
    check_unique_ids(samples, str(path))
    return samples


PAIR_FIELDS = ("id", "question", "chosen", "rejected")


@dataclass
class PreferencePair:
    id: str
    image: str | ImageRef | None  # as Sample.image
    question: str
    chosen: str
    rejected: str

    def __post_init__(self):
        self.image = _image_field(self.image)

    @classmethod
    def from_record(cls, r: dict, where: str) -> "PreferencePair":
        """{"id", "image" (optional), "question", "chosen", "rejected"} -> a pair; refuses
        missing or empty fields."""
        missing = [k for k in PAIR_FIELDS if r.get(k) is None or r.get(k) == ""]
        if missing:
            raise SampleError(f"{where}: preference record lacks {missing}; each needs id, image (optional), "
                              "question, chosen, rejected")
        image = r.get("image")
        if image is not None and not isinstance(image, (str, ImageRef)):
            raise SampleError(f"{where}: 'image' is {type(image).__name__}, expected one path (string)")
        return cls(str(r["id"]), image, str(r["question"]), str(r["chosen"]), str(r["rejected"]))

    def sample(self, which: str) -> Sample:
        """The one-turn conversation with the chosen or the rejected answer."""
        answer = {"chosen": self.chosen, "rejected": self.rejected}[which]
        question = self.question if self.image is None or IMAGE_PLACEHOLDER in self.question \
            else f"{IMAGE_PLACEHOLDER}\n{self.question}"
        return Sample(self.id, self.image, [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}])


def read_preference(path: str | Path, id_column: str = "id", image_column: str = "image",
                    errors: list | None = None) -> list[PreferencePair]:
    """Read preference pairs (JSONL or a JSON list); refuses missing fields and duplicate
    ids. id_column / image_column / errors as in read_llava."""
    path = Path(path)
    pairs = []
    for where, r in _read_records(path, id_column, image_column, errors):
        try:
            pairs.append(PreferencePair.from_record(r, where))
        except SampleError as e:
            refuse_or_set_aside(errors, _record_key(r, where), e)
    check_unique_ids(pairs, str(path), "pair")
    return pairs


@lru_cache(maxsize=16)
def _resolved_root(image_root: str) -> Path:
    return Path(os.path.realpath(image_root))


def resolve_image(image_root: str | Path, rel: str) -> Path:
    """The image's path inside image_root; refuses paths that escape the root: `../`
    components, absolute paths elsewhere, and symlinks inside the root that point out of
    it (the path is resolved, links followed, before the check)."""
    root = _resolved_root(str(image_root))
    p = Path(os.path.realpath(root / rel))
    if not p.is_relative_to(root) or p == root:
        raise SampleError(f"image path {rel!r} escapes the image root {root}; image paths must lie inside "
                          "--image-root (use a root that contains them all)")
    return p


def decode_image(data: bytes, what: str) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) -> RGB image; SampleError naming `what` if
    they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(f"{what}: the image bytes do not decode ({e}); fix or drop that row") from e
