"""Typed configs from YAML and command-line flags, with one name per knob.

A config is a dataclass (fields may be nested dataclasses). Its flags are generated from
its fields, so the YAML key ``batch_size`` is the flag ``--batch-size`` and the nested key
``arch: {text_hidden: 64}`` is ``--arch.text-hidden 64``. Precedence: defaults < YAML <
flags. Unknown keys are errors that list the valid ones.

An *inline* field (``inline(InputsConfig)``) is a nested dataclass whose keys sit at its
parent's level: in Python ``cfg.inputs.data``, in YAML ``data:`` and on the command line
``--data``. Several configs share one such group (InputsConfig: teacher-pass, train, eval)
while every knob keeps one name. ``to_dict`` gives a config's YAML form (what ``from_dict``
reads back).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A setting that cannot be honoured; the message names the flag, the value and what is
    allowed (the CLI prints it as one line and exits 2)."""


def _get(cfg, name: str):
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def refuse(name: str, value, allowed: str) -> ConfigError:
    """The error for field `name` (dotted; an inline group's prefix is no part of the flag)."""
    flag = name.removeprefix("inputs.")  # InputsConfig is inline in every config
    return ConfigError(f"--{flag.replace('_', '-')} {value!r}: {allowed}")


def need_at_least(cfg, minimum, *names: str) -> None:
    """Each named (dotted) field is a number >= minimum."""
    for name in names:
        v = _get(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= minimum):
            raise refuse(name, v, f"use a number >= {minimum}")


