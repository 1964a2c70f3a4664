"""Models and processors of both kinds, loaded the same way by every command.

A teacher or student is either **multimodal** (an image-text-to-text model: LLaVA-1.5,
LLaVA-OneVision, Qwen2-VL, ...; its folder holds a processor with an image token and an
image processor) or **text-only** (a causal LM: Llama, Qwen2, SmolLM2, ...; its folder holds
a tokenizer with a chat template). Everything downstream sees one interface:

- ``load_processor(path)``: the folder's processor. A tokenizer-only folder gives a
  :class:`TextProcessor`: the tokenizer, its chat template, ``image_token = None`` and no
  image processor, so ``common.preprocess`` builds the same sequences a plain
  ``tokenizer.apply_chat_template`` would.
- ``is_text_only(processor)``: True for a TextProcessor (no image token).
- ``model_class(config)``: ``AutoModelForImageTextToText`` for configs transformers maps to
  it, else ``AutoModelForCausalLM``; the class every loader (teacher, student, online
  teacher) uses, so a folder is loaded as what it is.

transformers is imported inside the functions: ``common`` is imported by commands that
never load a model.
"""

from __future__ import annotations


class TextProcessor:
    """A text-only model's tokenizer with the attributes of a multimodal processor that
    mmkd reads: ``tokenizer``, ``chat_template``, ``image_token`` (None) and
    ``image_processor`` (None). Saving writes the tokenizer's files (its chat template
    included), so the folder loads back as the same TextProcessor."""

    image_token = None
    image_processor = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names)

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)

    def __repr__(self) -> str:
        return f"TextProcessor({type(self.tokenizer).__name__}, {len(self.tokenizer)} tokens)"


def is_text_only(processor) -> bool:
    """A processor without an image token: text-only samples, no visual terms."""
    return getattr(processor, "image_token", None) is None


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # written with an image processor


def is_multimodal_folder(path: str, trust_remote_code: bool = False) -> bool:
    """Whether a model or processor folder (or Hub id) is multimodal: by its config.json when
    it has one (transformers' mapping), else by its processor files."""
    from pathlib import Path

    from transformers import AutoConfig

    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        return any((folder / name).is_file() for name in PROCESSOR_FILES)
    try:
        return is_multimodal_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    except (OSError, ValueError):  # a Hub processor repo without a model config
        return True


def load_processor(path: str, trust_remote_code: bool = False):
    """The processor of a model or processor folder (or Hub id): transformers' AutoProcessor
    for multimodal folders, a TextProcessor around the tokenizer for text-only ones."""
    from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

    if not is_multimodal_folder(path, trust_remote_code):
        return TextProcessor(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if isinstance(processor, PreTrainedTokenizerBase):  # AutoProcessor's answer when there is no image processor
        return TextProcessor(processor)
    if not hasattr(processor, "tokenizer"):
        raise ValueError(f"{path}: {type(processor).__name__} has no tokenizer; mmkd needs a model's processor "
                         "or tokenizer folder")
    return processor


def length_limit(config, processor) -> int | None:
    """The longest sequence, in tokens, a model of `config` (a transformers config, or its
    number of positions) takes with `processor`: the text model's max_position_embeddings,
    or the tokenizer's model_max_length when that is smaller and real (transformers sets
    ~1e30 when unknown); None when neither says."""
    positions = config if isinstance(config, int) else getattr(config.get_text_config(), "max_position_embeddings",
                                                                None)
    limits = [positions, getattr(getattr(processor, "tokenizer", processor), "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**7]
    return min(limits) if limits else None


def is_multimodal_config(config) -> bool:
    """True for configs of image-text-to-text models (transformers' own mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def model_class(config):
    """The Auto class that loads a checkpoint of this config as what it is."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal_config(config) else AutoModelForCausalLM
