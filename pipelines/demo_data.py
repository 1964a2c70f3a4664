"""The embedded demo data set: synthetic visual question answering on coloured shapes.

Every image is a 32x32 canvas cut into a 2x2 grid; 1-4 cells hold one shape each (a
distinct colour/shape pair per image). Questions ask about colour, shape, count, absolute
and relative position and existence, all with short answers, plus a one-sentence
description task. Preference pairs reuse the description task: the chosen answer is the
true description, the rejected one names a colour or shape that is not in the image (a
hallucination, as in RLAIF-V / POPE-style data).

Output is the LLaVA conversation format, so the reader that serves real LLaVA data
serves this too::

    {"id": "train-000001", "image": "images/train-000001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "red"}],
     "task": "color"}

Preference JSONL rows: ``{"id", "image", "question", "chosen", "rejected"}``.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major 2x2 grid
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
IMAGE_SIZE = 32  # with 16-pixel patches: one visual token per grid cell
TASKS = ("color", "shape", "count", "where", "left_of", "exists", "describe")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cell: int  # index into CELLS

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def random_scene(rng: random.Random) -> list[Obj]:
    """1-4 objects in distinct cells with distinct (colour, shape) pairs, in cell order."""
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), n))
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    return [Obj(c, s, cell) for (c, s), cell in zip(pairs, cells)]


def draw_scene(objs: list[Obj], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for o in objs:
        x0, y0 = (o.cell % 2) * half, (o.cell // 2) * half
        r = rng.randint(6, 7)  # a little jitter in size and place
        cx, cy = x0 + half // 2 + rng.randint(-1, 0), y0 + half // 2 + rng.randint(-1, 0)
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:  # triangle
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def describe(objs: list[Obj]) -> str:
    parts = [f"a {o.name} at the {CELLS[o.cell]}" for o in objs]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"there is {body}."


def hallucinated_description(objs: list[Obj], rng: random.Random) -> str:
    """The true description with one object's colour or shape swapped for one absent
    from the image, so the sentence names something that is not there."""
    i = rng.randrange(len(objs))
    o = objs[i]
    absent_shapes = [s for s in SHAPES if s not in {x.shape for x in objs}]
    if rng.random() < 0.5 or not absent_shapes:  # 6 colours > 4 objects: one is always absent
        absent = [c for c in COLORS if c not in {x.color for x in objs}]
        wrong = Obj(rng.choice(absent), o.shape, o.cell)
    else:
        wrong = Obj(o.color, rng.choice(absent_shapes), o.cell)
    return describe(objs[:i] + [wrong] + objs[i + 1 :])


def make_question(objs: list[Obj], task: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of the given task for this scene, or None if it does not apply."""
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    if task == "color":
        unique = [o for o in objs if shapes.count(o.shape) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"what color is the {o.shape}?", o.color
    if task == "shape":
        unique = [o for o in objs if colors.count(o.color) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"what shape is the {o.color} object?", o.shape
    if task == "count":
        return "how many shapes are there?", NUMBER_WORDS[len(objs)]
    if task == "where":
        o = rng.choice(objs)
        return f"where is the {o.name}?", CELLS[o.cell]
    if task == "left_of":
        if len(objs) < 2:
            return None
        a, b = rng.sample(objs, 2)
        left = a.cell % 2 < b.cell % 2
        return f"is the {a.name} left of the {b.name}?", "yes" if left else "no"
    if task == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return f"is there a {o.name}?", "yes"
        present = {(o.color, o.shape) for o in objs}
        c, s = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        return f"is there a {c} {s}?", "no"
    if task == "describe":
        return "describe the image.", describe(objs)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_sample(sample_id: str, rng: random.Random, image_dir: Path, image_root: Path) -> dict:
    objs = random_scene(rng)
    # The description task is long; keep it rarer so short answers dominate, as in VQA.
    weights = [3, 3, 2, 2, 2, 3, 1]
    while True:
        task = rng.choices(TASKS, weights)[0]
        qa = make_question(objs, task, rng)
        if qa is not None:
            break
    path = image_dir / f"{sample_id}.png"
    draw_scene(objs, rng).save(path)
    q, a = qa
    return {
        "id": sample_id,
        "image": str(path.relative_to(image_root)),
        "conversations": [
            {"from": "human", "value": f"<image>\n{q}"},
            {"from": "gpt", "value": a},
        ],
        "task": task,
    }


def make_preference_pair(pair_id: str, rng: random.Random, image_dir: Path, image_root: Path) -> dict:
    objs = random_scene(rng)
    path = image_dir / f"{pair_id}.png"
    draw_scene(objs, rng).save(path)
    return {
        "id": pair_id,
        "image": str(path.relative_to(image_root)),
        "question": "describe the image.",
        "chosen": describe(objs),
        "rejected": hallucinated_description(objs, rng),
    }


def write_demo_dataset(
    out_dir: str | Path,
    num_train: int = 3000,
    num_val: int = 200,
    num_test: int = 400,
    num_preference: int = 400,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``{train,val,test}.json``, ``preference.jsonl`` and ``images/`` under out_dir.

    The image paths inside the JSON are relative to out_dir (the image root). Returns the
    paths written. Re-running with the same arguments rewrites identical files.
    """
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, offset in (("train", num_train, 0), ("val", num_val, 1), ("test", num_test, 2)):
        rng = random.Random(f"{seed}-{offset}")  # independent stream per split
        rows = [make_sample(f"{split}-{i:06d}", rng, image_dir, out) for i in range(n)]
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(rows, indent=1))
    rng = random.Random(f"{seed}-pref")
    pairs = [make_preference_pair(f"pref-{i:06d}", rng, image_dir, out) for i in range(num_preference)]
    paths["preference"] = out / "preference.jsonl"
    paths["preference"].write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return paths


def corpus_words() -> list[str]:
    """Every word the generator can emit, for building the demo tokenizer's vocabulary."""
    words = set(COLORS) | set(SHAPES) | set(NUMBER_WORDS) | {"yes", "no"}
    for phrase in CELLS:
        words.update(phrase.split())
    templates = (
        "what color is the shape object how many shapes are there where is left of "
        "is there a describe image at the and user assistant"
    )
    words.update(templates.split())
    return sorted(words)
