"""Sample -> model inputs: chat template, image-token expansion, image processing, labels.

Both sides of mmkd build sequences with this one function: the teacher pass, and the
student, which rebuilds each sequence from the sample with its own processor and checks it
against the cache (docs/architecture.md, invariant 1). One function means a student with
the teacher's tokenizer and template builds exactly the teacher's sequence.

Model families: the image's visual-token count and its model inputs come from the
processor itself (one call on the image alone), so fixed-resolution LLaVA-1.5, any-resolution
LLaVA-OneVision (count depends on the image size) and Qwen2-VL / Qwen2.5-VL (dynamic
resolution, ``image_grid_thw``) go through the same code. Text-only models (a causal LM's
tokenizer, common.models.TextProcessor) render the messages' plain strings with their chat
template and refuse samples with an image.

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

from mmkd.common.samples import IMAGE_PLACEHOLDER, Sample, SampleError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One sample ready for a forward pass.

    input_ids: int64 [T], image placeholders already expanded to the visual token count.
    labels: int64 [T], the token id at supervised positions and -100 elsewhere (unshifted:
        the logits at t-1 predict labels[t]).
    vision: the image processor's model inputs for this sample's image, keyed by the
        model's argument names; empty without an image. Always "pixel_values" (float32:
        [1, 3, H, W] LLaVA-1.5; [1, patches, 3, H, W] LLaVA-OneVision; [patches, C*t*p*p]
        Qwen2-VL), plus "image_sizes" [1, 2] (OneVision) or "image_grid_thw" [1, 3] and
        "mm_token_type_ids" [1, T] (Qwen2-VL: 1 at image tokens, 0 elsewhere).
    """

    sample_id: str
    input_ids: np.ndarray
    labels: np.ndarray
    vision: dict[str, np.ndarray]


# The image inputs of the supported families' forward(): LLaVA-1.5 pixel_values;
# LLaVA-OneVision + image_sizes; Qwen2-VL / Qwen2.5-VL + image_grid_thw and the per-token
# modality map mm_token_type_ids (M-RoPE positions are computed from it).
VISION_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")


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
    """The conversation through the processor's chat template: content as a list of typed
    parts for multimodal processors (what their templates expect), as the plain string for
    text-only ones (common.models.TextProcessor; what causal-LM templates expect)."""
    if processor.image_token is None:
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        msgs = [{"role": m["role"], "content": to_content_list(m["content"])} for m in messages]
    templater = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    return templater.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def _image_inputs(out) -> dict[str, np.ndarray]:
    vision = {k: np.asarray(out[k]) for k in VISION_KEYS if k in out and k != "mm_token_type_ids"}
    if "pixel_values" in vision:
        vision["pixel_values"] = vision["pixel_values"].astype(np.float32)
    return vision


# (processor id, image size) -> (visual-token count, the processor): sizes for which the image
# processor alone was seen to give the whole processor's image inputs
_IMAGE_ONLY: dict[tuple[int, tuple[int, int]], tuple[int, object]] = {}


def process_image(processor, image: Image.Image) -> tuple[int, dict[str, np.ndarray]]:
    """(visual-token count, model inputs) of one image: the processor expands one image
    placeholder for it, so the count is the family's own (fixed for LLaVA-1.5, size-dependent
    for LLaVA-OneVision and Qwen2-VL). The count depends on the image's size only, so once a
    size has been through the whole processor and its image processor alone gave the same
    inputs, later images of that size go through the image processor only (a third of the
    cost of encoding a demo sample)."""
    key = (id(processor), image.size)
    known = _IMAGE_ONLY.get(key)
    if known is not None:
        return known[0], _image_inputs(processor.image_processor(images=[image], return_tensors="np"))
    out = processor(text=processor.image_token, images=[image], return_tensors="np")
    n = int((out["input_ids"][0] == image_token_id(processor)).sum())
    vision = _image_inputs(out)
    alone = _image_inputs(processor.image_processor(images=[image], return_tensors="np"))
    if alone.keys() == vision.keys() and all(np.array_equal(alone[k], vision[k]) for k in vision):
        _IMAGE_ONLY[key] = (n, processor)  # the processor is kept: its id is not reused meanwhile
    return n, vision


@lru_cache(maxsize=8)
def _image_token_count(processor) -> int:
    return process_image(processor, Image.new("RGB", (32, 32)))[0]


def image_token_count(processor) -> int:
    """How many visual tokens a reference image (32x32, resized by the processor) becomes:
    THE count for fixed-resolution models (LLaVA-1.5); for any-resolution families the count
    varies per image and is checked per sample (student.data.check_alignment). 0 for
    text-only processors."""
    return 0 if processor.image_token is None else _image_token_count(processor)


def image_token_id(processor) -> int | None:
    """The id of the processor's image token; None for text-only processors."""
    if processor.image_token is None:
        return None
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def encode_sample(processor, sample: Sample, image: Image.Image | None, max_length: int) -> Encoded:
    """Build input_ids / labels / vision inputs for one sample (see module docstring).

    Raises SampleError naming the sample when the sequence is longer than max_length or
    no supervised token survives.
    """
    msgs = sample.messages
    if processor.image_token is None and (image is not None or sample.image is not None):
        raise SampleError(f"sample {sample.id} has an image but the model is text-only (its folder has no image "
                          "processor); drop the sample or use a multimodal model")
    n_img, vision = process_image(processor, image) if image is not None else (0, {})
    if processor.image_token is None:
        expand = lambda s: s  # noqa: E731
    else:
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
    if image is not None and "mm_token_type_ids" in processor.model_input_names:
        vision["mm_token_type_ids"] = np.asarray(processor.create_mm_token_type_ids([ids.tolist()]), dtype=np.int64)
    return Encoded(sample.id, ids, labels, vision)


def collate(encoded: list[Encoded], pad_id: int | None) -> dict:
    """Right-pad a list of Encoded into numpy arrays: input_ids, attention_mask, labels
    ([B, T]) and, when every sample has an image, the vision inputs joined along their first
    axis (pixel_values [B, 3, H, W] for LLaVA-1.5; OneVision's [B, patches, 3, H, W] zero-padded
    to the batch's most patches, which image_sizes lets the model ignore; Qwen2-VL's patch rows
    concatenated, delimited by image_grid_thw [B, 3]; per-token maps [B, T] padded with 0)."""
    T = max(len(e.input_ids) for e in encoded)
    B = len(encoded)
    # padding is masked out; tokenizers without a pad token (Llama's, pad_id None) pad with id 0
    input_ids = np.full((B, T), 0 if pad_id is None else pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    has = [bool(e.vision) for e in encoded]
    if any(has) and not all(has):
        raise SampleError("a batch mixes samples with and without images; batch them separately")
    if all(has):
        for key in encoded[0].vision:
            out[key] = _join([e.vision[key] for e in encoded])
    return out


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along axis 0, zero-padding the other axes to the largest size."""
    shape = np.max([a.shape for a in arrays], axis=0)
    if all(a.shape[1:] == tuple(shape[1:]) for a in arrays):
        return np.concatenate(arrays, axis=0)
    padded = []
    for a in arrays:
        p = np.zeros((a.shape[0], *shape[1:]), dtype=a.dtype)
        p[(slice(None),) + tuple(slice(0, n) for n in a.shape[1:])] = a
        padded.append(p)
    return np.concatenate(padded, axis=0)
