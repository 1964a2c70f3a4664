"""Reading inputs: the one entry point the teacher pass, the trainer and evaluation use.

    read_inputs(data, pairs=False, image_root="", split=None, image_column="image", id_column="id")
        -> list[Sample]           (LLaVA conversations; every assistant turn is supervised)
        -> list[PreferencePair]   (pairs=True: the RLAIF-V layout)

`data` is recognised by its form:

- ``*.json`` / ``*.jsonl``: LLaVA conversation records ({"id", "image", "conversations":
  [{"from", "value"}, ...]}) or, with pairs=True, preference records ({"id", "image",
  "question", "chosen", "rejected"}); "image" is a path relative to image_root.
- a folder written by ``datasets``' ``save_to_disk``: a Dataset, or a DatasetDict (choose
  the split with `split`; a DatasetDict with one split needs none). Opened with
  ``load_from_disk``: memory-mapped, nothing is copied.
- ``*.parquet``: one file, a folder of them (searched recursively) or a glob pattern;
  `split` keeps the files of that split (a folder named after it, or file names starting
  with ``<split>-`` / ``<split>_`` / ``<split>.``, as on the Hugging Face Hub). Converted
  once by ``datasets`` into its memory-mapped Arrow cache (``HF_DATASETS_CACHE``, by
  default ~/.cache/huggingface/datasets), which later opens reuse.

Rows of the last two have the same fields as the JSON records (column names). The image
column (`image_column`) holds per row a path string (resolved inside image_root, like
JSON), raw encoded bytes, the Hugging Face ``Image`` feature (a {bytes, path} struct:
bytes win, else the path), or null (no image). Embedded bytes are NOT read here: the
sample gets an ImageRef (data set, split, row, column) and load_image decodes that one
cell when the sample is encoded, in whichever process encodes it, the data set being
opened once per process (open_dataset). Other columns go to Sample.meta when their values
are JSON (e.g. "task", used by evaluation per task).

Every reader refuses duplicate ids, names the file (and row) of a bad record, and says
what was expected; a data set whose image paths need a root refuses an empty image_root.
Given an ``errors`` list, the readers set malformed records aside instead of refusing the
whole input (the teacher pass quarantines them: pipelines/quarantine.py).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from mmkd.common.samples import (
    ImageRef,
    PreferencePair,
    Sample,
    SampleError,
    check_unique_ids,
    decode_image,
    read_llava,
    read_preference,
    refuse_or_set_aside,
    resolve_image,
)

_BATCH = 4096  # rows converted per step while reading a data set

_open: dict[tuple, object] = {}  # (pid, data, split[, columns]) -> datasets.Dataset, per process
_lock = threading.Lock()


def detect_format(data: str) -> str:
    """"json" (.json / .jsonl), "hf" (a save_to_disk folder) or "parquet" (a .parquet file,
    a folder holding some, or a glob); SampleError saying what is accepted otherwise."""
    p = Path(data)
    if p.suffix in (".json", ".jsonl") and p.is_file():
        return "json"
    if any(c in data for c in "*?["):
        return "parquet"
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "hf"
        if next(p.rglob("*.parquet"), None) is not None:
            return "parquet"
    elif p.suffix == ".parquet" and p.is_file():
        return "parquet"
    what = "does not exist" if not p.exists() else "is not a recognised input"
    raise SampleError(f"{data}: {what}; expected a LLaVA / preference .json or .jsonl file, a folder written by "
                      "datasets' save_to_disk, or Parquet (a .parquet file, a folder of them, or a glob)")


def _split_of(rel: Path, split: str) -> bool:
    """Whether a Parquet file (path relative to the folder given) belongs to `split`."""
    return split in rel.parts[:-1] or any(rel.name.startswith(split + c) for c in "-_.")


def parquet_files(data: str, split: str | None = None) -> list[str]:
    """The Parquet files `data` names (a file, a folder searched recursively, or a glob),
    sorted, kept to `split` when given (see the module docstring)."""
    p = Path(data)
    if any(c in data for c in "*?["):
        files, base = sorted(glob.glob(data, recursive=True)), None
    elif p.is_dir():
        files, base = sorted(str(f) for f in p.rglob("*.parquet")), p
    else:
        files, base = [data], None
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise SampleError(f"{data}: no Parquet files found")
    if split is not None:
        kept = [f for f in files if _split_of(Path(f).relative_to(base) if base else Path(Path(f).name), split)]
        if not kept:
            raise SampleError(f"{data}: no Parquet file of split {split!r} (a folder named {split}/ or file names "
                              f"starting with '{split}-'); files: {[os.path.basename(f) for f in files[:10]]}")
        files = kept
    return [os.path.abspath(f) for f in files]


def _quiet_datasets():
    """datasets, with its progress bars off (restored by the caller via the returned flag)."""
    import datasets

    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    return datasets, was


def _open_uncached(data: str, split: str | None):
    datasets, was_quiet = _quiet_datasets()
    try:
        if detect_format(data) == "hf":
            try:
                obj = datasets.load_from_disk(data)
            except Exception as e:  # noqa: BLE001 - any failure to open becomes a message naming the folder
                raise SampleError(f"{data}: cannot open with datasets.load_from_disk: {e}") from e
            if isinstance(obj, datasets.DatasetDict):
                if split is None and len(obj) == 1:
                    split = next(iter(obj))
                if split not in obj:
                    raise SampleError(f"{data}: a DatasetDict with splits {list(obj)}; choose one with "
                                      f"--data-split{f' (there is no {split!r})' if split else ''}")
                return obj[split]
            if split is not None:
                raise SampleError(f"{data}: a single Dataset without splits; drop --data-split {split}")
            return obj
        files = parquet_files(data, split)
        try:
            return datasets.Dataset.from_parquet(files, split="train")
        except Exception as e:  # noqa: BLE001
            raise SampleError(f"{data}: cannot read the Parquet files {[os.path.basename(f) for f in files[:5]]} "
                              f"as one table: {e}") from e
    finally:
        if not was_quiet:
            datasets.enable_progress_bars()


def open_dataset(data: str, split: str | None = None):
    """The datasets.Dataset of a save_to_disk folder or Parquet input, opened once per
    process (memory-mapped Arrow; worker processes open their own) and reused."""
    key = (os.getpid(), data, split)
    with _lock:
        if key not in _open:
            _open[key] = _open_uncached(data, split)
        return _open[key]


def _cells_view(ref: ImageRef):
    """The data set of `ref` with only its id and image columns, in Arrow format (cached)."""
    key = (os.getpid(), ref.data, ref.split, ref.column, ref.id_column)
    with _lock:
        view = _open.get(key)
    if view is None:
        ds = open_dataset(ref.data, ref.split)
        view = ds.select_columns(list(dict.fromkeys([ref.id_column, ref.column]))).with_format("arrow")
        with _lock:
            _open[key] = view
    return view


def describe_row(ref: ImageRef) -> str:
    """Where a data set cell lives, for messages: the Parquet file and its row when the
    input is Parquet, else the data set folder and the row."""
    split = f" (split {ref.split})" if ref.split else ""
    if detect_format(ref.data) == "parquet":
        import pyarrow.parquet as pq

        row = ref.row
        for f in parquet_files(ref.data, ref.split):
            n = pq.ParquetFile(f).metadata.num_rows
            if row < n:
                return f"row {row} of {f}, column {ref.column!r}"
            row -= n
    return f"row {ref.row} of {ref.data}{split}, column {ref.column!r}"


def load_cell_image(ref: ImageRef, sample_id: str) -> Image.Image:
    """Decode the image in one data set cell (the path of load_image for ImageRef samples).

    Checks that the row still belongs to the sample (the data set may have changed since
    it was read) and raises SampleError naming the sample and the file otherwise, or when
    the bytes do not decode."""
    view = _cells_view(ref)
    if ref.row >= len(view):
        raise SampleError(f"sample {sample_id}: {ref.data} has {len(view)} rows now, not the {ref.row + 1}+ it "
                          "had when it was read; the data set changed during the run, restart it")
    t = view[ref.row]
    found = t.column(ref.id_column)[0].as_py()
    if str(found) != sample_id:
        raise SampleError(f"sample {sample_id}: {describe_row(ref)} now holds sample {found!r}; the data set "
                          "changed after it was read, restart the run")
    cell = t.column(ref.column)[0].as_py()
    if isinstance(cell, dict):  # the Hugging Face Image feature: {"bytes", "path"}
        cell = cell.get("bytes")
    if isinstance(cell, Image.Image):
        return cell.convert("RGB")
    if not isinstance(cell, (bytes, bytearray)):
        raise SampleError(f"sample {sample_id}: {describe_row(ref)} holds no image bytes")
    try:
        return decode_image(bytes(cell), f"sample {sample_id}")
    except SampleError as e:
        raise SampleError(f"{e} ({describe_row(ref)})") from e


def _image_cells(col, where: str, column: str) -> list:
    """Per row of an Arrow image column: a path string, True (encoded bytes in the cell)
    or None (no image). Reads validity bitmaps and path strings, never the bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_null(t):
        return [None] * len(col)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.to_pylist()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [True if v else None for v in pc.is_valid(col).to_pylist()]
    if pa.types.is_struct(t) and {"bytes", "path"} <= {t.field(i).name for i in range(t.num_fields)}:
        valid = pc.is_valid(col)
        has_bytes = pc.and_(valid, pc.is_valid(pc.struct_field(col, "bytes"))).to_pylist()
        paths = pc.if_else(valid, pc.struct_field(col, "path"), None).to_pylist()
        return [True if b else p for b, p in zip(has_bytes, paths)]
    raise SampleError(f"{where}: column {column!r} has type {t}; an image column holds paths (string), encoded "
                      "image bytes (binary) or the Hugging Face Image feature ({bytes, path}); name the right "
                      "one with --image-column (or '' for a data set without images)")


