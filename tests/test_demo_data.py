import json
import random

from PIL import Image

from mmkd.common.samples import read_llava
from mmkd.pipelines.demo_data import (
    CELLS,
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    describe,
    draw_scene,
    make_question,
    random_scene,
    write_demo_dataset,
)


def test_dataset_is_deterministic_by_seed(tmp_path):
    a = write_demo_dataset(tmp_path / "a", 12, 4, 4, 4, seed=7)
    b = write_demo_dataset(tmp_path / "b", 12, 4, 4, 4, seed=7)
    c = write_demo_dataset(tmp_path / "c", 12, 4, 4, 4, seed=8)
    for split in ("train", "val", "test", "preference"):
        assert a[split].read_text() == b[split].read_text()
    assert a["train"].read_text() != c["train"].read_text()
    img_a = Image.open(tmp_path / "a" / "images" / "train-000003.png").tobytes()
    assert img_a == Image.open(tmp_path / "b" / "images" / "train-000003.png").tobytes()


def test_llava_format_and_splits_are_disjoint(tmp_path):
    paths = write_demo_dataset(tmp_path, 20, 5, 5, 3, seed=1)
    ids = set()
    for split in ("train", "val", "test"):
        samples = read_llava(paths[split])
        raw = json.loads(paths[split].read_text())
        assert raw[0]["conversations"][0]["from"] == "human"
        assert raw[0]["conversations"][0]["value"].startswith("<image>\n")
        assert raw[0]["conversations"][1]["from"] == "gpt"
        assert all((tmp_path / s.image).exists() for s in samples)
        assert not ids & {s.id for s in samples}
        ids |= {s.id for s in samples}


def test_answers_are_true_of_the_drawn_scene():
    rng = random.Random(0)
    for _ in range(300):
        objs = random_scene(rng)
        img = draw_scene(objs, random.Random(1))
        for o in objs:  # the cell centre has the object's colour
            cx, cy = (o.cell % 2) * 16 + 7, (o.cell // 2) * 16 + 8
            assert img.getpixel((cx, cy)) == COLORS[o.color]
        q, a = make_question(objs, "count", rng)
        assert a == NUMBER_WORDS[len(objs)]
        for task in ("color", "shape", "where", "left_of", "exists"):
            qa = make_question(objs, task, rng)
            if qa is None:
                continue
            q, a = qa
            if task == "color":
                assert a in COLORS and any(o.color == a and o.shape in q for o in objs)
            if task == "where":
                assert a in CELLS
            if task == "exists":
                named = q.removeprefix("is there a ").removesuffix("?")
                assert (a == "yes") == any(o.name == named for o in objs)


def test_preference_rejected_answers_hallucinate(tmp_path):
    paths = write_demo_dataset(tmp_path, 1, 1, 1, 40, seed=2)
    for line in paths["preference"].read_text().splitlines():
        pair = json.loads(line)
        assert pair["chosen"] != pair["rejected"]
        chosen_words = set(pair["chosen"].replace(",", "").replace(".", "").split())
        rejected_words = set(pair["rejected"].replace(",", "").replace(".", "").split())
        extra = rejected_words - chosen_words
        assert extra and extra <= set(COLORS) | set(SHAPES), (pair, extra)


def test_describe_reads_in_cell_order():
    from mmkd.pipelines.demo_data import Obj

    assert describe([Obj("red", "circle", 0), Obj("blue", "square", 3)]) == (
        "there is a red circle at the top left and a blue square at the bottom right.")
