"""Building students: from a small typed description with random weights, or the way the
seed papers build them.

- ``build_student(arch, processor)``: a LLaVA-1.5-style model sized by ``LlavaArch`` (a
  Llama causal LM of the same text sizes when the processor is text-only), random weights.
  Used for the demo's teacher (trained by mmkd's own trainer) and for students.
- ``compose_llava(student_llm, vision_from, processor)``: LLaVA-KD's and LLaVA-MoD's
  student: a pretrained small LLM (its weights), the teacher's vision tower (its weights,
  copied) and a freshly initialised projector, in the teacher's multimodal architecture
  (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision: the families with a separate projector).

A model built here is an ordinary transformers model: saved with ``save_pretrained`` next to
its processor, it loads like any downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmkd.common.models import is_multimodal_config, is_text_only
from mmkd.common.preprocess import image_token_id
from mmkd.student.config import LlavaArch


def _text_config(arch: LlavaArch, tok) -> LlamaConfig:
    return LlamaConfig(
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


def build_student(arch: LlavaArch, processor, seed: int = 0):
    """A randomly initialised model sized by `arch` that matches `processor`: a LLaVA for a
    multimodal processor (build_llava), a Llama causal LM of arch's text sizes for a
    text-only one."""
    if is_text_only(processor):
        torch.manual_seed(seed)
        return LlamaForCausalLM(_text_config(arch, processor.tokenizer))
    return build_llava(arch, processor, seed)


def build_llava(arch: LlavaArch, processor, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA sized by `arch`, matching `processor` (vocabulary,
    special tokens, image size, patch size)."""
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
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(arch, processor.tokenizer),
        image_token_id=image_token_id(processor),
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


COMPOSABLE = ("llava", "llava_next", "llava_onevision")  # families whose projector is its own module


def _vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of a safetensors checkpoint, named as inside the tower
    (the part after "vision_tower."); only those tensors are read."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights to take the vision tower from")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if "vision_tower." in name:
                    out[name.split("vision_tower.", 1)[1]] = st.get_tensor(name)
    return out


def _load_tower(tower: torch.nn.Module, saved: dict[str, torch.Tensor], where: Path) -> None:
    """Load a checkpoint's vision tower tensors into `tower`, whichever of the two layouts
    they were saved in (published checkpoints: "vision_model.X"; transformers 5: "X")."""
    state = {}
    for key, want in tower.state_dict().items():
        for name in (key, f"vision_model.{key}", key.removeprefix("vision_model.")):
            if name in saved:
                if saved[name].shape != want.shape:
                    raise ValueError(f"{where}: vision tower tensor {name} has shape {tuple(saved[name].shape)}, "
                                     f"the tower built from its config expects {tuple(want.shape)}")
                state[key] = saved[name]
                break
    missing = sorted(set(tower.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks {len(missing)} vision tower tensors (e.g. {missing[:3]}); "
                         "is it the folder of a multimodal model with its weights?")
    tower.load_state_dict(state)


def composition_problem(student_llm: str, vision_from: str, processor) -> tuple[str, str] | None:
    """(setting, why) when compose_llava cannot build from these folders, else None; reads
    their configs only."""
    from transformers import AutoConfig

    t_cfg = AutoConfig.from_pretrained(vision_from)
    if t_cfg.model_type not in COMPOSABLE:
        return "vision_from", (f"{vision_from} is a {t_cfg.model_type} model; the vision tower comes from a model "
                               f"of the families with a separate projector ({', '.join(COMPOSABLE)})")
    l_cfg = AutoConfig.from_pretrained(student_llm)
    if is_multimodal_config(l_cfg):
        return "student_llm", (f"{student_llm} is a multimodal ({l_cfg.model_type}) model; give a text-only causal "
                               "LM (or start from this model with --init-from)")
    wrong = _tokenizer_mismatch(student_llm, processor.tokenizer)
    if wrong:
        return "student_llm", wrong
    img = image_token_id(processor)
    if img is None or img != t_cfg.image_token_id:
        return "processor", (f"its image token id is {img}, {vision_from}'s is {t_cfg.image_token_id}; use the "
                             "processor of the model the vision tower comes from (the teacher's)")
    return None


def _tokenizer_mismatch(student_llm: str, tokenizer) -> str | None:
    """Why the LLM's own tokenizer (when its folder has one) maps tokens to other ids than
    the processor's, else None: its embedding rows would then belong to other tokens."""
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(student_llm)
    except (OSError, ValueError):  # no tokenizer shipped: its rows are taken as the processor's first ids
        return None
    theirs = tokenizer.get_vocab()
    wrong = sorted(t for t, i in own.get_vocab().items() if theirs.get(t) != i)
    if not wrong:
        return None
    return (f"{len(wrong)} of its tokenizer's {len(own)} tokens have other ids in the processor's tokenizer (e.g. "
            f"{wrong[0]!r}); the student LLM must share the teacher's tokenizer (a model of the same family)")


def compose_llava(student_llm: str, vision_from: str, processor, projector_act: str = "gelu", seed: int = 0):
    """The seed papers' student (LLaVA-KD, LLaVA-MoD): the pretrained causal LM at
    `student_llm` (its weights) as the LLM, the vision tower of the multimodal model at
    `vision_from` (its weights, copied; usually the teacher's folder) and a new projector
    (random, seeded; `projector_act` between its two layers), in vision_from's architecture
    (COMPOSABLE families) with its vision settings (feature layer, select strategy, image
    token). The embeddings grow to the processor's tokenizer (the teacher's, whose image
    token the LLM's own tokenizer lacks; new rows are initialised by transformers)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    problem = composition_problem(student_llm, vision_from, processor)
    if problem:
        raise ValueError(f"--{problem[0].replace('_', '-')}: {problem[1]}")
    t_cfg, l_cfg = AutoConfig.from_pretrained(vision_from), AutoConfig.from_pretrained(student_llm)
    config = copy.deepcopy(t_cfg)
    config.text_config = l_cfg
    config.projector_hidden_act = projector_act
    config.tie_word_embeddings = bool(getattr(l_cfg, "tie_word_embeddings", False))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    llm = AutoModelForCausalLM.from_pretrained(student_llm, dtype=torch.float32)
    model.model.language_model.load_state_dict(llm.model.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(llm.lm_head.state_dict())
    _load_tower(model.model.vision_tower, _vision_tensors(Path(vision_from)), Path(vision_from))
    if len(processor.tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(processor.tokenizer))
    return model


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a saved model (an image-text-to-text model of any family transformers' Auto
    classes know, or a text-only causal LM), or an MoE student saved by mmkd (student.moe),
    in eval mode."""
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
    projector; the vision tower stays frozen (SFT, DFT, mimic dense-to-dense, preference);
    all of a text-only model.
    moe: the LLM's FFNs, experts and routers only (mimic dense-to-sparse).
    """
    if which not in TRAINABLE:
        raise ValueError(f"trainable {which!r}: choose one of {TRAINABLE}")
    if which == "moe":
        from mmkd.student.moe import trainable_moe_only

        return trainable_moe_only(model)
    inner = model.model
    if not hasattr(inner, "language_model"):  # a text-only causal LM: the whole model is the LLM
        if which == "projector":
            raise ValueError("trainable 'projector': the student is a text-only model (no projector); use all")
        params = list(model.parameters())
    else:
        params = {"all": lambda: list(model.parameters()), "projector": lambda: projector_parameters(model),
                  "llm+projector": lambda: [*inner.language_model.parameters(), *projector_parameters(model),
                                            *model.lm_head.parameters()]}[which]()
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