def _jsonable(v) -> bool:
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    if isinstance(v, list):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


def _fields(pairs: bool) -> list[str]:
    return ["question", "chosen", "rejected"] if pairs else ["conversations"]


def _check_columns(cols: list[str], where: str, pairs: bool, image_column: str, id_column: str) -> None:
    """Refuse a data set without the columns its layout needs, saying which flag names them."""
    fields = _fields(pairs)
    missing = [c for c in [id_column] + fields if c not in cols]
    if image_column and image_column not in cols:
        missing.append(image_column)
    if missing:
        layout = "preference" if pairs else "LLaVA conversation"
        hint = []
        if id_column in missing:
            hint.append("name the id column with --id-column")
        if image_column in missing:
            hint.append("name the image column with --image-column ('' for a data set without images)")
        if not pairs and {"chosen", "rejected"} <= set(cols):
            hint.append("these rows look like preference pairs: use --records preference / --objective preference")
        if pairs and "conversations" in cols:
            hint.append("these rows look like LLaVA conversations, not preference pairs")
        raise SampleError(f"{where}: no column(s) {missing}; {layout} rows need {[id_column] + fields}"
                          f"{f' and the image column {image_column!r}' if image_column else ''}; the columns are "
                          f"{cols}{'; ' + '; '.join(hint) if hint else ''}")


