"""Teacher / student compatibility, checked before any GPU time is spent (`mmkd check`)
and when a student opens a cache (student.data.check_cache_compatible).

Offline distillation compares the teacher's targets with the student's logits position by
position and id by id. Anything that shifts a position (chat template, special tokens,
image-token expansion) or renames an id (vocabulary) would misalign every target without
an error; these checks name both sides and the setting to change instead.

Only configs and processors are read: no weights are loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from PIL import Image

from mmkd.common.models import is_text_only, load_processor
from mmkd.common.preprocess import IGNORE_INDEX, encode_sample, image_token_id, process_image, render
from mmkd.common.samples import Sample
from mmkd.storage.schema import collapse_image_runs

# A probe conversation: two turns, one image, so that templates, supervision and the
# image-token expansion are all exercised; text-only pairs get the same conversation without
# the image.
PROBE = Sample("probe", "probe.png", [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "And its colour?"},
    {"role": "assistant", "content": "Red."},
])
TEXT_PROBE = Sample("probe", None, [{"role": m["role"], "content": m["content"].replace("<image>\n", "")}
                                    for m in PROBE.messages])
# A square and two non-square sizes: any-resolution families expand them differently.
PROBE_SIZES = ((336, 336), (640, 360), (200, 500))


@dataclass
class Check:
    """One comparison: what, each side's value, whether it passed, and the fix when not.
    A failed check with fatal=False limits what can be trained (e.g. no visual terms)."""

    name: str
    teacher: str
    student: str
    ok: bool
    fix: str = ""
    fatal: bool = True

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("MISMATCH" if self.fatal else "limited")


def vocab_digest(tokenizer) -> str:
    """sha256 of the vocabulary as an id-ordered token list (ids and strings only, so the
    same vocabulary gives the same digest whatever the transformers version)."""
    tokens = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def shared_vocab_size(processor, head_size: int) -> int:
    """The vocabulary teacher targets live in: the tokenizer's ids that the output head
    (head_size rows) scores. Checkpoints pad their head past the tokenizer (LLaVA-1.5 32,064
    rows for 32,002 tokens; Qwen2-VL 151,936 for about 151.7k); padded rows are no tokens, so
    extraction leaves them out and every cached id is < this number."""
    return min(len(processor.tokenizer), head_size)


def _special(tokenizer) -> dict[str, str]:
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        tok = getattr(tokenizer, name, None)
        if tok is not None:
            out[name] = f"{tok}={tokenizer.convert_tokens_to_ids(tok)}"
    return out


def _vocab_check(t_tok, s_tok) -> Check:
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    moved = [tok for tok, i in tv.items() if tok in sv and sv[tok] != i]
    only_t = [tok for tok in tv if tok not in sv]
    ok = not moved and not only_t
    detail = f"{len(tv)} tokens"
    s_detail = f"{len(sv)} tokens" + (f"; {len(moved)} at other ids (e.g. {moved[:3]})" if moved else "") \
        + (f"; {len(only_t)} of the teacher's missing (e.g. {only_t[:3]})" if only_t else "")
    return Check("vocabulary (token -> id)", detail, s_detail, ok,
                 "the student must use the teacher's tokenizer (its own may add tokens after the teacher's ids)")


def compare_processors(teacher, student) -> list[Check]:
    """Vocabulary, special tokens, chat template, image token, the probe conversation's
    token sequence and labels, and the visual-token count of probe images (a pair with a
    text-only side: the probe without its image, no visual-token count)."""
    checks = [_vocab_check(teacher.tokenizer, student.tokenizer)]
    ts, ss = _special(teacher.tokenizer), _special(student.tokenizer)
    checks.append(Check("special tokens", json.dumps(ts), json.dumps(ss), ts == ss,
                        "use the teacher's tokenizer files (special_tokens_map / tokenizer_config.json)"))
    t_img, s_img = image_token_id(teacher), image_token_id(student)
    text_only = is_text_only(teacher) or is_text_only(student)
    checks.append(Check("image token", f"{teacher.image_token}={t_img}" if t_img is not None else "none (text-only)",
                        f"{student.image_token}={s_img}" if s_img is not None else "none (text-only)",
                        (teacher.image_token, t_img) == (student.image_token, s_img),
                        "use the teacher's tokenizer and processor_config.json (image_token); a text-only student "
                        "needs a text-only teacher (and the other way round)"))
    probe, image = (TEXT_PROBE, None) if text_only else (PROBE, Image.new("RGB", PROBE_SIZES[0], (200, 30, 30)))
    t_text = render(teacher, probe.messages, add_generation_prompt=False)
    s_text = render(student, probe.messages, add_generation_prompt=False)
    checks.append(Check("chat template (probe rendering)", _short(t_text), _short(s_text), t_text == s_text,
                        "copy the teacher's chat template (chat_template.jinja) into the student's processor folder"))
    try:
        te, se = encode_sample(teacher, probe, image, 1 << 20), encode_sample(student, probe, image, 1 << 20)
        # as the trainer compares: text tokens, each image's run of visual tokens as one
        t_text, s_text = collapse_image_runs(te.input_ids, t_img), collapse_image_runs(se.input_ids, s_img)
        t_sup, s_sup = int((te.labels != IGNORE_INDEX).sum()), int((se.labels != IGNORE_INDEX).sum())
        same = len(t_text) == len(s_text) and (t_text == s_text).all() and t_sup == s_sup
        checks.append(Check("probe sequence + supervised tokens", f"{len(t_text)} text tokens, {t_sup} supervised",
                            f"{len(s_text)} text tokens, {s_sup} supervised", bool(same),
                            "the targets would be misaligned: give the student the teacher's tokenizer, chat "
                            "template and image-token expansion"))
    except Exception as e:  # a processor that cannot encode the probe says why
        checks.append(Check("probe sequence + supervised tokens", "", f"cannot encode: {e}", False,
                            "fix the processor folder"))
    if text_only:
        return checks
    t_n = [process_image(teacher, Image.new("RGB", size))[0] for size in PROBE_SIZES]
    s_n = [process_image(student, Image.new("RGB", size))[0] for size in PROBE_SIZES]
    sizes = ", ".join(f"{w}x{h}" for w, h in PROBE_SIZES)
    checks.append(Check(f"visual tokens per image ({sizes})", str(t_n), str(s_n), t_n == s_n,
                        "response KD works; the visual terms (MDist visual KL, RDist) need the teacher's image "
                        "resolution, patch grid and tiling: set visual_weight=0 and relation_weight=0 or match them",
                        fatal=False))
    return checks


def compare_models(student_config, vocab_size: int, vocab_side: str, max_length: int | None,
                   length_side: str) -> list[Check]:
    """The student's output head must score the shared vocabulary (vocab_size ids) and its
    positions must hold max_length tokens (the longest sequence it will see); the *_side
    strings say where the teacher column's numbers come from."""
    s_text = student_config.get_text_config()
    checks = [Check("output head rows >= shared vocabulary", f"{vocab_side}: {vocab_size} ids", str(s_text.vocab_size),
                    s_text.vocab_size >= vocab_size,
                    "the student's head must cover the teacher's tokenizer (resize_token_embeddings)")]
    s_pos = getattr(s_text, "max_position_embeddings", None)
    if s_pos is not None and max_length:
        # past its trained positions a RoPE model runs on without an error, badly
        checks.append(Check("positions >= longest sequence", f"{length_side}: {max_length} tokens",
                            f"{s_pos} positions", s_pos >= max_length,
                            f"use max_length <= {s_pos} (longer samples are then refused, not truncated) or a "
                            "student with more positions"))
    return checks


