"""`mmkd check` and the compatibility refusals when a student opens a cache: each mismatch
that would misalign targets is reported naming both sides; harmless differences pass."""

import json
import shutil

import pytest
import torch
from transformers import AutoProcessor

from mmkd.common.inputs import SampleList, load_image
from mmkd.common.preprocess import collate, encode_sample, image_token_count, image_token_id
from mmkd.common.samples import read_llava
from mmkd.pipelines.cli import main
from mmkd.storage.manifest import Manifest
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.writer import CacheWriter
from mmkd.student.data import StudentData
from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, to_device
from mmkd.teacher_cache.teacher import load_teacher, processor_description


@pytest.fixture(scope="module")
def cache_dir(teacher_dir, demo_dir, tmp_path_factory):
    """A 6-sample cache whose manifest describes the teacher's processor like a teacher pass does."""
    out = tmp_path_factory.mktemp("check_cache")
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    samples = read_llava(demo_dir / "train.json")[:6]
    m = Manifest(teacher={"path": str(teacher_dir), "weights_sha256": "x", "dtype": "float32"},
                 processor=processor_description(processor, image_token_count(processor)),
                 vocab_size=len(processor.tokenizer),
                 extraction={"mode": "topk", "k": 4, "temperature": 1.0, "record_kinds": ["response"],
                             "max_length": 256})
    w = CacheWriter(str(out), m)
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in samples]
    w.add(extract_rows(model, to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32),
                       [s.id for s in samples], image_token_id(processor), ExtractionSpec(k=4)))
    w.close(complete=True)
    return out


def _variant(src, dst, edit_tokenizer=None, edit_template=None, edit_preprocessor=None, edit_config=None):
    """A copy of a model/processor folder with one file edited."""
    shutil.copytree(src, dst)
    for name, edit in (("tokenizer.json", edit_tokenizer), ("chat_template.jinja", edit_template),
                       ("processor_config.json", edit_preprocessor), ("config.json", edit_config)):
        if edit is not None:
            p = dst / name
            data = json.loads(p.read_text()) if name.endswith(".json") else p.read_text()
            data = edit(data)
            p.write_text(json.dumps(data) if name.endswith(".json") else data)
    return dst


def _run(capsys, *args):
    rc = main(["check", *map(str, args)])
    return rc, capsys.readouterr().out


def _status(out: str, name: str) -> str:
    line = next(ln for ln in out.splitlines() if ln.startswith(name))
    return line.split()[-1]


def test_same_tokenizer_and_template_are_compatible(teacher_dir, cache_dir, capsys):
    rc, out = _run(capsys, teacher_dir, teacher_dir, "--cache", cache_dir)
    assert rc == 0 and out.strip().endswith("compatible")
    assert "MISMATCH" not in out and "vocabulary (cache digest)" in out


def test_a_permuted_vocabulary_is_refused_by_check_and_by_the_trainer(teacher_dir, cache_dir, demo_dir, tmp_path,
                                                                       capsys):
    def swap(tok):  # "red" and "blue" trade ids: every text still tokenizes, to other ids
        v = tok["model"]["vocab"]
        v["red"], v["blue"] = v["blue"], v["red"]
        return tok

    student = _variant(teacher_dir, tmp_path / "s", edit_tokenizer=swap)
    rc, out = _run(capsys, teacher_dir, student, "--cache", cache_dir)
    assert rc == 1
    assert _status(out, "vocabulary (token -> id)") == "MISMATCH"
    assert _status(out, "vocabulary (cache digest)") == "MISMATCH"
    assert "at other ids" in out and ("'red'" in out or "'blue'" in out)
    # The trainer refuses at open, before any step: per-sample token checks would miss the
    # swapped ids in every sample whose text holds neither word, yet its targets name them.
    with pytest.raises(CacheError, match="vocabulary .*token -> id.* is not the one of the teacher"):
        StudentData(SampleList(read_llava(demo_dir / "train.json")[:6]), AutoProcessor.from_pretrained(student),
                    str(demo_dir), 256, TeacherCache(cache_dir))


def test_another_chat_template_is_a_mismatch_naming_both_renderings(teacher_dir, tmp_path, capsys):
    student = _variant(teacher_dir, tmp_path / "s", edit_template=lambda t: t.replace("USER: ", "HUMAN: "))
    rc, out = _run(capsys, teacher_dir, student)
    assert rc == 1
    assert _status(out, "chat template (probe rendering)") == "MISMATCH"
    assert _status(out, "probe sequence + supervised tokens") == "MISMATCH"
    line = next(ln for ln in out.splitlines() if ln.startswith("chat template"))
    assert "USER:" in line and "HUMAN:" in line
    assert "copy the teacher's chat template" in out


def test_another_image_resolution_limits_the_visual_terms_only(teacher_dir, tmp_path, capsys):
    def bigger(cfg):  # 64x64 crops instead of 32x32: 4x the visual tokens
        cfg["image_processor"]["crop_size"] = {"height": 64, "width": 64}
        cfg["image_processor"]["size"] = {"shortest_edge": 64}
        return cfg

    student = _variant(teacher_dir, tmp_path / "s", edit_preprocessor=bigger)
    assert image_token_count(AutoProcessor.from_pretrained(student)) == 4 * image_token_count(
        AutoProcessor.from_pretrained(teacher_dir))
    rc, out = _run(capsys, teacher_dir, student)
    assert rc == 0  # response KD still works
    assert _status(out, "visual tokens per image") == "limited"
    assert "set visual_weight=0 and relation_weight=0" in out


def test_student_heads_and_positions_are_checked(teacher_dir, cache_dir, tmp_path, capsys):
    def small(cfg):
        cfg["text_config"]["vocab_size"] -= 1  # one row short of the teacher's vocabulary
        cfg["text_config"]["max_position_embeddings"] = 16  # shorter than the cache's sequences
        return cfg

    student = _variant(teacher_dir, tmp_path / "s", edit_config=small)
    rc, out = _run(capsys, teacher_dir, student, "--cache", cache_dir)
    assert rc == 1
    assert _status(out, "output head rows >= shared vocabulary") == "MISMATCH"
    longest = max(len(r.input_ids) for r in TeacherCache(cache_dir).iter_rows())
    line = next(ln for ln in out.splitlines() if ln.startswith("positions >= longest sequence"))
    assert f"cache: {longest} tokens" in line and "16 positions" in line and line.endswith("MISMATCH")


def test_an_unreadable_side_is_an_error_not_a_traceback(teacher_dir, tmp_path, capsys):
    rc = main(["check", str(teacher_dir), str(tmp_path / "missing")])
    assert rc == 2 and "cannot open a side" in capsys.readouterr().err
