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
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


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
    return cls(**kwargs)


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One flag per (nested) field; defaults are left to the dataclass (SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_flags(parser, tp, prefix if _is_inline(f) else prefix + f.name + ".")
            continue
        base, _ = _scalar_type(tp)
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else "(built)"
        extra = {"nargs": "?", "const": True} if base is bool else {}  # `--fresh` alone means true
        parser.add_argument(flag, dest=prefix + f.name, default=argparse.SUPPRESS,
                            metavar=base.__name__.upper(), help=f"default: {default}", **extra)


def _nest(flat: dict) -> dict:
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
    data = merge_dicts(data, _nest(flags or {}))
    return from_dict(cls, data, where="" if not yaml_path else f"{yaml_path}: ")
