"""Building LLaVA-architecture models from a small typed description, with random weights.

Used for the demo's teacher (trained by mmkd's own trainer) and for students. A model
built here is an ordinary ``LlavaForConditionalGeneration``: saved with ``save_pretrained``
next to its processor, it loads like any downloaded checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForImageTextToText,
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
    """Load a saved image-text-to-text model (any family transformers' Auto classes know)."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return model.to(device)
