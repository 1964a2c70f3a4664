"""Sparse upcycling of a dense LLaVA student into a mixture-of-experts student (LLaVA-MoD).

LLaVA-MoD's first stage turns the dense student into a sparse one: the FFN of some decoder
layers is replaced by ``num_experts`` copies of itself behind a learned top-k router, and
only the FFNs, experts and routers are then trained. The MoE layer is DeepSpeed's
(``deepspeed.moe.layer.MoE``), so the DeepSpeed engine in ``student.train`` sets up its
expert-parallel groups and the ZeRO optimizer treats the expert weights as expert
parameters.

Facts this module relies on (DeepSpeed 0.19.8, checked by tests/test_moe.py):

* ``MoE`` deep-copies the expert it is given into every expert slot, so right after
  upcycling all experts equal the dense FFN but are separate parameters.
* With top-2 gating DeepSpeed renormalises the two gate values to sum to 1, so identical
  experts give exactly the dense output: the upcycled model computes the dense model's
  function (as long as no token is dropped for capacity). With top-1 gating the expert
  output is scaled by the router's top probability, so a top-1 upcycled model is *not*
  equal to the dense one at initialisation.
* With ``ep_size=1`` neither construction nor forward needs torch.distributed or
  ``deepspeed.utils.groups``: the expert-parallel group is only consulted for all-to-all,
  which a single expert-parallel rank skips. ``deepspeed.initialize`` creates the groups
  itself by calling ``MoE.set_deepspeed_parallelism()`` on every MoE layer; calling it here
  as well would make the engine's call fail ("Attempting to override an existing
  ep_group"), so this module deliberately leaves the groups alone.
* DeepSpeed's top-2 gate draws Gumbel noise to pick the second expert in eval mode too
  (``top2_2nd_expert_sampling``), and its top-1 gate drops over-capacity tokens at random
  (``use_rts``) in eval too. :class:`MoEMLP` switches both off outside training, so
  evaluation, generation and save/load round trips are deterministic.
* DeepSpeed's top-1 gate asserts "No. of tokens (batch-size) should be greater than
  min_capacity", so a top-1 model cannot generate (B tokens per decoding step) with
  B < min_capacity. :class:`MoEMLP` caps min_capacity at the token count, which routes
  identically (every expert has room for all the tokens either way).
* DeepSpeed's ``MOELayer`` keeps the last ``l_aux`` (with its graph) as an attribute, which
  makes ``copy.deepcopy`` of the model fail after a training forward ("Only Tensors created
  explicitly by the user (graph leaves) support the deepcopy protocol"). :class:`MoEMLP`
  replaces that attribute with a detached copy and keeps the graph-carrying loss on itself,
  dropping it when deep-copied or pickled.

Saved MoE students are ordinary safetensors folders whose ``config.json`` carries the
:class:`MoEConfig` under ``mmkd_moe``; :func:`load_student` loads dense and MoE students alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from mmkd.student.config import MoEConfig

MOE_CONFIG_KEY = "mmkd_moe"


class MoEMLP(nn.Module):
    """A decoder layer's FFN replaced by DeepSpeed's MoE layer over copies of it.

    forward(x [B, T, d]) -> [B, T, d], like the dense FFN, so the decoder layer is unchanged.
    After each forward, `l_aux` holds the layer's load-balancing loss (with its graph in
    training) and `exp_counts` the tokens routed to each expert.
    """

    def __init__(self, dense_mlp: nn.Module, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE

        ref = next(dense_mlp.parameters())
        self.top2_sampling = cfg.top2_sampling
        self.min_capacity = cfg.min_capacity
        # MoE deep-copies `expert` into every slot (Experts.__init__), so the dense module
        # itself is not kept: each expert is a separate copy of it.
        self.moe = MoE(hidden_size, expert=dense_mlp, num_experts=cfg.num_experts, ep_size=1, k=cfg.top_k,
                       capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                       min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens, use_residual=False,
                       top2_2nd_expert_sampling=cfg.top2_sampling)
        self.moe.to(device=ref.device, dtype=ref.dtype)  # the new router follows the model
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None

    @property
    def gate(self) -> nn.Linear:
        """The router: a bias-free Linear(hidden, num_experts)."""
        return self.moe.deepspeed_moe.gate.wg

    @property
    def experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.moe.deepspeed_moe.gate
        # Random routing choices (GShard's sampled second expert, top-1's random token
        # selection when over capacity) in training only: eval and generation are deterministic.
        gate.top2_2nd_expert_sampling = self.top2_sampling and self.training
        gate.use_rts = self.training
        # DeepSpeed's top-1 gate asserts tokens >= min_capacity, which a decoding step (B
        # tokens) breaks. Below min_capacity tokens every expert has room for all of them
        # either way, so capping min_capacity at the token count routes identically.
        gate.min_capacity = min(self.min_capacity, x.numel() // x.shape[-1])
        out, l_aux, exp_counts = self.moe(x)
        # DeepSpeed keeps l_aux (graph included) on the MOELayer; a detached copy keeps the
        # model deep-copyable. This module's own l_aux is what moe_aux_loss() sums.
        self.moe.deepspeed_moe.l_aux = l_aux.detach()
        self.l_aux = l_aux
        self.exp_counts = exp_counts
        return out

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("l_aux") is not None:
            state["l_aux"] = state["l_aux"].detach()
        return state


def decoder_layers(model) -> nn.ModuleList:
    """The LLM's decoder layers (model.model.language_model.layers for transformers 5 LLaVA)."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        lm = model.get_decoder()
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def moe_layers(model) -> list[tuple[int, MoEMLP]]:
    """(decoder layer index, MoEMLP) of every upcycled layer, in order."""
    return [(i, layer.mlp) for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, MoEMLP)]


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def upcycle(model, cfg: MoEConfig):
    """Replace the FFN of the layers cfg.layer_indices() picks by an MoEMLP whose experts
    are copies of it; record asdict(cfg) as model.config.mmkd_moe. Modifies and returns model."""
    if getattr(model.config, MOE_CONFIG_KEY, None) or moe_layers(model):
        raise ValueError("the model is already a mixture of experts")
    layers = decoder_layers(model)
    chosen = cfg.layer_indices(len(layers))
    if not chosen:
        raise ValueError(f"every={cfg.every} picks none of the {len(layers)} decoder layers")
    hidden = _text_config(model).hidden_size
    for i in chosen:
        layers[i].mlp = MoEMLP(layers[i].mlp, hidden, cfg)
    setattr(model.config, MOE_CONFIG_KEY, asdict(cfg))
    return model


