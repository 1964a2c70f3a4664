"""Each supported model family, as a tiny random checkpoint loaded through the Auto classes:
chat template + image-token expansion (against the processor's own), the visual-position
map, top-k / visual / relation / preference extraction (against the model's own full
forward), padded output heads, and the student's forward on the same batch.

LLaVA-OneVision and Qwen2-VL processors need torchvision (so do the real ones); the main
CPU environment has none, so `make test` runs this file a second time in the torchvision
environment (.venv-vllm), where every family runs.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.common.check import shared_vocab_size
from mmkd.common.preprocess import collate, encode_sample, image_token_id, render
from mmkd.common.samples import Sample
from mmkd.storage.codec import decode_relation
from mmkd.teacher_cache.extract import ExtractionSpec, extract_preference_rows, extract_rows, to_device
from mmkd.teacher_cache.teacher import load_teacher

from families import build

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NEEDS_TORCHVISION = pytest.mark.skipif(
    not HAS_TORCHVISION and os.environ.get("MMKD_REQUIRE_ALL_FAMILIES") != "1",
    reason="OneVision / Qwen2-VL processors need torchvision; `make test` runs them in .venv-vllm")
FAMILIES = [pytest.param("llava", id="llava-1.5"),
            pytest.param("llava_onevision", id="llava-onevision", marks=NEEDS_TORCHVISION),
            pytest.param("qwen2_vl", id="qwen2-vl", marks=NEEDS_TORCHVISION),
            pytest.param("qwen2_5_vl", id="qwen2.5-vl", marks=NEEDS_TORCHVISION)]

CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration",
           "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
SAMPLES = [
    Sample("two-turns", "a.png", [{"role": "user", "content": "<image>\nwhat colour is the square ?"},
                                  {"role": "assistant", "content": "red ."},
                                  {"role": "user", "content": "and the circle ?"},
                                  {"role": "assistant", "content": "blue ."}]),
    Sample("tall", "b.png", [{"role": "user", "content": "<image>\nhow many shapes ?"},
                             {"role": "assistant", "content": "two shapes ."}]),
]
# Different sizes: any-resolution families give them different visual-token counts.
IMAGES = [Image.new("RGB", (48, 32), (200, 20, 20)), Image.new("RGB", (32, 64), (20, 20, 200))]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory, processor):
    """(family, folder) of a tiny checkpoint whose output head has 5 padded rows."""
    folder = tmp_path_factory.mktemp(request.param)
    build(request.param, folder, processor, head_padding=5)
    return request.param, str(folder)


def _encode(proc):
    return [encode_sample(proc, s, im, 512) for s, im in zip(SAMPLES, IMAGES)]


def test_sequence_equals_the_processors_own_expansion(checkpoint):
    """encode_sample's ids = the family processor run on the rendered conversation + image;
    every assistant turn is supervised."""
    _, folder = checkpoint
    _, proc = load_teacher(folder, device="cpu")
    for s, im, e in zip(SAMPLES, IMAGES, _encode(proc)):
        ref = proc(text=render(proc, s.messages, add_generation_prompt=False), images=[im], return_tensors="np",
                   add_special_tokens=False)
        assert np.array_equal(ref["input_ids"][0], e.input_ids)
        supervised = proc.tokenizer.decode(e.input_ids[e.labels != -100])
        answers = [m["content"] for m in s.messages if m["role"] == "assistant"]
        for a in answers:
            assert a.replace(" ", "") in supervised.replace(" ", "")
        assert (e.labels != -100).sum() >= sum(len(a.split()) for a in answers)


def test_extraction_matches_the_full_forward(checkpoint):
    family, folder = checkpoint
    model, proc = load_teacher(folder, device="cpu")
    assert type(model).__name__ == CLASSES[family]  # what the Auto classes picked from config.json
    head_rows = model.get_output_embeddings().weight.shape[0]
    vocab = shared_vocab_size(proc, head_rows)
    assert vocab == len(proc.tokenizer) == head_rows - 5
    enc = _encode(proc)
    img = image_token_id(proc)
    batch = to_device(collate(enc, proc.tokenizer.pad_token_id), "cpu", torch.float32)
    k = 8
    spec = ExtractionSpec(k=k, records=("response", "visual", "relation"), vocab_size=vocab)
    raw = extract_rows(model, batch, [s.id for s in SAMPLES], img, spec).to_pylist()
    counts = []
    for e, im, row in zip(enc, IMAGES, raw):
        single = to_device(collate([e], proc.tokenizer.pad_token_id), "cpu", torch.float32)
        with torch.no_grad():
            logits = model(**{k_: v for k_, v in single.items() if k_ != "labels"}).logits[0].double()
        logp = torch.log_softmax(logits[:, :vocab], -1)  # the padded head rows are no tokens
        assert row["input_ids"] == e.input_ids.tolist()
        # response: logits at t-1 for each supervised t
        pos = np.nonzero(e.labels != -100)[0]
        assert row["response_positions"] == pos.tolist()
        _check_topk(logp[pos - 1], row, "response", k)
        # visual: AT every image-token position; as many as the processor expands this image to
        vis = np.nonzero(e.input_ids == img)[0]
        n_expected = int((proc(text=proc.image_token, images=[im], return_tensors="np")["input_ids"] == img).sum())
        assert row["visual_positions"] == vis.tolist() and len(vis) == n_expected > 0
        counts.append(len(vis))
        _check_topk(logp[vis], row, "visual", k)
        # relation: normalised Z Z^T of the raw (shared-vocabulary) logits at the image tokens
        z = logits[vis, :vocab]
        ref = z @ z.T
        ref = ref / ref.norm()
        got = torch.from_numpy(decode_relation(row["relation"], row["relation_size"], "triangle-f16")).double()
        assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0) > 0.9999
    if family != "llava":
        assert counts[0] != counts[1]  # any resolution: the count follows the image size


def _check_topk(ref: torch.Tensor, row: dict, kind: str, k: int) -> None:
    n = ref.shape[0]
    ids = np.asarray(row[f"{kind}_ids"]).reshape(n, k)
    lps = np.asarray(row[f"{kind}_logprobs"]).reshape(n, k)
    ref_vals, ref_ids = ref.topk(k, -1)
    assert ids.max() < ref.shape[1]  # never a padded head row
    assert np.array_equal(np.sort(ids, 1), np.sort(ref_ids.numpy(), 1))
    assert np.allclose(np.sort(lps, 1), np.sort(ref_vals.numpy(), 1), atol=2e-5)
    assert np.allclose(row[f"{kind}_leftover"], 1 - ref_vals.exp().sum(-1).numpy(), atol=1e-5)


def test_preference_logprobs_match_the_full_forward(checkpoint):
    from mmkd.common.samples import PreferencePair

    _, folder = checkpoint
    model, proc = load_teacher(folder, device="cpu")
    vocab = shared_vocab_size(proc, model.get_output_embeddings().weight.shape[0])
    pair = PreferencePair("p", "a.png", "what colour is the square ?", "red .", "blue square .")
    enc = [encode_sample(proc, pair.sample(w), IMAGES[0], 512) for w in ("chosen", "rejected")]
    batch = to_device(collate(enc, proc.tokenizer.pad_token_id), "cpu", torch.float32)
    row = extract_preference_rows(model, batch, ["p"], image_token_id(proc), vocab).to_pylist()[0]
    for e, key in zip(enc, ("chosen", "rejected")):
        single = to_device(collate([e], proc.tokenizer.pad_token_id), "cpu", torch.float32)
        with torch.no_grad():
            logits = model(**{k: v for k, v in single.items() if k != "labels"}).logits[0].double()
        pos = np.nonzero(e.labels != -100)[0]
        ref = torch.log_softmax(logits[:, :vocab], -1)[pos - 1, e.input_ids[pos]].numpy()
        assert np.allclose(row[f"{key}_token_logprobs"], ref, atol=2e-5)
        assert row[f"{key}_logprob"] == pytest.approx(ref.sum(), abs=1e-4)


def test_student_forward_scores_the_same_rows(checkpoint):
    """The trainer's forward (StudentOutputs) on a family model = its full forward at the
    supervised rows and image tokens, over the shared vocabulary; gradients reach the
    vision side."""
    from mmkd.student.model import load_model
    from mmkd.student.outputs import StudentOutputs, vision_inputs

    _, folder = checkpoint
    model = load_model(folder)
    _, proc = load_teacher(folder, device="cpu")
    vocab = len(proc.tokenizer)
    batch = {k: torch.from_numpy(v) for k, v in collate(_encode(proc), proc.tokenizer.pad_token_id).items()}
    out = StudentOutputs(model, image_token_id(proc), vocab)(batch["input_ids"], batch["attention_mask"],
                                                            batch["labels"], vision_inputs(batch), hidden_rows=True)
    logits = {at: torch.nn.functional.linear(h, *out["head"]) for at, h in out["hidden"].items()}
    full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    b, t = torch.nonzero(batch["labels"] != -100, as_tuple=True)
    assert logits["response"].shape[1] == vocab
    assert torch.allclose(logits["response"], full[b, t - 1, :vocab], atol=1e-5)
    vb, vt = torch.nonzero(batch["input_ids"] == image_token_id(proc), as_tuple=True)
    assert torch.allclose(logits["visual"], full[vb, vt, :vocab], atol=1e-5)
    logits["visual"].logsumexp(-1).mean().backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if "vision" in n or "visual" in n]
    assert vision_grads and any(g is not None and g.abs().sum() > 0 for g in vision_grads)


def test_remote_code_is_not_run_unless_asked(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "mmkd_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig", '
        '"AutoModelForImageTextToText": "modeling_x.XModel"}}')
    marker = tmp_path / "EXECUTED"
    for name in ("configuration_x.py", "modeling_x.py"):
        (tmp_path / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match="needs its own Python code.*--trust-remote-code"):
        load_teacher(str(tmp_path), device="cpu")
    assert not marker.exists()


def test_device_map_loading_gives_the_same_targets(teacher_dir, demo_dir):
    """device_map (a teacher spread over GPUs) goes through accelerate's dispatch; on this
    machine every layer maps to the CPU, and the targets must not change."""
    pytest.importorskip("accelerate")  # a dependency of mmkd; the vLLM environment may lack it
    from mmkd.common.inputs import load_image
    from mmkd.common.samples import read_llava

    samples = read_llava(demo_dir / "train.json")[:3]
    rows = []
    for device_map in (None, "auto"):
        model, proc = load_teacher(str(teacher_dir), device="cpu", device_map=device_map)
        enc = [encode_sample(proc, s, load_image(demo_dir, s), 256) for s in samples]
        batch = to_device(collate(enc, proc.tokenizer.pad_token_id), "cpu", torch.float32)
        rows.append(extract_rows(model, batch, [s.id for s in samples], image_token_id(proc),
                                 ExtractionSpec(k=4, vocab_size=len(proc.tokenizer))).to_pylist())
    assert rows[0] == rows[1]


def test_stage_freezing_finds_each_familys_projector(checkpoint):
    """trainable=projector trains only the vision-to-LLM projector (LLaVA's MLP, Qwen2-VL's
    patch merger); llm+projector adds the LLM and head, never the vision encoder."""
    from mmkd.student.model import load_model, projector_parameters, set_trainable

    _, folder = checkpoint
    model = load_model(folder)
    proj = {id(p) for p in projector_parameters(model)}
    set_trainable(model, "projector")
    assert {id(p) for p in model.parameters() if p.requires_grad} == proj
    set_trainable(model, "llm+projector")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("language_model" in n for n in trainable) and any("lm_head" in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(("vision" in n or "visual" in n) for n in frozen)
    assert all(id(p) in proj or not ("visual" in n or "vision" in n) for n, p in model.named_parameters()
               if p.requires_grad)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_teachers_give_close_targets(teacher_dir, demo_dir, dtype):
    """--dtype bfloat16 / float16: weights and activations in that dtype, the output head
    and log-softmax in fp32 (extract.topk_logprobs); targets stay close to the fp32 teacher's."""
    from mmkd.common.inputs import load_image
    from mmkd.common.samples import read_llava

    samples = read_llava(demo_dir / "train.json")[:4]
    out = {}
    for dt in ("float32", dtype):
        model, proc = load_teacher(str(teacher_dir), dt, "cpu")
        assert model.dtype == getattr(torch, dt)
        enc = [encode_sample(proc, s, load_image(demo_dir, s), 256) for s in samples]
        batch = to_device(collate(enc, proc.tokenizer.pad_token_id), "cpu", model.dtype)
        assert batch["pixel_values"].dtype == model.dtype
        out[dt] = extract_rows(model, batch, [s.id for s in samples], image_token_id(proc),
                               ExtractionSpec(k=4, vocab_size=len(proc.tokenizer))).to_pylist()
    for a, b in zip(out["float32"], out[dtype]):
        assert a["input_ids"] == b["input_ids"] and a["response_positions"] == b["response_positions"]
        top_a = np.asarray(a["response_logprobs"]).reshape(-1, 4).max(1)
        top_b = np.asarray(b["response_logprobs"]).reshape(-1, 4).max(1)
        assert np.abs(top_a - top_b).max() < 0.05  # a tiny model: half-precision noise only
