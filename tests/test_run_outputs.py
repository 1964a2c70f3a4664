"""What a training run leaves behind: the JSON log and the same scalars in TensorBoard,
the step clock's data-wait fraction, the progress bar, `mmkd eval`'s eval.json and `mmkd
plot`'s PNG, and a student folder that plain transformers loads."""

import json
import shutil

import pytest
import torch

from mmkd.common.config import InputsConfig
from mmkd.common.inputs import load_image
from mmkd.common.preprocess import collate, encode_sample, image_token_count, image_token_id
from mmkd.common.samples import read_llava
from mmkd.storage.manifest import Manifest
from mmkd.storage.writer import CacheWriter
from mmkd.student.config import TrainConfig
from mmkd.student.outputs import StudentOutputs
from mmkd.student.run_log import RunLog, StepClock, tag
from mmkd.student.train import train
from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, to_device
from mmkd.teacher_cache.teacher import load_teacher, processor_description

from tests.conftest import TINY

RECORDS = ("response", "visual", "relation")


@pytest.fixture(scope="module")
def run_dir(teacher_dir, demo_dir, processor_dir, tmp_path_factory):
    """A 5-step run with every distillation term (CE, KD, visual KD, relation) from a cache
    written without Ray, with a loader worker process; returns (folder, logged lines)."""
    cache = tmp_path_factory.mktemp("cache")
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    m = Manifest(teacher={"path": str(teacher_dir), "weights_sha256": "x", "dtype": "float32"},
                 processor=processor_description(processor, image_token_count(processor)),
                 vocab_size=len(processor.tokenizer),
                 extraction={"mode": "topk", "k": 4, "temperature": 1.0, "record_kinds": list(RECORDS)})
    w = CacheWriter(str(cache), m, rows_per_shard=64)
    samples = read_llava(demo_dir / "train.json")
    for i in range(0, len(samples), 20):
        chunk = samples[i:i + 20]
        enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in chunk]
        batch = to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)
        w.add(extract_rows(model, batch, [s.id for s in chunk], image_token_id(processor),
                           ExtractionSpec(k=4, records=RECORDS)))
    w.close(complete=True)
    out = tmp_path_factory.mktemp("run")
    lines = []
    train(TrainConfig(inputs=InputsConfig(str(demo_dir / "train.json"), str(demo_dir)), processor=str(processor_dir),
                      output_dir=str(out), cache=str(cache), arch=TINY, batch_size=8, num_workers=1, log_every=2,
                      visual_weight=1.0, relation_weight=1.0), log=lines.append)
    return out, lines


def _log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_equal_the_json_log(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, lines = run_dir
    log = _log(folder)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    for key in ("loss", "ce", "kd", "visual_kd", "relation", "lr", "step_s", "data_wait", "samples_per_s",
                "tokens_per_s"):
        assert key in log[0], key
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    keys = [k for k in log[0] if k != "step"]
    assert sorted(events.Tags()["scalars"]) == sorted(tag(k) for k in keys)
    for key in keys:
        scalars = events.Scalars(tag(key))
        assert [s.step for s in scalars] == [1, 2, 3, 4, 5]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in log], rel=1e-6, abs=1e-12), key
    for r in log:  # rates are this step's: 8 samples per step, its supervised tokens
        assert r["samples_per_s"] * r["step_s"] == pytest.approx(8)
        assert 0 <= r["data_wait"] <= 1
    # no terminal under pytest: a log line every log_every=2 steps and at the last one
    step_lines = [line for line in lines if line.startswith("[train] step")]
    assert [line.split()[2] for line in step_lines] == ["2/5", "4/5", "5/5"]
    assert f"relation {log[1]['relation']:.4f}" in step_lines[0]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class SlowLoader:
    """Starting costs `start` seconds (worker processes), each batch `per_batch`."""

    def __init__(self, clock, n, start, per_batch):
        self.clock, self.n, self.start, self.per_batch = clock, n, start, per_batch

    def __iter__(self):
        self.clock.now += self.start
        for i in range(self.n):
            self.clock.now += self.per_batch
            yield i


def test_step_clock_splits_the_loader_wait_from_the_work():
    clock = FakeClock()
    timer = StepClock(clock)
    laps = []
    for i, _ in enumerate(timer.batches(SlowLoader(clock, 4, start=5.0, per_batch=3.0))):
        clock.now += 1.0  # the step's work
        if i % 2 == 1:  # two micro-batches per optimizer step
            laps.append(timer.lap(samples=16, tokens=400))
    # step 1: start 5 + 2 x (3 wait + 1 work) = 13 s, 11 of them waiting; step 2: 8 s, 6 waiting
    assert laps[0] == pytest.approx({"step_s": 13.0, "data_wait": 11 / 13, "samples_per_s": 16 / 13,
                                     "tokens_per_s": 400 / 13})
    assert laps[1] == pytest.approx({"step_s": 8.0, "data_wait": 0.75, "samples_per_s": 2.0, "tokens_per_s": 50.0})


def _record(step):
    return {"step": step, "epoch": 0, "loss": 1.0 / step, "ce": 0.5, "lr": 1e-3, "step_s": 0.5, "data_wait": 0.1,
            "samples_per_s": 64.0, "tokens_per_s": 900.0}