def moe_aux_loss(model) -> torch.Tensor:
    """Sum over MoE layers of the load-balancing loss of the last forward (a 0-d tensor;
    0 when the model has no MoE layer or has not run). Weight it by MoEConfig.aux_weight."""
    losses = [m.l_aux for _, m in moe_layers(model) if m.l_aux is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack([loss.float() for loss in losses]).sum()


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """GShard's auxiliary loss for router_logits [N tokens, E experts]:
    E * sum_e (fraction of tokens whose top-1 expert is e) * (mean router probability of e).

    This is DeepSpeed's l_aux: top1gating and top2gating both count the first choice only
    (top2gating's `mask1`). For top_k > 2 it is DeepSpeed's topkgating l_aux, which counts
    all k choices and divides by k.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got {tuple(router_logits.shape)}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    num_experts = probs.shape[1]
    me = probs.mean(dim=0)
    if top_k <= 2:
        chosen = nn.functional.one_hot(probs.argmax(dim=-1), num_experts).float()
        ce = chosen.mean(dim=0)
        return num_experts * (me * ce).sum()
    mask = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return num_experts * (me * mask.mean(dim=0)).sum() / top_k


def moe_param_groups(model, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters, with the expert weights in
    groups of their own (`moe: True`), as DeepSpeed's engine requires for MoE models."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"name": "params", "params": params, "lr": lr, "weight_decay": weight_decay}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def trainable_moe_only(model) -> int:
    """Freeze everything but the LLM's FFNs: the dense mlp of layers left dense, the experts
    and router of upcycled ones (LLaVA-MoD's dense-to-sparse stage). Returns the number of
    trainable parameter elements."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in decoder_layers(model):
        for p in layer.mlp.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_moe(model, folder: str | os.PathLike) -> None:
    """Save a student: config.json (with mmkd_moe for an MoE student) and safetensors
    weights, never pickle. An MoE student's weights keep the model's own parameter names
    (save_pretrained(save_original_format=False)): transformers 5 otherwise renames LLaVA
    keys to the legacy checkpoint layout on save. A dense student is saved in the standard
    layout, loadable by anything that loads LLaVA checkpoints."""
    moe = bool(moe_layers(model))
    model.save_pretrained(folder, safe_serialization=True, save_original_format=not moe)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or index) to load")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def load_student(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a student saved by save_pretrained / save_moe, in eval mode: a dense one through
    its Auto class (common.models.model_class: image-text-to-text or causal LM), an MoE one by rebuilding the dense model from its config,
    upcycling it with the saved MoEConfig and loading the weights strictly."""
    from transformers import AutoConfig

    from mmkd.common.models import model_class

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    saved = getattr(config, MOE_CONFIG_KEY, None)
    if not saved:
        return model_class(config).from_pretrained(folder, dtype=dtype)
    cfg = MoEConfig.from_dict(saved)
    delattr(config, MOE_CONFIG_KEY)  # upcycle() records it again
    model = model_class(config).from_config(config)
    upcycle(model, cfg)
    state = _to_model_keys(model, _read_safetensors(folder))
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    # save_pretrained writes a tied tensor once: a missing key is fine when it shares
    # storage with one that is present (e.g. lm_head tied to the embeddings).
    present = {expected[k].untyped_storage().data_ptr() for k in state if k in expected}
    missing = {k for k in missing if expected[k].untyped_storage().data_ptr() not in present}
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the upcycled model: missing {sorted(missing)[:8]}"
                         f" ({len(missing)}), unexpected {sorted(unexpected)[:8]} ({len(unexpected)})")
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval()


def _to_model_keys(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys written in transformers' legacy layout (a plain
    save_pretrained(): 'language_model.model.layers...') to the model's own names, using
    transformers' save-time renaming applied to the model's own state dict."""
    expected = model.state_dict()
    if set(state) <= set(expected):
        return state
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    by_tensor = {(t.data_ptr(), tuple(t.shape)): k for k, t in expected.items()}
    legacy = revert_weight_conversion(model, dict(expected))
    rename = {old: by_tensor.get((t.data_ptr(), tuple(t.shape))) for old, t in legacy.items()}
    return {(rename.get(k) or k): v for k, v in state.items()}