def _convert_rows(arrow, start: int, stop: int, data: str, split: str | None, where: str, pairs: bool,
                  image_column: str, id_column: str, errors: list | None = None) -> list:
    """Rows start..stop-1 of an Arrow-format data set -> Samples (or PreferencePairs); an
    embedded image becomes an ImageRef to its cell. errors as in read_inputs."""
    tb = arrow[start:stop]
    others = [c for c in tb.column_names if c != image_column]
    cells = _image_cells(tb.column(image_column), where, image_column) if image_column else [None] * len(tb)
    out = []
    for j, (row, cell) in enumerate(zip(tb.select(others).to_pylist(), cells)):
        i = start + j
        image = ImageRef(data, split, i, image_column, id_column) if cell is True else cell
        key = f"{where}#{i}" if row[id_column] is None else str(row[id_column])
        try:
            out.append(_row_item(row, image, id_column, _fields(pairs), pairs, f"{where}#{i}"))
        except SampleError as e:
            refuse_or_set_aside(errors, key, e)
    return out


def _read_dataset(data: str, pairs: bool, split: str | None, image_column: str, id_column: str,
                  errors: list | None = None) -> list:
    data = data if "://" in data else os.path.abspath(data)  # the ImageRefs' data: workers may have another cwd
    ds = open_dataset(data, split)
    where = f"{data}{f' (split {split})' if split else ''}"
    _check_columns(list(ds.column_names), where, pairs, image_column, id_column)
    arrow = ds.with_format("arrow")
    out = []
    for start in range(0, len(ds), _BATCH):
        out += _convert_rows(arrow, start, start + _BATCH, data, split, where, pairs, image_column, id_column, errors)
    check_unique_ids(out, where, "pair" if pairs else "sample")
    return out


