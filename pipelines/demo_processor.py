"""The demo's tokenizer and processor, built offline (no model hub).

A word-level tokenizer over the synthetic data set's closed vocabulary, a LLaVA chat
template, and a CLIP image processor at 64x64: saved as an ordinary Hugging Face processor
folder that ``AutoProcessor.from_pretrained`` loads like a downloaded one. The same
vocabulary with a plain-text chat template is a text-only model's tokenizer
(build_text_tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from mmkd.pipelines.demo_data import IMAGE_SIZE, corpus_words

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PATCH_SIZE = 16

# The LLaVA-1.5 conversation layout, over Hugging Face's content-list messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}\n{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
# The same layout for a text-only model, whose messages' content is a plain string.
TEXT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def _tokenizer(extra_words: tuple[str, ...], chat_template: str, **special) -> PreTrainedTokenizerFast:
    words = corpus_words() + [w for w in extra_words if w not in set(corpus_words())]
    vocab = {t: i for i, t in enumerate(SPECIAL + words + [":", "?", ".", ","])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=chat_template, **special)


def build_text_tokenizer(out_dir: str | Path, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Build and save a text-only model's tokenizer (the demo's ids, TEXT_CHAT_TEMPLATE, no
    image token declared) to out_dir; returns it."""
    tokenizer = _tokenizer(extra_words, TEXT_CHAT_TEMPLATE)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_demo_processor(out_dir: str | Path, extra_words: tuple[str, ...] = ()) -> LlavaProcessor:
    """Build and save the demo processor to out_dir; returns it. extra_words: more words for
    the vocabulary (after the demo's; benchmarks that need more ids than the demo's 49)."""
    tokenizer = _tokenizer(extra_words, CHAT_TEMPLATE, extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return processor
