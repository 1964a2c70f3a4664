"""Building LLaVA-architecture models from a small typed description, with random weights.

Used for the demo's teacher (trained by mmkd's own trainer) and for students. A model
built here is an ordinary ``LlavaForConditionalGeneration``: saved with ``save_pretrained``
next to its processor, it loads like any downloaded checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)


@dataclass
class LlavaArch:
    """Sizes of a LLaVA-1.5-style model: CLIP vision tower + MLP projector + Llama LLM."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 256
    max_positions: int = 256


def build_llava(arch: LlavaArch, processor, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA sized by `arch`, matching `processor` (vocabulary,
    special tokens, image size, patch size)."""
    tok = processor.tokenizer
    ip = processor.image_processor
    image_size = ip.crop_size["height"] if getattr(ip, "crop_size", None) else ip.size["shortest_edge"]
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_hidden * 4,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=image_size,
        patch_size=processor.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        max_position_embeddings=arch.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(processor.image_token),
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a saved image-text-to-text model (any family transformers' Auto classes know),
    or an MoE student saved by mmkd (student.moe), in eval mode."""
    from mmkd.student.moe import load_student

    return load_student(path, dtype).to(device)


TRAINABLE = ("all", "projector", "llm+projector", "moe")


def projector_parameters(model) -> list[torch.nn.Parameter]:
    """The vision-to-LLM projector's parameters: LLaVA's multi_modal_projector (OneVision's
    too, with its learned image_newline embedding, trained alongside as in LLaVA-NeXT), or
    Qwen2-VL's patch merger (the last block of its vision tower)."""
    inner = model.model
    if hasattr(inner, "multi_modal_projector"):
        params = list(inner.multi_modal_projector.parameters())
        if isinstance(getattr(inner, "image_newline", None), torch.nn.Parameter):
            params.append(inner.image_newline)
        return params
    if hasattr(inner, "visual") and hasattr(inner.visual, "merger"):
        return list(inner.visual.merger.parameters())
    raise ValueError(f"{type(model).__name__}: no known projector module; use trainable 'all'")


def set_trainable(model, which: str) -> int:
    """Freeze all parameters except the stage's (LLaVA-KD / LLaVA-MoD stages); returns the
    number of trainable parameters.

    all: everything. projector: the multimodal projector only (LLaVA-KD DPT, LLaVA-MoD
    adaptor init). llm+projector: the LLM (incl. embeddings and output head) and the
    projector; the vision tower stays frozen (SFT, DFT, mimic dense-to-dense, preference).
    moe: the LLM's FFNs, experts and routers only (mimic dense-to-sparse).
    """
    if which not in TRAINABLE:
        raise ValueError(f"trainable {which!r}: choose one of {TRAINABLE}")
    if which == "moe":
        from mmkd.student.moe import trainable_moe_only

        return trainable_moe_only(model)
    inner = model.model
    params = {"all": list(model.parameters()), "projector": projector_parameters(model),
              "llm+projector": [*inner.language_model.parameters(), *projector_parameters(model),
                                *model.lm_head.parameters()]}[which]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