def _row_item(row: dict, image, id_column: str, fields: list[str], pairs: bool, where: str):
    """One data set row -> a Sample (or PreferencePair); SampleError naming `where` if bad."""
    if row[id_column] is None:
        raise SampleError(f"{where}: the id column {id_column!r} is null; every sample needs an id")
    rec = {k: v for k, v in row.items()
           if k not in (id_column, "id", "image", *fields) and v is not None and _jsonable(v)}
    rec.update({"id": row[id_column], "image": image}, **{f: row[f] for f in fields})
    if pairs:
        return PreferencePair.from_record(rec, where)
    if isinstance(rec["conversations"], str):  # some data sets store the turns as a JSON string
        try:
            rec["conversations"] = json.loads(rec["conversations"])
        except json.JSONDecodeError as e:
            raise SampleError(f"{where}: 'conversations' is a string but not JSON: {e}") from e
    return Sample.from_llava(rec, where)


def read_inputs(data: str, pairs: bool = False, image_root: str = "", split: str | None = None,
                image_column: str = "image", id_column: str = "id", errors: list | None = None) -> list:
    """The samples (pairs=False) or preference pairs (pairs=True) of `data`, in the order
    of the file / data set; each has a unique .id. See the module docstring for the
    formats. split: the DatasetDict split or the Parquet files' split; image_column /
    id_column: the column (JSON key) of the image and of the unique id ("" image_column:
    no images). Refuses samples with image paths when image_root is empty.

    errors: None (the trainer, evaluation) refuses the input at its first bad record; a
    list (the teacher pass) receives (id, or "file#row" when the record has none, reason)
    for every malformed record, which is left out. Problems of the whole input (a missing
    column, duplicate ids, a .json file that does not parse) are refused either way."""
    data = str(data)
    fmt = detect_format(data)
    if fmt == "json":
        if split is not None:
            raise SampleError(f"{data}: a JSON file has no splits; drop --data-split {split}")
        reader = read_preference if pairs else read_llava
        items = reader(data, id_column=id_column, image_column=image_column, errors=errors)
    else:
        items = _read_dataset(data, pairs, split, image_column, id_column, errors)
    if not image_root:
        first = next((x for x in items if isinstance(x.image, str)), None)
        if first is not None:
            raise SampleError(f"{data}: sample {first.id} refers to the image file {first.image!r} but no image root "
                              "was given; set --image-root to the folder the image paths are relative to")
    return items


def read_config_inputs(inputs, pairs: bool = False, errors: list | None = None) -> list:
    """read_inputs of a common.config.InputsConfig (the `inputs` of the teacher pass's,
    training's and evaluation's configs)."""
    return read_inputs(inputs.data, pairs, inputs.image_root, inputs.data_split, inputs.image_column,
                       inputs.id_column, errors)