def test_progress_bar_replaces_the_log_lines_and_tensorboard_can_be_off(tmp_path, capsys):
    lines = []
    run = RunLog(tmp_path, total_steps=3, log_every=1, report_to=(), log=lines.append, bar=True)
    for s in (1, 2, 3):
        run.step(_record(s))
    run.close()
    bar = capsys.readouterr().out
    assert "3/3" in bar and "loss=0.3333" in bar and "tok_s=900" in bar
    assert lines == [] and not (tmp_path / "tensorboard").exists()
    assert [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    run = RunLog(tmp_path, total_steps=3, log_every=2, report_to=(), log=lines.append, bar=False)
    for s in (1, 2, 3):
        run.step(_record(s))
    run.close()
    assert capsys.readouterr().out == ""
    assert [line.split()[2] for line in lines] == ["2/3", "3/3"] and "data wait 10%" in lines[0]


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        return im.size, len(colors)


def test_eval_json_and_plot(run_dir, demo_dir, tmp_path, capsys):
    from mmkd.pipelines.cli import main

    folder, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    (w, h), colors = _png(tmp_path / "curves.png")
    assert w >= 1000 and h >= 600 and colors > 50  # 10 panels of lines, not a blank canvas

    # `mmkd eval` on a run folder writes run/eval.json by default; the plot adds its table
    assert main(["eval", "--model", str(run), "--data", str(demo_dir / "test.json"),
                 "--image-root", str(demo_dir)]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["samples"] == 16 and metrics["data"] == str(demo_dir / "test.json")
    assert main(["plot", str(run)]) == 0
    (w2, h2), _ = _png(run / "plot.png")
    assert w2 == w and h2 > h  # the same panels and a table below them

    # several runs overlay (same folder name: labelled by their parent), --out needed
    other = tmp_path / "b" / "run"
    shutil.copytree(run, other)
    log = _log(other)
    (other / "train_log.jsonl").write_text("".join(json.dumps({**r, "loss": 2 * r["loss"]}) + "\n" for r in log))
    capsys.readouterr()
    assert main(["plot", str(run), str(other)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["plot", str(run), str(other), "--out", str(tmp_path / "both.png")]) == 0
    _png(tmp_path / "both.png")

    # a demo workdir: the results table alone
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "results.json").write_text(json.dumps({"config": {}, "results": {"teacher": metrics, "student": metrics}}))
    assert main(["plot", str(demo)]) == 0
    (w3, h3), _ = _png(demo / "plot.png")
    assert h3 < h


def test_plot_refuses_a_folder_without_a_log(tmp_path, capsys):
    from mmkd.pipelines.cli import main

    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: no train_log.jsonl" in err and "output_dir of an `mmkd train` run" in err
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "train_log.jsonl:2: not a JSON line" in capsys.readouterr().err
    assert not (tmp_path / "plot.png").exists()


def test_dense_student_loads_with_plain_transformers(run_dir, demo_dir):
    """The saved folder is an ordinary LLaVA checkpoint: the concrete transformers class
    loads it with no missing or unexpected weights, and its full-sequence logits at the
    supervised rows equal what mmkd's loader and StudentOutputs compute."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmkd.student.model import load_model

    folder, _ = run_dir
    plain, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(folder)
    samples = read_llava(demo_dir / "test.json")[:4]
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in samples]
    batch = {k: torch.from_numpy(v) for k, v in collate(enc, processor.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        full = plain.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"]).logits
        ours = StudentOutputs(load_model(str(folder)), image_token_id(processor))(
            batch["input_ids"], batch["attention_mask"], batch["labels"], {"pixel_values": batch["pixel_values"]},
            hidden_rows=True)
    b, t = torch.nonzero(batch["labels"] != -100, as_tuple=True)
    logits = torch.nn.functional.linear(ours["hidden"]["response"], *ours["head"])
    torch.testing.assert_close(logits, full[b, t - 1], atol=1e-5, rtol=1e-5)


def test_hallucination_rate_counts_absent_objects_answered_yes(run_dir, demo_dir, tmp_path):
    """evaluate()'s POPE-style rate against a count from plain transformers' logits: the
    existence questions whose reference answer is "no", and of those, the ones whose first
    answer token is argmax "yes". The student is first taught to say "yes" to two of the
    three absent objects (and "no" to the third), so the rate is neither 0 nor 1."""
    import dataclasses

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmkd.student.evaluate import evaluate

    folder, _ = run_dir
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    absent = [s for s in read_llava(demo_dir / "train.json")
              if s.meta.get("task") == "exists" and s.messages[-1]["content"].strip().lower() == "no"]
    encode = lambda s: encode_sample(processor, s, load_image(demo_dir, s), 256)  # noqa: E731
    taught = [dataclasses.replace(s, messages=s.messages[:-1] + [{"role": "assistant", "content": answer}])
              for s, answer in zip(absent, ("yes", "yes", "no"))]
    batch = {k: torch.from_numpy(v) for k, v in collate([encode(s) for s in taught],
                                                        processor.tokenizer.pad_token_id).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    yes = processor.tokenizer("yes", add_special_tokens=False)["input_ids"][0]
    said_yes = 0
    for s in absent:
        e = encode(s)
        first = int((e.labels != -100).nonzero()[0][0])
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(e.input_ids[None]),
                           pixel_values=torch.from_numpy(e.vision["pixel_values"])).logits
        said_yes += int(logits[0, first - 1].argmax()) == yes
    assert 0 < said_yes < len(absent) == 3
    metrics = evaluate(str(tmp_path), InputsConfig(str(demo_dir / "train.json"), str(demo_dir)))
    assert metrics["absent_object_questions"] == 3
    assert metrics["hallucination_rate"] == said_yes / 3
