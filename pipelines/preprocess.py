"""Sample -> model inputs: chat template, image-token expansion, image processing, labels.

Both sides of mmkd build sequences with this one function: the teacher pass, and the
student, which rebuilds each sequence from the sample with its own processor and checks it
against the cache (DESIGN invariant 1). One function means a student with the teacher's
tokenizer and template builds exactly the teacher's sequence.

Supervision: every assistant turn is supervised. Its characters are found by rendering
the conversation up to the turn with and without it (the generation prompt included in the
former), which works for any chat template whose renderings extend each other; the tokens
whose first character falls inside such a span get labels, all others get -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from pipelines.samples import IMAGE_PLACEHOLDER, Sample, SampleError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One sample ready for a forward pass.

    input_ids: int64 [T], image placeholders already expanded to the visual token count.
    labels: int64 [T], the token id at supervised positions and -100 elsewhere (unshifted:
        the logits at t-1 predict labels[t]).
    pixel_values: float32 [1, 3, H, W] or None.
    """

    sample_id: str
    input_ids: np.ndarray
    labels: np.ndarray
    pixel_values: np.ndarray | None


def to_content_list(text: str) -> list[dict]:
    """'<image>\\nquestion' -> [{"type": "image"}, {"type": "text", "text": "question"}]:
    the content layout Hugging Face chat templates expect."""
    parts = text.split(IMAGE_PLACEHOLDER)
    content: list[dict] = []
    for i, part in enumerate(parts):
        if i > 0:
            content.append({"type": "image"})
        part = part.strip("\n") if i > 0 or len(parts) > 1 else part
        if part:
            content.append({"type": "text", "text": part})
    return content


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    msgs = [{"role": m["role"], "content": to_content_list(m["content"])} for m in messages]
    templater = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    return templater.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


@lru_cache(maxsize=8)
def _image_token_count(processor) -> int:
    blank = Image.new("RGB", (32, 32))  # the processor resizes it to the model's resolution
    out = processor(text=processor.image_token, images=[blank], return_tensors="np")
    return int((out["input_ids"][0] == image_token_id(processor)).sum())


def image_token_count(processor) -> int:
    """How many visual tokens one image becomes in the LLM's sequence (fixed-resolution
    models: LLaVA-1.5 style)."""
    return _image_token_count(processor)


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def encode_sample(processor, sample: Sample, image: Image.Image | None, max_length: int) -> Encoded:
    """Build input_ids / labels / pixel_values for one sample (see module docstring).

    Raises SampleError naming the sample when the sequence is longer than max_length or
    no supervised token survives.
    """
    msgs = sample.messages
    n_img = image_token_count(processor) if image is not None else 0
    expand = lambda s: s.replace(processor.image_token, processor.image_token * n_img)  # noqa: E731
    full = expand(render(processor, msgs, add_generation_prompt=False))
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = expand(render(processor, msgs[:i], add_generation_prompt=True))
        upto = expand(render(processor, msgs[: i + 1], add_generation_prompt=False))
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise SampleError(
                f"sample {sample.id}: the chat template's renderings do not extend each other, "
                "so assistant turns cannot be located; use a template without history rewriting"
            )
        spans.append((len(prompt), len(upto)))
    tok = processor.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(tok["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in tok["offset_mapping"]], dtype=np.int64)
    supervised = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        supervised |= (starts >= a) & (starts < b)
    supervised[0] = False  # nothing predicts the first token
    if len(ids) > max_length:
        raise SampleError(
            f"sample {sample.id}: {len(ids)} tokens is longer than max_length={max_length}; "
            "raise max_length or drop the sample (truncation would cut supervised tokens)"
        )
    if not supervised.any():
        raise SampleError(f"sample {sample.id}: no supervised token (empty assistant turns?)")
    labels = np.where(supervised, ids, IGNORE_INDEX)
    pixel_values = None
    if image is not None:
        pixel_values = processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
        pixel_values = pixel_values.astype(np.float32)
    return Encoded(sample.id, ids, labels, pixel_values)


def collate(encoded: list[Encoded], pad_id: int) -> dict:
    """Right-pad a list of Encoded into numpy arrays: input_ids, attention_mask, labels
    ([B, T]), pixel_values ([B, 3, H, W], only when every sample has an image)."""
    T = max(len(e.input_ids) for e in encoded)
    B = len(encoded)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    pix = [e.pixel_values for e in encoded]
    if all(p is not None for p in pix):
        out["pixel_values"] = np.concatenate(pix, axis=0)
    elif any(p is not None for p in pix):
        raise SampleError("a batch mixes samples with and without images; batch them separately")
    return out
