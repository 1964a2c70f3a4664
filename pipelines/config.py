"""Typed configs from YAML and command-line flags, with one name per knob.

A config is a dataclass (fields may be nested dataclasses). Its flags are generated from
its fields, so the YAML key ``batch_size`` is the flag ``--batch-size`` and the nested key
``arch: {text_hidden: 64}`` is ``--arch.text-hidden 64``. Precedence: defaults < YAML <
flags. Unknown keys are errors that list the valid ones.
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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
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
            add_flags(parser, tp, prefix + f.name + ".")
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