def input_identity(inputs, num_samples: int) -> dict:
    """A data source's portable identity (the cache manifest's `inputs`): its name (file or
    folder name), absolute path, the sha256 of a single data file (folders: None), the split
    and the number of samples read."""
    data = str(inputs.data)
    path = os.path.abspath(data) if os.path.exists(data) else data
    digest = None
    if os.path.isfile(data):
        h = hashlib.sha256()
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
    out = {"data": os.path.basename(path.rstrip("/")) or path, "path": path, "sha256": digest,
           "num_samples": num_samples}
    return out | ({"split": inputs.data_split} if inputs.data_split else {})


def load_image(image_root: str | Path, sample: Sample) -> Image.Image | None:
    """The sample's image as RGB, whatever its source; None if it has none.

    - a path: resolved inside image_root (resolve_image) and read;
    - an ImageRef: that cell of the data set, reopened once per process (load_cell_image).
    Used by the teacher workers and the student's datasets alike. Raises SampleError
    naming the sample and the file when the image is missing, escapes the root or does
    not decode."""
    if sample.image is None:
        return None
    if isinstance(sample.image, ImageRef):
        return load_cell_image(sample.image, sample.id)
    if image_root is None or str(image_root) == "":
        raise SampleError(f"sample {sample.id}: its image {sample.image!r} is a file path but no image root was "
                          "given; set --image-root to the folder the paths are relative to")
    try:
        path = resolve_image(image_root, sample.image)
    except SampleError as e:  # every bad-sample reason starts with the sample
        raise SampleError(f"sample {sample.id}: {e}") from e
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(f"sample {sample.id}: cannot read image {path}: {e}") from e


def _json_dataset(path: str):
    """A .json / .jsonl file as a memory-mapped datasets.Dataset (converted once into
    datasets' Arrow cache, HF_DATASETS_CACHE, and reused while the file is unchanged)."""
    datasets, was_quiet = _quiet_datasets()
    try:
        return datasets.Dataset.from_json(path)
    except Exception as e:  # noqa: BLE001 - any failure to build one table becomes a message naming the file
        raise SampleError(f"{path}: cannot read the records as one table ({type(e).__name__}: {e}); every record "
                          "needs the same fields with the same types (JSON Lines with one record a line is safest)"
                          ) from e
    finally:
        if not was_quiet:
            datasets.enable_progress_bars()


