"""Sparse upcycling (student/moe.py): function preservation, DeepSpeed's l_aux, the aux loss
and its gradients, save/load, freezing, optimizer groups and the DeepSpeed engine."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmkd.common.inputs import load_image
from mmkd.common.preprocess import collate, encode_sample
from mmkd.common.samples import read_llava
from mmkd.student.config import LlavaArch
from mmkd.student.model import build_llava
from mmkd.student.moe import (
    MoEConfig,
    MoEMLP,
    load_balancing_loss,
    load_student,
    moe_aux_loss,
    moe_layers,
    moe_param_groups,
    save_moe,
    trainable_moe_only,
    upcycle,
)

ARCH = LlavaArch(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=4, text_heads=2,
                 text_intermediate=64)
NO_DROP = MoEConfig(num_experts=4, top_k=2, drop_tokens=False)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch(demo_dir, processor):
    """A real batch: chat-templated samples with images, right-padded."""
    samples = read_llava(demo_dir / "val.json")[:4]
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in samples]
    b = collate(enc, processor.tokenizer.pad_token_id)
    return {k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.fixture
def dense(processor):
    return build_llava(ARCH, processor, seed=0).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def perturb_experts(model, scale=0.05, seed=0):
    """Make every expert different from the others (and from the dense FFN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in moe_layers(model):
            for expert in m.experts:
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * scale)


def test_upcycled_top2_model_computes_the_dense_function(dense, batch):
    ref = logits(dense, batch)
    dense_mlps = {i: copy.deepcopy(layer.mlp) for i, layer in enumerate(dense.model.language_model.layers)}
    model = upcycle(dense, NO_DROP).eval()

    layers = moe_layers(model)
    assert [i for i, _ in layers] == [1, 3]  # every=2: the second layer of each pair
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for i, layer in enumerate(model.model.language_model.layers)
               if i not in (1, 3))
    assert model.config.mmkd_moe == asdict(NO_DROP)

    out = logits(model, batch)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    for _, m in layers:  # every token went through two experts, none was dropped
        assert int(m.exp_counts.sum()) == 2 * batch["input_ids"].numel()
        assert (m.exp_counts > 0).sum() >= 2

    for i, m in layers:
        assert len(m.experts) == 4
        ptrs = set()
        for expert in m.experts:
            for (name, p), q in zip(expert.named_parameters(), dense_mlps[i].parameters()):
                assert torch.equal(p, q), name
                ptrs.add(p.data_ptr())
        assert len(ptrs) == 4 * 3  # 4 experts x (gate, up, down): no shared storage
        with torch.no_grad():
            m.experts[0].down_proj.weight.add_(1.0)
        assert torch.equal(m.experts[1].down_proj.weight, dense_mlps[i].down_proj.weight)


def test_negative_control_a_perturbed_expert_changes_the_output(dense, batch):
    ref = logits(dense, batch)
    model = upcycle(dense, NO_DROP).eval()
    logits(model, batch)
    _, m = moe_layers(model)[0]
    busiest = int(m.exp_counts.argmax())
    with torch.no_grad():
        m.experts[busiest].up_proj.weight.mul_(1.5)
    assert (logits(model, batch) - ref).abs().max() > 1e-3


def test_top1_upcycling_scales_the_ffn_by_the_top_probability(dense):
    """Why top-2 is the default: DeepSpeed's top-1 gate does not renormalise, so a top-1
    upcycled FFN outputs p_max * FFN(x), not FFN(x)."""
    mlp = dense.model.language_model.layers[1].mlp
    layer = MoEMLP(copy.deepcopy(mlp), 32, MoEConfig(top_k=1, drop_tokens=False)).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        p_max = torch.softmax(x @ layer.gate.weight.T, -1).max(-1).values
        assert torch.allclose(layer(x), p_max[..., None] * mlp(x), atol=1e-6)
        assert not torch.allclose(layer(x), mlp(x), atol=1e-3)
        one = x[:1, :2]  # fewer tokens than min_capacity (a decoding step): DeepSpeed would assert
        assert torch.allclose(layer(one), p_max[:1, :2, None] * mlp(one), atol=1e-6)