def need_positive(cfg, *names: str) -> None:
    """Each named field is a finite number > 0."""
    for name in names:
        v = _get(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise refuse(name, v, "use a finite number > 0")


def need_between(cfg, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
    v = _get(cfg, name)
    if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v and (v < hi if hi_open else v <= hi)):
        raise refuse(name, v, f"use a number in [{lo}, {hi}{')' if hi_open else ']'}")


def need_choice(cfg, name: str, choices) -> None:
    v = _get(cfg, name)
    if v not in choices:
        raise refuse(name, v, f"choose one of {', '.join(map(str, choices))}")


def looks_like_hub_id(value: str) -> bool:
    """'org/name' (optionally with a revision '@rev'): a Hugging Face Hub repository id."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", value)) and not value.startswith(("/", "."))


def need_model(cfg, name: str, what: str, hub: bool = True) -> None:
    """The field names a model or processor folder that exists (with config.json or a
    processor file), or, with hub, a Hub id; refused with the fix otherwise."""
    v = _get(cfg, name)
    p = Path(str(v))
    if not v:
        raise refuse(name, v, f"set the {what} (a local folder{' or a Hub id' if hub else ''})")
    if p.is_dir():
        if not any((p / f).exists() for f in ("config.json", "preprocessor_config.json", "processor_config.json",
                                              "tokenizer_config.json")):
            raise refuse(name, v, f"{p} is a folder but holds no Hugging Face {what} (no config.json / "
                                  "tokenizer_config.json)")
        return
    if p.exists():
        raise refuse(name, v, f"{p} is a file; the {what} is a folder")
    if not (hub and looks_like_hub_id(str(v))):
        raise refuse(name, v, f"not found: no such folder{' (and not a Hub id org/name)' if hub else ''}")
    if not _hub_reachable(str(v)):
        raise refuse(name, v, "not found: no such folder, and the Hub is offline (HF_HUB_OFFLINE) with no copy of "
                              "that repository in the local Hugging Face cache")


def _hub_reachable(repo: str) -> bool:
    """Whether a Hub id can be loaded here: online, or in the local Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        return True
    try:
        snapshot_download(repo.split("@")[0], revision=repo.split("@")[1] if "@" in repo else None,
                          local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any miss of the local cache
        return False


def need_path(cfg, name: str, what: str, required: bool = True) -> None:
    """The field names an existing file, folder or glob (an fsspec URL passes as it is)."""
    v = _get(cfg, name)
    if not v:
        if required:
            raise refuse(name, v, f"set the {what}")
        return
    s = str(v)
    if "://" in s or any(c in s for c in "*?["):
        return
    if not Path(s).exists():
        raise refuse(name, v, f"not found: no such {what}")


@dataclasses.dataclass
class InputsConfig:
    """Where a command's samples come from (common.inputs.read_inputs reads every format)."""

    data: str = ""  # LLaVA JSON/JSONL, preference JSONL, a save_to_disk folder or Parquet (common/inputs.py)
    image_root: str = ""  # folder the samples' image paths are relative to (not needed for embedded images)
    data_split: str | None = None  # split of a DatasetDict / of the Parquet files (train-*.parquet)
    image_column: str = "image"  # column (JSON key) of the image: path, bytes or HF Image; "" = no images
    id_column: str = "id"  # column (JSON key) of each sample's unique id (RLAIF-V: idx)


_INLINE = "mmkd.inline"


def inline(cls):
    """A dataclass field holding a `cls` whose keys are set at the parent's level (module
    docstring)."""
    return dataclasses.field(default_factory=cls, metadata={_INLINE: True})


def _is_inline(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(_INLINE))


def _keys(cls) -> set[str]:
    """The YAML keys of dataclass `cls` at its own level (inline groups' keys included)."""
    hints = typing.get_type_hints(cls)
    return {k for f in dataclasses.fields(cls) for k in (_keys(hints[f.name]) if _is_inline(f) else {f.name})}


def to_dict(cfg) -> dict:
    """A config as its YAML mapping: nested dataclasses as mappings, inline ones merged into
    their parent (from_dict(type(cfg), to_dict(cfg)) == cfg)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
            if _is_inline(f):
                out.update(value)
                continue
        out[f.name] = value
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def flat_dict(cfg) -> dict:
    """A config as {dotted key: value}: its YAML form flattened ('moe.top_k': 2)."""
    return _flat(to_dict(cfg))


def flag(key: str, value) -> str:
    """The command-line form of one (dotted) setting: '--batch-size 8', '--fresh',
    '--no-resume' (booleans as add_flags makes them), values quoted for a shell."""
    import shlex

    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {shlex.quote(str(value))}"


def command_line(command: str, cfg) -> str:
    """The `mmkd COMMAND` line that gives cfg: a flag for every setting that differs from
    its default (a record of what made an output, e.g. the cache manifest's `command`)."""
    given, default = flat_dict(cfg), flat_dict(type(cfg)())
    flags = [flag(k, v) for k, v in given.items() if v != default.get(k)]
    return " ".join(["mmkd", command, *flags])


def _scalar_type(tp):
    """(python type, optional?) of a field annotation like `int`, `str | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value, tp, where: str):
    base, optional = _scalar_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        return base(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}") from e


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a (possibly partial) dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = _keys(cls)
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _is_inline(f):
            kwargs[f.name] = from_dict(hints[f.name], {k: v for k, v in data.items() if k in _keys(hints[f.name])},
                                       where)
            continue
        if f.name not in data:
            continue
        tp, key = hints[f.name], f"{where}{f.name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(data[f.name], dict):
                raise ConfigError(f"{key}: expected a mapping")
            kwargs[f.name] = from_dict(tp, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a config's own checks (e.g. MoEConfig's) name their field
        raise ConfigError(f"{where or cls.__name__ + ': '}{e}") from e


def _docstring_entries(cls) -> dict[str, str]:
    """{field: first sentence} of a class docstring's `name: text` (or `a / b: text`)
    entries, each possibly continued on more-indented lines."""
    out: dict[str, str] = {}
    names: list[str] = []
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"\s*(\w+(?:\s*/\s*\w+)*):\s+(.*)", line)
        if m and not line.startswith(" " * 8):
            names = [n.strip() for n in m.group(1).split("/")]
            for n in names:
                out[n] = m.group(2).strip()
        elif names and line.strip():
            for n in names:
                out[n] += " " + line.strip()
        else:
            names = []
    return {k: re.split(r"(?<!i\.e\.)(?<!e\.g\.)(?<!\.\.\.)(?<=\.)\s", v)[0].rstrip(".") for k, v in out.items()}


def field_comments(cls) -> dict[str, str]:
    """{field: its comment in the class source}: the trailing `# ...` of the field's line, or
    the comment lines right above it, or else its entry in the class docstring (the one
    place each knob is documented)."""
    import inspect

    out, above = _docstring_entries(cls), []
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if m and not text.startswith(("def ", "@")) and (m.group(2) or above):
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return out


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", defaults=None) -> None:
    """One flag per (nested) field, its help the field's comment and its default (read from
    `defaults`, the parent's instance, so factory defaults show as built); the values
    themselves are left to the dataclass (SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults if defaults is not None else cls()
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            add_flags(parser, tp, prefix if _is_inline(f) else prefix + f.name + ".", value)
            continue
        base, _ = _scalar_type(tp)
        flag = "--" + (prefix + f.name).replace("_", "-")
        # booleans the way every hand-written flag is: `--fresh` sets it, `--no-fresh` clears it
        extra = {"action": argparse.BooleanOptionalAction} if base is bool else {"metavar": base.__name__.upper()}
        shown = "none" if value is None else repr(value) if value == "" else value
        text = comments.get(f.name, "")
        help_ = (f"{text} (default: {shown})" if text else f"default: {shown}").replace("%", "%%")  # argparse formats
        parser.add_argument(flag, dest=prefix + f.name, default=argparse.SUPPRESS, help=help_, **extra)


def nest_dict(flat: dict) -> dict:
    """{dotted key: value} as nested mappings ('moe.top_k': 2 -> {'moe': {'top_k': 2}}): the
    inverse of flat_dict, before inline groups are resolved (from_dict does that)."""
    out: dict = {}
    for key, v in flat.items():
        d = out
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, yaml_path: str | Path | None = None, flags: dict | None = None):
    """defaults < YAML file < flags (a flat dict of dotted keys, as argparse gives)."""
    data: dict = {}
    if yaml_path:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of config keys")
        data = loaded
    data = merge_dicts(data, nest_dict(flags or {}))
    return from_dict(cls, data, where="" if not yaml_path else f"{yaml_path}: ")