def _id_hash(ids: list[str]) -> np.ndarray:
    """uint64 [len(ids)]: a 64-bit hash of each id (blake2b), for an index that costs 16
    bytes per sample instead of a Python dict's ~100."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
                       np.uint64, len(ids))


class SampleList:
    """Samples (or pairs) already in memory, with SampleTable's interface: small inputs,
    tests, and samples built in Python."""

    def __init__(self, items: list):
        self.items = list(items)
        self.pairs = bool(self.items) and isinstance(self.items[0], PreferencePair)
        check_unique_ids(self.items, "samples")
        self._row = {x.id: i for i, x in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[int(i)]

    def id_at(self, i: int) -> str:
        return self.items[int(i)].id

    def rows_of(self, ids: list[str]) -> np.ndarray:
        return np.array([self._row.get(i, -1) for i in ids], dtype=np.int64)


class SampleTable:
    """The samples (or preference pairs, pairs=True) of an input, read per row from a
    memory-mapped Arrow data set, so a process holds none of them as Python objects: JSON /
    JSONL files are converted once by `datasets` (its cache), Parquet and save_to_disk
    folders are opened as read_inputs opens them. Loader workers get a copy that reopens the
    same memory-mapped files.

    Opening checks every row as read_inputs does (strict: the first bad record is refused
    with its file and row), the ids' uniqueness and the image root, reading the rows in
    batches and keeping only an id index (a 64-bit hash per sample, 16 bytes with its row).
    item [i]: the i-th sample in the input's order; rows_of(ids): their rows (-1: absent).
    """

    def __init__(self, inputs, pairs: bool = False):
        data, split = str(inputs.data), inputs.data_split
        image_column, id_column = inputs.image_column, inputs.id_column
        if detect_format(data) == "json":
            if split is not None:
                raise SampleError(f"{data}: a JSON file has no splits; drop --data-split {split}")
            ds = _json_dataset(data)
            if image_column and image_column not in ds.column_names:  # JSON records may have no image key at all
                image_column = ""
            if id_column not in ds.column_names:
                raise SampleError(f"{data}: the records have no {id_column!r} key (the id column); their keys are "
                                  f"{ds.column_names}: name the id key with --id-column")
            where = data
        else:
            data = data if "://" in data else os.path.abspath(data)  # ImageRefs: workers may have another cwd
            ds = open_dataset(data, split)
            where = f"{data}{f' (split {split})' if split else ''}"
        _check_columns(list(ds.column_names), where, pairs, image_column, id_column)
        self.data, self.split, self.where, self.pairs = data, split, where, pairs
        self.image_column, self.id_column = image_column, id_column
        self._arrow = ds.with_format("arrow")
        self._ids = ds.select_columns([id_column]).with_format("arrow")
        hashes, needs_root = [], None
        for start in range(0, len(ds), _BATCH):
            items = self._rows(start, start + _BATCH)
            hashes.append(_id_hash([x.id for x in items]))
            if needs_root is None:
                needs_root = next((x for x in items if isinstance(x.image, str)), None)
        self._hash = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        self._sorted = np.argsort(self._hash, kind="stable")
        dup = np.flatnonzero(np.diff(self._hash[self._sorted]) == 0)
        for d in dup:  # equal hashes: the same id twice (or, rarely, two ids of one hash)
            a, b = sorted(int(r) for r in self._sorted[d:d + 2])
            if self.id_at(a) == self.id_at(b):
                raise SampleError(f"{where}: {'pair' if pairs else 'sample'} id {self.id_at(a)!r} appears twice "
                                  f"(records {a} and {b}); ids must be unique (the cache is keyed by them)")
        if needs_root is not None and not inputs.image_root:
            raise SampleError(f"{data}: sample {needs_root.id} refers to the image file {needs_root.image!r} but no "
                              "image root was given; set --image-root to the folder the image paths are relative to")

    def _rows(self, start: int, stop: int) -> list:
        return _convert_rows(self._arrow, start, stop, self.data, self.split, self.where, self.pairs,
                             self.image_column, self.id_column)

    def __len__(self) -> int:
        return len(self._hash)

    def __getitem__(self, i: int):
        return self._rows(int(i), int(i) + 1)[0]

    def id_at(self, i: int) -> str:
        return str(self._ids[int(i)][self.id_column][0].as_py())

    def rows_of(self, ids: list[str]) -> np.ndarray:
        """int64 [len(ids)]: the row of each id in this input, -1 where it is absent."""
        h = _id_hash(ids)
        sorted_hash = self._hash[self._sorted]
        lo, hi = np.searchsorted(sorted_hash, h, "left"), np.searchsorted(sorted_hash, h, "right")
        out = np.full(len(ids), -1, np.int64)
        one = hi - lo == 1
        out[one] = self._sorted[lo[one]]
        for j in np.flatnonzero(hi - lo > 1):  # a hash shared by several ids: compare the ids themselves
            out[j] = next((int(r) for r in self._sorted[lo[j]:hi[j]] if self.id_at(r) == ids[j]), -1)
        found = np.flatnonzero(one)
        if len(found):  # a lone hash match of an id that is not in the input: compare the ids
            stored = self._ids[out[found].tolist()].column(self.id_column).to_pylist()
            wrong = np.array([str(a) != ids[j] for a, j in zip(stored, found)], dtype=bool)
            out[found[wrong]] = -1
        return out