def test_moe_students_generate(dense, batch):
    for k in (1, 2):
        model = upcycle(copy.deepcopy(dense), MoEConfig(top_k=k))
        perturb_experts(model)
        model.eval()
        ids = batch["input_ids"][:2, :6]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 9)


@pytest.mark.parametrize("n,e", [(64, 4), (37, 8), (8, 2)])
def test_load_balancing_loss_equals_deepspeed_l_aux(n, e):
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

    torch.manual_seed(n + e)
    for scale in (0.1, 1.0, 5.0):
        logits = torch.randn(n, e) * scale
        ours1, ours2 = load_balancing_loss(logits, 1), load_balancing_loss(logits, 2)
        ds1 = top1gating(logits.clone(), 1.0, 4)[0]
        ds2 = top2gating(logits.clone(), 1.0, 4)[0]  # top2gating adds Gumbel noise in place: clone
        assert torch.allclose(ours1, ds1, atol=1e-6, rtol=1e-6), (ours1, ds1)
        assert torch.allclose(ours2, ds2, atol=1e-6, rtol=1e-6), (ours2, ds2)
        if e >= 3:
            assert torch.allclose(load_balancing_loss(logits, 3), topkgating(logits.clone(), 3, 1.0, 4)[0], atol=1e-6)
    # The test tells the choices apart: counting both top-2 choices is not DeepSpeed's l_aux.
    probs = torch.softmax(logits, -1)
    both = torch.zeros_like(probs).scatter_(1, probs.topk(2, -1).indices, 1.0)
    assert not torch.allclose(e * (probs.mean(0) * both.mean(0)).sum() / 2, ds2, atol=1e-4)


def test_load_balancing_loss_limits():
    assert load_balancing_loss(torch.zeros(16, 4), 2).item() == pytest.approx(1.0)  # uniform router
    collapsed = torch.full((16, 4), -30.0)
    collapsed[:, 2] = 30.0
    assert load_balancing_loss(collapsed, 2).item() == pytest.approx(4.0)  # all tokens on one expert


def test_aux_loss_is_positive_and_trains_the_routers(dense, batch):
    assert moe_aux_loss(dense).item() == 0.0  # no MoE layer
    model = upcycle(dense, MoEConfig())
    assert moe_aux_loss(model).item() == 0.0  # no forward yet
    layers = moe_layers(model)
    seen = {}
    hook = layers[0][1].register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    hook.remove()
    aux = moe_aux_loss(model)
    assert aux.item() > 0 and aux.requires_grad
    assert torch.allclose(aux, sum(m.l_aux for _, m in layers))
    # The stored l_aux is the layer's router loss on its input.
    m1 = layers[0][1]
    x = seen["x"].reshape(-1, 32)
    assert torch.allclose(m1.l_aux, load_balancing_loss(x @ m1.gate.weight.T, 2), atol=1e-6)

    aux.backward(retain_graph=True)  # the aux loss alone reaches every router
    for _, m in layers:
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layers[-1][1].experts.parameters())  # nothing downstream of them
    model.zero_grad()
    (out.loss + MoEConfig().aux_weight * aux).backward()
    for _, m in layers:
        assert m.gate.weight.grad.abs().sum() > 0
        grads = [e.down_proj.weight.grad for e in m.experts]
        assert sum(g is not None and g.abs().sum() > 0 for g in grads) >= 2  # top-2: experts learn
    copy.deepcopy(model)  # DeepSpeed keeps l_aux with its graph; MoEMLP keeps the model copyable


