"""Tiny checkpoints of the model families mmkd supports, built offline with random weights
and saved as ordinary Hugging Face folders (model + processor + chat template), so tests load
them through the same Auto classes as a downloaded checkpoint.

LLaVA-1.5 (CLIP + MLP projector + Llama, fixed 16 visual tokens), LLaVA-OneVision (SigLIP,
any-resolution tiles + image newline: the visual-token count depends on the image size) and
Qwen2-VL / Qwen2.5-VL (dynamic resolution, 2x2 patch merging, M-RoPE). The OneVision and
Qwen processors need torchvision (their video processors do), like the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmkd.pipelines.demo_data import corpus_words

FAMILIES = ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
WORDS = corpus_words() + [":", "?", ".", ",", "user", "assistant", "system", "\n"]

# Qwen's ChatML layout, over Hugging Face content-list messages.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
          "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")
# LLaVA-OneVision's layout (Qwen2 LLM): the image first, then the text.
ONEVISION = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
             "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(specials: list[str], image_token: str, chat_template: str, **named) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, extra_special_tokens={"image_token": image_token},
                                  chat_template=chat_template, **named)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def tiny_qwen2_vl(out: str | Path, version: str = "2", head_padding: int = 0, seed: int = 0):
    """A Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") with 8-pixel patches, 2x2 merging
    (one visual token per 16x16 pixels), images scaled to 16x16 .. 64x64 pixels."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, "<|image_pad|>", CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    pixels = dict(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                 video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tok, chat_template=CHATML)
    ids = {f"{name}_token_id": tok.convert_tokens_to_ids(t) for name, t in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    text = dict(vocab_size=len(tok) + head_padding, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, tie_word_embeddings=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if version == "2":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, in_chans=3, mlp_ratio=2)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, out_hidden_size=64, window_size=32,
                      fullatt_block_indexes=[1])
        config, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor


def tiny_llava_onevision(out: str | Path, head_padding: int = 0, seed: int = 0):
    """A LLaVA-OneVision: SigLIP at 32x32 (patch 8 -> 16 tokens per tile), any-resolution
    tiling over 32x32..64x64 grids, an image-newline token per row of the unpadded grid."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = _tokenizer(specials, "<image>", ONEVISION, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False) \
        if False else None
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                                   image_grid_pinpoints=grid, do_pad=True)
    processor = LlavaOnevisionProcessor(image_processor=image_processor,
                                        video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
                                        tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
                                        chat_template=ONEVISION)
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=len(tok) + head_padding, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=grid,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor


def tiny_llava(out: str | Path, processor, head_padding: int = 0, seed: int = 0):
    """A LLaVA-1.5 on the demo processor, its output head padded by head_padding rows."""
    from mmkd.student.config import LlavaArch
    from mmkd.student.model import build_llava

    model = build_llava(LlavaArch(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64, text_layers=2,
                                  text_heads=2, text_intermediate=128), processor, seed=seed)
    if head_padding:
        model.resize_token_embeddings(len(processor.tokenizer) + head_padding)
        torch.manual_seed(seed + 1)
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # padded rows get real (non-zero) logits
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor


def build(family: str, out: str | Path, demo_processor=None, head_padding: int = 0, seed: int = 0):
    """(model, processor) of a tiny checkpoint of `family`, saved to out."""
    if family == "llava":
        return tiny_llava(out, demo_processor, head_padding, seed)
    if family == "llava_onevision":
        return tiny_llava_onevision(out, head_padding, seed)
    return tiny_qwen2_vl(out, "2" if family == "qwen2_vl" else "2.5", head_padding, seed)
