"""Students built the way LLaVA-KD and LLaVA-MoD build them: a pretrained small LLM, the
teacher's vision tower (copied) and a new projector, composed by `mmkd train`, saved as an
ordinary HF folder and checked against the teacher by `mmkd check`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmkd.common.models import TextProcessor
from mmkd.pipelines.cli import main
from mmkd.student.config import LlavaArch
from mmkd.student.model import build_student

from tests.conftest import TINY


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, processor):
    """A 'pretrained' text-only LLM: another width than the teacher's LLM, and one id fewer
    than the teacher's tokenizer (the LLM's own tokenizer lacks the image token)."""
    d = tmp_path_factory.mktemp("llm")
    arch = LlavaArch(text_hidden=48, text_layers=2, text_heads=2, text_intermediate=96)
    model = build_student(arch, TextProcessor(processor.tokenizer), seed=5)
    model.resize_token_embeddings(len(processor.tokenizer) - 1)
    model.save_pretrained(d)
    processor.tokenizer.save_pretrained(d)  # its own tokenizer: the teacher's ids
    return d


def _swapped_tokenizer_llm(llm_dir, tokenizer, out):
    """llm_dir's weights with a tokenizer whose first two word ids are swapped."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(llm_dir, out)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = [t for t in vocab if not t.startswith("<")][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec))).save_pretrained(out)
    return out


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _part(state: dict, key: str) -> dict:
    return {k.split(key, 1)[1]: v for k, v in state.items() if key in k}


def test_train_composes_the_student_saves_it_and_check_accepts_the_pair(llm_dir, teacher_dir, demo_dir, tmp_path,
                                                                        capsys):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "dpt"
    args = ["train", "--student-llm", str(llm_dir), "--vision-from", str(teacher_dir), "--processor", str(teacher_dir),
            "--data", str(demo_dir / "train.json"), "--image-root", str(demo_dir), "--output-dir", str(out),
            "--trainable", "projector", "--max-steps", "2", "--batch-size", "8", "--num-workers", "0",
            "--save-every", "0", "--report-to", "none", "--lr", "0.01"]
    assert main(args) == 0
    init = AutoModelForImageTextToText.from_pretrained(out / "init")
    assert init.config.text_config.hidden_size == 48 and init.config.vision_config.hidden_size == TINY.vision_hidden
    assert init.get_input_embeddings().weight.shape[0] == 49  # grown to the teacher's tokenizer

    teacher, llm, built = _weights(teacher_dir), _weights(llm_dir), _weights(out / "init")
    tower_t, tower_s = _part(teacher, "vision_tower."), _part(built, "vision_tower.")
    assert tower_s.keys() == tower_t.keys() and all(torch.equal(tower_s[k], tower_t[k]) for k in tower_t)
    lm_s = _part(built, "language_model.")  # the LLM's own tensor names under language_model. (head included)
    assert lm_s.keys() == llm.keys()
    for k, v in llm.items():
        assert torch.equal(lm_s[k][: v.shape[0]], v), k  # embeddings and head: the LLM's rows, then the new one
    proj = _part(built, "multi_modal_projector.")
    assert proj["linear_1.weight"].shape == (48, TINY.vision_hidden) and proj["linear_2.weight"].shape == (48, 48)

    # the DPT stage trained the projector only
    trained = _weights(out)
    assert not torch.equal(_part(trained, "multi_modal_projector.")["linear_1.weight"], proj["linear_1.weight"])
    for key in ("vision_tower.", "language_model."):
        before, after = _part(built, key), _part(trained, key)
        assert all(torch.equal(after[k], v) for k, v in before.items()), key
    capsys.readouterr()
    assert main(["check", str(teacher_dir), str(out / "init")]) == 0
    assert "MISMATCH" not in capsys.readouterr().out


def test_composition_settings_are_refused_at_the_door(llm_dir, teacher_dir, demo_dir, processor, tmp_path, capsys):
    base = ["train", "--processor", str(teacher_dir), "--data", str(demo_dir / "train.json"), "--image-root",
            str(demo_dir), "--output-dir", str(tmp_path / "x"), "--num-workers", "0"]
    for extra, words in ((["--student-llm", str(llm_dir)], "--student-llm"),
                         (["--vision-from", str(teacher_dir)], "--vision-from"),
                         (["--student-llm", str(llm_dir), "--vision-from", str(teacher_dir), "--init-from",
                           str(teacher_dir)], "two starting points"),
                         (["--student-llm", str(llm_dir), "--vision-from", str(teacher_dir), "--projector-act",
                           "wiggle"], "--projector-act 'wiggle'")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    # a text-only model cannot give a vision tower; a multimodal one is not an LLM to build on
    assert main([*base, "--student-llm", str(teacher_dir), "--vision-from", str(teacher_dir), "--max-steps", "1"]) == 2
    assert "--student-llm" in capsys.readouterr().err
    assert main([*base, "--student-llm", str(llm_dir), "--vision-from", str(llm_dir), "--max-steps", "1"]) == 2
    assert "--vision-from" in capsys.readouterr().err
    swapped = _swapped_tokenizer_llm(llm_dir, processor.tokenizer, tmp_path / "swapped")
    assert main([*base, "--student-llm", str(swapped), "--vision-from", str(teacher_dir), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--student-llm" in err and "2 of its tokenizer's" in err and "same family" in err
    assert not (tmp_path / "x" / "init").exists()
    assert json.loads((teacher_dir / "config.json").read_text())["model_type"] == "llava"
