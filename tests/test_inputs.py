"""Input formats: every format reads to the samples of the equivalent LLaVA JSON (ids,
conversations, meta) with the same pixels; preference pairs; refusals (escaping paths,
corrupt bytes, duplicate ids, missing columns); the student's dataset from Parquet."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmkd.common.inputs import detect_format, load_image, open_dataset, read_inputs
from mmkd.common.preprocess import IGNORE_INDEX, encode_sample
from mmkd.common.samples import ImageRef, PreferencePair, Sample, SampleError, read_llava, resolve_image

from helpers import llava_parquet


def _records(path):
    return json.loads(path.read_text())


def _pixels(img):
    return np.asarray(img.convert("RGB"))


def _hf_dataset(records, image_root, image_as="pil", id_column="id"):
    """A datasets.Dataset of LLaVA records with the image as the Hugging Face Image feature,
    built from decoded PIL images ("pil") or from absolute file paths ("path")."""
    import datasets

    rows = {"id": [r["id"] for r in records], "conversations": [r["conversations"] for r in records],
            "task": [r["task"] for r in records]}
    if image_as == "pil":
        rows["image"] = [Image.open(image_root / r["image"]).convert("RGB") for r in records]
        ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
            "id": datasets.Value("string"), "task": datasets.Value("string"), "image": datasets.Image(),
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")})}))
    else:
        rows["image"] = [str(image_root / r["image"]) for r in records]
        ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    return ds.rename_column("id", id_column) if id_column != "id" else ds


@pytest.fixture(scope="module")
def variants(demo_dir, tmp_path_factory):
    """The demo train split in every input format, built from its JSON here."""
    import datasets

    d = tmp_path_factory.mktemp("variants")
    recs = _records(demo_dir / "train.json")
    val = _records(demo_dir / "val.json")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    llava_parquet(demo_dir / "train.json", d / "paths.parquet", demo_dir, image="path")
    llava_parquet(demo_dir / "train.json", d / "bytes.parquet", demo_dir, image="bytes")
    # a Hub-like folder: train split in two files, val in one
    (d / "hub" / "data").mkdir(parents=True)
    half = len(recs) // 2
    for name, rows in (("train-00000-of-00002", recs[:half]), ("train-00001-of-00002", recs[half:]),
                       ("val-00000-of-00001", val)):
        pq.write_table(pa.Table.from_pylist([dict(r, image=(demo_dir / r["image"]).read_bytes()) for r in rows]),
                       d / "hub" / "data" / f"{name}.parquet")
    _hf_dataset(recs, demo_dir, "pil").save_to_disk(str(d / "hf_pil"))
    datasets.DatasetDict({"train": _hf_dataset(recs, demo_dir, "path"),
                          "validation": _hf_dataset(val, demo_dir, "path")}).save_to_disk(str(d / "hf_dict"))
    _hf_dataset(recs, demo_dir, "pil").to_parquet(str(d / "hf_image.parquet"))  # Image struct inside Parquet
    return d


def _assert_same_as_json(samples, demo_dir, image_root, json_name="train.json"):
    """Ids, conversations and meta equal read_llava of the JSON; pixels equal the image files."""
    ref = read_llava(demo_dir / json_name)
    files = {r["id"]: demo_dir / r["image"] for r in _records(demo_dir / json_name)}
    assert [s.id for s in samples] == [s.id for s in ref]
    for s, r in zip(samples, ref):
        assert (s.messages, s.meta) == (r.messages, r.meta)
        with Image.open(files[s.id]) as want:
            assert np.array_equal(_pixels(load_image(image_root, s)), _pixels(want))


@pytest.mark.parametrize("name,split,root,embedded", [
    ("train.jsonl", None, "demo", False),
    ("paths.parquet", None, "demo", False),
    ("bytes.parquet", None, "", True),
    ("hub", "train", "", True),
    ("hf_pil", None, "", True),
    ("hf_dict", "train", "", True),
    ("hf_image.parquet", None, "", True),
])
def test_every_format_reads_the_samples_of_the_json(variants, demo_dir, name, split, root, embedded):
    root = str(demo_dir) if root == "demo" else root
    samples = read_inputs(str(variants / name), image_root=root, split=split)
    _assert_same_as_json(samples, demo_dir, root)
    # embedded images stay in the data set: the samples hold row references, not bytes
    assert all(isinstance(s.image, ImageRef) for s in samples) == embedded
    if embedded:
        assert [s.image.row for s in samples] == list(range(len(samples)))
        assert all(Sample.from_json(s.to_json()) == s for s in samples[:3])


def test_formats_are_detected_and_splits_chosen(variants, demo_dir):
    assert [detect_format(str(variants / n)) for n in ("train.jsonl", "bytes.parquet", "hub", "hf_pil", "hf_dict")] \
        == ["json", "parquet", "parquet", "hf", "hf"]
    assert detect_format(str(variants / "hub" / "data" / "train-*.parquet")) == "parquet"
    # a glob, and the validation split of the DatasetDict
    _assert_same_as_json(read_inputs(str(variants / "hub" / "data" / "train-*.parquet")), demo_dir, "")
    _assert_same_as_json(read_inputs(str(variants / "hf_dict"), split="validation"), demo_dir, "", "val.json")
    _assert_same_as_json(read_inputs(str(variants / "hub"), split="val"), demo_dir, "", "val.json")
    n_all = len(read_llava(demo_dir / "train.json")) + len(read_llava(demo_dir / "val.json"))
    assert len(read_inputs(str(variants / "hub"))) == n_all  # no split: every file
    with pytest.raises(SampleError, match=r"splits \['train', 'validation'\].*--data-split"):
        read_inputs(str(variants / "hf_dict"))
    with pytest.raises(SampleError, match="no Parquet file of split 'test'"):
        read_inputs(str(variants / "hub"), split="test")
    with pytest.raises(SampleError, match="no splits"):
        read_inputs(str(variants / "train.jsonl"), split="train", image_root=str(demo_dir))
    with pytest.raises(SampleError, match="does not exist"):
        read_inputs(str(variants / "nope.json"))


def test_a_data_set_is_opened_once_per_process(variants):
    a = open_dataset(str(variants / "hf_pil"))
    assert open_dataset(str(variants / "hf_pil")) is a


def test_multi_turn_jsonl_supervises_every_assistant_turn(tmp_path, processor):
    turns = [{"from": "human", "value": "<image>\nhow many shapes are there?"}, {"from": "gpt", "value": "two"},
             {"from": "human", "value": "is there a red circle?"}, {"from": "gpt", "value": "no"}]
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "mt.jsonl").write_text(json.dumps({"id": "mt-1", "image": "a.png", "conversations": turns}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"id": "mt-1", "image": (tmp_path / "a.png").read_bytes(),
                                          "conversations": turns}]), tmp_path / "mt.parquet")
    for data, root in (("mt.jsonl", str(tmp_path)), ("mt.parquet", "")):
        [s] = read_inputs(str(tmp_path / data), image_root=root)
        assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
        e = encode_sample(processor, s, load_image(root, s), 128)
        sup = processor.tokenizer.convert_ids_to_tokens(e.input_ids[e.labels != IGNORE_INDEX].tolist())
        assert sup == ["two", "</s>", "no", "</s>"]


def test_preference_pairs_in_jsonl_and_in_a_data_set(demo_dir, tmp_path):
    import datasets

    lines = [json.loads(x) for x in (demo_dir / "preference.jsonl").read_text().splitlines()]
    pairs = read_inputs(str(demo_dir / "preference.jsonl"), pairs=True, image_root=str(demo_dir))
    assert [(p.id, p.image, p.question, p.chosen, p.rejected) for p in pairs] == \
        [(r["id"], r["image"], r["question"], r["chosen"], r["rejected"]) for r in lines]
    # The RLAIF-V layout on the Hub: id column "idx", image as the Image feature.
    ds = datasets.Dataset.from_dict({
        "idx": [r["id"] for r in lines], "question": [r["question"] for r in lines],
        "chosen": [r["chosen"] for r in lines], "rejected": [r["rejected"] for r in lines],
        "image": [str(demo_dir / r["image"]) for r in lines]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "rlaif"))
    with pytest.raises(SampleError, match=r"no column\(s\) \['id'\].*--id-column"):
        read_inputs(str(tmp_path / "rlaif"), pairs=True)
    hub = read_inputs(str(tmp_path / "rlaif"), pairs=True, id_column="idx")
    assert [(p.id, p.question, p.chosen, p.rejected) for p in hub] == \
        [(p.id, p.question, p.chosen, p.rejected) for p in pairs]
    for p, q in zip(hub, pairs):
        assert isinstance(p.image, ImageRef)
        for which in ("chosen", "rejected"):
            a, b = p.sample(which), q.sample(which)
            assert a.messages == b.messages
            assert np.array_equal(_pixels(load_image("", a)), _pixels(load_image(demo_dir, b)))
    # pairs travel to the teacher's workers as JSON and come back equal
    from mmkd.pipelines.workers import sample_item

    assert PreferencePair(**json.loads(sample_item(hub[2])["sample"])) == hub[2]
    with pytest.raises(SampleError, match="preference pairs.*--records preference"):
        read_inputs(str(demo_dir / "preference.jsonl"), image_root=str(demo_dir))


def test_image_paths_stay_inside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "sub" / "ok.png")
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    os.symlink(outside, root / "link")
    assert resolve_image(root, "sub/ok.png") == (root / "sub" / "ok.png").resolve()
    assert resolve_image(root, str(root / "sub" / "ok.png")) == (root / "sub" / "ok.png").resolve()  # absolute, inside
    escapes = ("../outside/secret.png", str(outside / "secret.png"), "link/secret.png", "sub/../../outside/secret.png")
    for bad in escapes:
        with pytest.raises(SampleError, match="escapes the image root"):
            resolve_image(root, bad)
    # the same through a data set's path column: read, then refused at load, naming the path
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    pq.write_table(pa.Table.from_pylist([{"id": "fine", "image": "sub/ok.png", "conversations": turns},
                                         {"id": "evil", "image": "../outside/secret.png", "conversations": turns}]),
                   tmp_path / "p.parquet")
    fine, evil = read_inputs(str(tmp_path / "p.parquet"), image_root=str(root))
    assert _pixels(load_image(root, fine))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(SampleError, match="'../outside/secret.png' escapes"):
        load_image(root, evil)
    with pytest.raises(SampleError, match="sample fine refers to the image file.*--image-root"):
        read_inputs(str(tmp_path / "p.parquet"))


def test_corrupt_image_bytes_name_the_sample_and_the_file(demo_dir, tmp_path):
    recs = _records(demo_dir / "train.json")[:3]
    rows = [dict(r, image=(demo_dir / r["image"]).read_bytes()) for r in recs]
    rows[1]["image"] = rows[1]["image"][:40]  # a truncated PNG
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "train-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "data" / "train-1.parquet")
    samples = read_inputs(str(tmp_path / "data"))
    load_image("", samples[0])
    with pytest.raises(SampleError, match=f"sample {recs[1]['id']}.*do not decode.*row 0 of .*train-1.parquet"):
        load_image("", samples[1])
    # a reference whose row now holds another sample (the data set changed) is refused too
    moved = Sample(recs[2]["id"], ImageRef(samples[0].image.data, None, 0, "image", "id"), samples[2].messages)
    with pytest.raises(SampleError, match=f"sample {recs[2]['id']}.*now holds sample '{recs[0]['id']}'"):
        load_image("", moved)


def test_duplicate_ids_and_missing_columns_are_refused(demo_dir, tmp_path):
    recs = _records(demo_dir / "train.json")[:3]
    recs[2]["id"] = recs[0]["id"]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "dup.parquet")
    with pytest.raises(SampleError, match=f"dup.parquet.*{recs[0]['id']}.*twice"):
        read_inputs(str(tmp_path / "dup.parquet"), image_root=str(demo_dir))
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SampleError, match="twice"):
        read_inputs(str(tmp_path / "dup.jsonl"), image_root=str(demo_dir))
    pq.write_table(pa.Table.from_pylist([{"id": "a", "img": b"x", "text": "q"}]), tmp_path / "odd.parquet")
    with pytest.raises(SampleError, match=r"odd.parquet: no column\(s\) \['conversations', 'image'\].*"
                                          r"--image-column"):
        read_inputs(str(tmp_path / "odd.parquet"))
    pq.write_table(pa.Table.from_pylist([{"id": "a", "image": 3, "conversations": []}]), tmp_path / "int.parquet")
    with pytest.raises(SampleError, match="column 'image' has type int64"):
        read_inputs(str(tmp_path / "int.parquet"))
    # image_column "" reads a data set without images; a placeholder without an image is refused
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    pq.write_table(pa.Table.from_pylist([{"id": "t", "conversations": turns}]), tmp_path / "text.parquet")
    [s] = read_inputs(str(tmp_path / "text.parquet"), image_column="")
    assert s.image is None and s.messages[1]["content"] == "hello"


def test_configs_carry_the_input_options():
    from mmkd.pipelines.cli import _config, build_parser
    from mmkd.pipelines.config import TeacherPassConfig
    from mmkd.student.config import EvalConfig, TrainConfig

    for cls in (TeacherPassConfig, TrainConfig, EvalConfig):  # one InputsConfig, the same flags everywhere
        cfg = cls()
        assert (cfg.inputs.data_split, cfg.inputs.image_column, cfg.inputs.id_column) == (None, "image", "id")
    args = build_parser().parse_args(["teacher-pass", "--data", "d", "--data-split", "train", "--id-column", "idx"])
    assert (args.data_split, args.id_column) == ("train", "idx")
    inputs = _config(build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--image-column", "img"]),
                     EvalConfig).inputs
    assert (inputs.image_column, inputs.data_split, inputs.image_root) == ("img", None, "")


def test_student_dataset_from_parquet_equals_the_json_one(demo_dir, processor, tmp_path):
    from mmkd.common.config import InputsConfig
    from mmkd.common.inputs import SampleTable
    from mmkd.student.data import StudentData

    llava_parquet(demo_dir / "val.json", tmp_path / "val.parquet", demo_dir, image="bytes")
    from_json = StudentData(SampleTable(InputsConfig(str(demo_dir / "val.json"), str(demo_dir))), processor,
                            str(demo_dir), 256)
    from_parquet = StudentData(SampleTable(InputsConfig(str(tmp_path / "val.parquet"))), processor, "", 256)
    assert len(from_parquet) == len(from_json)
    # decoded in a loader worker process, which opens the data set itself
    loader = torch.utils.data.DataLoader(from_parquet, batch_sampler=[[i] for i in range(len(from_parquet))],
                                         num_workers=1, collate_fn=lambda batch: batch)
    for i, b in enumerate(loader):
        a = from_json[i]
        assert a.samples[0].id == b.samples[0].id
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.vision["pixel_values"], b.vision["pixel_values"])


def _malformed_records(demo_dir):
    """(good records, [(JSONL line bytes, key in the errors, reason pattern)]): one malformed
    record of each kind the readers set aside, between good ones."""
    good = _records(demo_dir / "train.json")[:3]
    img, turns = good[0]["image"], good[0]["conversations"]
    bad = [
        (json.dumps({"id": "empty", "image": img, "conversations": []}), "empty", "empty or missing 'conversations'"),
        (json.dumps({"id": "two-images", "image": img,
                     "conversations": [{"from": "human", "value": "<image><image>q"}, turns[1]]}),
         "two-images", "2 '<image>' placeholders"),
        (json.dumps({"id": "no-placeholder", "image": img,
                     "conversations": [{"from": "human", "value": "q"}, turns[1]]}),
         "no-placeholder", "0 '<image>' placeholders"),
        (json.dumps({"id": "robot", "image": img, "conversations": [{"from": "robot", "value": "<image>q"}, turns[1]]}),
         "robot", "speaker 'robot'"),
        (json.dumps({"id": "only-question", "image": img, "conversations": turns[:1]}), "only-question",
         "no assistant"),
        (json.dumps({"id": "turns-not-objects", "image": img, "conversations": ["<image>q", "a"]}),
         "turns-not-objects", "must be a list of"),
        (json.dumps({"image": img, "conversations": turns}), ":9", "no 'id' field"),
        (b'{"id": "latin1", "image": "' + img.encode() + b'", "conversations": "caf\xe9"}', ":10", "not UTF-8"),
        (b'{"id": "cut", "image": ', ":11", "not valid JSON"),
        (b"[1, 2]", ":12", "a JSON list, expected an object"),
    ]
    return good, [(b.encode() if isinstance(b, str) else b, key, why) for b, key, why in bad]


def test_malformed_records_are_set_aside_when_asked(demo_dir, tmp_path):
    """With an errors list (the teacher pass), every malformed record is left out and listed
    with its id (or file:line, JSONL lines counted from 1, when it has none) and the reason; the good records
    read as usual. Without one (trainer, evaluation), the first is refused, naming it."""
    good, bad = _malformed_records(demo_dir)
    lines = [json.dumps(good[0]).encode(), *[b for b, _, _ in bad[:6]], json.dumps(good[1]).encode(),
             *[b for b, _, _ in bad[6:]], json.dumps(good[2]).encode()]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    errors = []
    samples = read_inputs(str(path), image_root=str(demo_dir), errors=errors)
    assert [s.id for s in samples] == [r["id"] for r in good]
    assert [s.messages for s in samples] == [s.messages for s in read_llava(demo_dir / "train.json")[:3]]
    reasons = dict(errors)
    assert len(reasons) == len(errors) == len(bad)
    for _, key, why in bad:  # a record without an id is named by its place: file:line
        key = f"{path}{key}" if key.startswith((":", "#")) else key
        assert why in reasons[key], (key, reasons[key])
    with pytest.raises(SampleError, match=f"{path.name}: line 10 is not UTF-8 text"):  # lines parse first
        read_inputs(str(path), image_root=str(demo_dir))
    path.write_bytes(b"\n".join(lines[:9]))
    with pytest.raises(SampleError, match=f"sample empty .*{path.name}:2.*empty or missing 'conversations'"):
        read_inputs(str(path), image_root=str(demo_dir))

    # the same records as a JSON list: one malformed record does not lose the file either
    listed = [good[0], json.loads(bad[0][0]), 7, good[1]]
    (tmp_path / "list.json").write_text(json.dumps(listed))
    errors = []
    assert [s.id for s in read_inputs(str(tmp_path / "list.json"), image_root=str(demo_dir), errors=errors)] == \
        [good[0]["id"], good[1]["id"]]
    assert sorted(k for k, _ in errors) == sorted(["empty", f"{tmp_path / 'list.json'}#2"])
    (tmp_path / "broken.json").write_bytes(b'[{"id": "a"')  # one document: nothing to keep, refused either way
    with pytest.raises(SampleError, match="broken.json: not valid JSON"):
        read_inputs(str(tmp_path / "broken.json"), errors=[])

    # a data set (Parquet): rows with a null id, turns that are not JSON, wrong placeholders
    rows = [dict(r, image=(demo_dir / r["image"]).read_bytes(), conversations=json.dumps(r["conversations"]))
            for r in good]
    rows.insert(1, dict(rows[0], id=None))
    rows.insert(2, dict(rows[0], id="not-json", conversations="[{"))
    rows.insert(3, dict(rows[0], id="no-image-token", conversations=json.dumps([{"from": "human", "value": "q"},
                                                                              good[0]["conversations"][1]])))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    errors = []
    samples = read_inputs(str(tmp_path / "mixed.parquet"), errors=errors)
    assert [s.id for s in samples] == [r["id"] for r in good]
    assert [k for k, _ in errors] == [f"{tmp_path / 'mixed.parquet'}#1", "not-json", "no-image-token"]
    assert "id column 'id' is null" in errors[0][1] and "not JSON" in errors[1][1]
    assert "0 '<image>' placeholders" in errors[2][1]
    with pytest.raises(SampleError, match="mixed.parquet#1: the id column 'id' is null"):
        read_inputs(str(tmp_path / "mixed.parquet"))

    # preference pairs: a pair without its rejected answer is set aside by id
    pairs = [json.loads(x) for x in (demo_dir / "preference.jsonl").read_text().splitlines()[:2]]
    pairs.insert(1, dict(pairs[0], id="no-rejected", rejected=""))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    errors = []
    got = read_inputs(str(tmp_path / "pairs.jsonl"), pairs=True, image_root=str(demo_dir), errors=errors)
    assert [p.id for p in got] == [pairs[0]["id"], pairs[2]["id"]]
    assert errors[0][0] == "no-rejected" and "lacks ['rejected']" in errors[0][1]