def test_save_load_round_trip(dense, batch, tmp_path):
    model = upcycle(dense, MoEConfig())
    perturb_experts(model)  # so that the router's choice matters
    model.eval()
    ref = logits(model, batch)
    assert torch.equal(logits(model, batch), ref)  # eval routing is deterministic
    save_moe(model, tmp_path / "moe")
    files = sorted(p.name for p in (tmp_path / "moe").iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["mmkd_moe"] == asdict(MoEConfig())

    loaded = load_student(tmp_path / "moe")
    assert [i for i, _ in moe_layers(loaded)] == [1, 3] and not loaded.training
    assert torch.equal(logits(loaded, batch), ref)
    sd = loaded.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())

    # A plain save_pretrained (transformers' legacy key layout) loads as well.
    model.save_pretrained(tmp_path / "plain")
    assert torch.equal(logits(load_student(tmp_path / "plain"), batch), ref)

    # Strict: a missing weight is an error, not a silently random one.
    state = load_file(tmp_path / "moe" / "model.safetensors")
    state.pop("model.language_model.layers.3.mlp.moe.deepspeed_moe.gate.wg.weight")
    save_file(state, tmp_path / "moe" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*gate.wg.weight"):
        load_student(tmp_path / "moe")


def test_dense_students_load_unchanged(dense, batch, tmp_path):
    save_moe(dense, tmp_path / "dense")
    loaded = load_student(tmp_path / "dense")
    assert not moe_layers(loaded)
    assert torch.equal(logits(loaded, batch), logits(dense, batch))


def test_load_in_a_fresh_process(dense, batch, tmp_path):
    model = upcycle(dense, MoEConfig())
    perturb_experts(model)
    model.eval()
    save_moe(model, tmp_path / "moe")
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "batch.safetensors")
    script = ("import sys, torch; from safetensors.torch import load_file, save_file; "
              "from mmkd.student.moe import load_student; m = load_student(sys.argv[1]); "
              "b = load_file(sys.argv[2]); "
              "torch.no_grad()(lambda: save_file({'logits': m(**b).logits}, sys.argv[3]))(); "
              "print('dist', torch.distributed.is_initialized())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)  # a process without any distributed setup
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "moe"), str(tmp_path / "batch.safetensors"),
                        str(tmp_path / "out.safetensors")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dist False" in r.stdout
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], logits(model, batch))


def test_trainable_moe_only_and_param_groups(dense):
    model = upcycle(dense, MoEConfig())
    n = trainable_moe_only(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    for name, _ in model.named_parameters():
        ffn = name.startswith("model.language_model.layers.") and ".mlp." in name
        assert (name in trainable) == ffn, name
    assert any(".experts.deepspeed_experts.3." in n for n in trainable)
    assert any(".gate.wg." in n for n in trainable)
    assert any(n.startswith("model.language_model.layers.0.mlp.") for n in trainable)  # dense FFN of layer 0
    frozen = set(dict(model.named_parameters())) - trainable
    for part in ("self_attn", "embed_tokens", "lm_head", "vision_tower", "multi_modal_projector", "norm"):
        assert any(part in n for n in frozen), part

    groups = moe_param_groups(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable)  # each trainable parameter once, frozen ones left out
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 0.1 for g in groups)
    for g in groups:
        expert = [".deepspeed_experts." in names[id(p)] for p in g["params"]]
        assert all(expert) if g.get("moe") else not any(expert)
    assert any(g.get("moe") for g in groups)


def test_deepspeed_engine_trains_experts_and_routers_only(processor, batch):
    import deepspeed

    from mmkd.student.train import setup_distributed

    setup_distributed()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
              "steps_per_print": 1 << 30}

    def fresh():
        m = upcycle(build_llava(ARCH, processor, seed=0), MoEConfig())
        trainable_moe_only(m)
        return m

    # Without the MoE groups DeepSpeed refuses the model (the groups are required).
    m = fresh()
    plain = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    with pytest.raises(AssertionError, match="None of the param groups are marked as MoE"):
        deepspeed.initialize(model=m, optimizer=plain, config=config)

    model = fresh()
    opt = torch.optim.AdamW(moe_param_groups(model, lr=1e-2, weight_decay=0.0))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = engine(**batch, labels=batch["input_ids"])
    engine.backward(out.loss + 0.01 * moe_aux_loss(model))
    engine.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".deepspeed_experts." in n for n in changed) and any(".gate.wg." in n for n in changed)
