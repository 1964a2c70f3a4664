"""The demo's tokenizer and processor, built offline (no model hub).

A word-level tokenizer over the synthetic data set's closed vocabulary, a LLaVA chat
template, and a CLIP image processor at 64x64: saved as an ordinary Hugging Face processor
folder that ``AutoProcessor.from_pretrained`` loads like a downloaded one.
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


def build_demo_processor(out_dir: str | Path, extra_words: tuple[str, ...] = ()) -> LlavaProcessor:
    """Build and save the demo processor to out_dir; returns it. extra_words: more words for
    the vocabulary (after the demo's; benchmarks that need more ids than the demo's 49)."""
    words = corpus_words() + [w for w in extra_words if w not in set(corpus_words())]
    vocab = {t: i for i, t in enumerate(SPECIAL + words + [":", "?", ".", ","])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE,
    )
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