def longest_sequence(cache) -> int:
    """The longest input sequence (tokens) held in a cache; reads only the input_ids column."""
    import pyarrow.compute as pc

    longest = 0
    for shard in cache.manifest.shards:
        lengths = pc.list_value_length(cache.read_shard(shard, ["input_ids"]).column("input_ids"))
        longest = max(longest, pc.max(lengths).as_py() or 0)
    return longest


def compare_with_cache(cache, student, student_config=None) -> list[Check]:
    """A student processor (and config) against what a cache (storage.reader.TeacherCache)
    recorded."""
    manifest = cache.manifest
    p = manifest.processor
    checks = []
    if "vocab_sha256" in p:
        checks.append(Check("vocabulary (cache digest)", p["vocab_sha256"][:12], vocab_digest(student.tokenizer)[:12],
                            p["vocab_sha256"] == vocab_digest(student.tokenizer),
                            "the student must use the tokenizer of the teacher that made the cache"))
    s_img = image_token_id(student)
    checks.append(Check("image token (cache)", str(p.get("image_token_id")), str(s_img),
                        p.get("image_token_id") == s_img,
                        "use the teacher's tokenizer and processor (a text-only cache needs a text-only student)"))
    checks.append(Check("chat template (cache digest)", str(p.get("chat_template_sha256"))[:12],
                        str(_template_digest(student))[:12], p.get("chat_template_sha256") == _template_digest(student),
                        "copy the teacher's chat template; samples whose tokens differ are refused one by one",
                        fatal=False))
    temp = float(manifest.extraction.get("temperature", 1.0))
    checks.append(Check("temperature", str(temp), "1.0", temp == 1.0, "re-run the teacher pass with --temperature 1"))
    if student_config is not None:
        checks += compare_models(student_config, manifest.vocab_size, "cache", longest_sequence(cache), "cache")
    return checks


def _template_digest(processor) -> str | None:
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    return None if template is None else hashlib.sha256(template.encode()).hexdigest()


def _short(text: str, n: int = 40) -> str:
    return json.dumps(text[:n] + ("..." if len(text) > n else ""))


def load_side(path: str, trust_remote_code: bool = False):
    """(processor, config or None) of a model or processor folder; no weights loaded."""
    from pathlib import Path

    from transformers import AutoConfig

    processor = load_processor(path, trust_remote_code)
    config = None
    if (Path(path) / "config.json").exists():
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return processor, config


def run_checks(teacher: str, student: str, cache: str | None = None, max_length: int | None = None,
               trust_remote_code: bool = False) -> list[Check]:
    """Every check `mmkd check` prints: teacher vs student (max_length: the longest sample
    planned, if known), and the student vs a cache (its longest sequence)."""
    from mmkd.storage.reader import TeacherCache

    t_proc, t_cfg = load_side(teacher, trust_remote_code)
    s_proc, s_cfg = load_side(student, trust_remote_code)
    checks = compare_processors(t_proc, s_proc)
    if t_cfg is not None and s_cfg is not None:
        head = t_cfg.get_text_config().vocab_size
        checks += compare_models(s_cfg, shared_vocab_size(t_proc, head), f"head {head}", max_length, "--max-length")
    if cache:
        checks += compare_with_cache(TeacherCache(cache), s_proc, s_cfg)
    return checks


def format_checks(checks: list[Check]) -> str:
    rows = [("check", "teacher", "student", "status")] + [(c.name, c.teacher, c.student, c.status) for c in checks]
    widths = [min(48, max(len(r[i]) for r in rows)) for i in range(4)]
    lines = ["  ".join(str(v)[:w].ljust(w) for v, w in zip(r, widths)) for r in rows]
    for c in checks:
        if not c.ok:
            lines.append(f"{c.status}: {c.name}: {c.fix}")
    return "\n".join(lines)
