"""Typed configuration: dataclass schemas with documented defaults, YAML loading with
``includes``, CLI/dotted overrides, and strict validation.

Every key is declared once with :func:`option` (default, doc, allowed values, range).  Loading
fails *before any work* with one :class:`ConfigError` naming the file, the dotted key and what
was expected (unknown keys get the closest valid key suggested).
"""
from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """Invalid configuration (the message names the file and key)."""


def option(default=MISSING, doc: str = "", choices: Optional[Sequence] = None, min=None, max=None,
           default_factory=MISSING, compat: bool = False, gt=None):
    """Declare a config key.  ``min``/``max`` are inclusive bounds, ``gt`` an exclusive lower
    bound.  ``compat`` marks keys accepted for compatibility with the original's YAML files
    (documented as such: they have no effect or are aliases checked against the main key)."""
    md = {"doc": doc, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
          "gt": gt, "compat": compat}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


# ----------------------------------------------------------------------------- YAML + includes
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _resolve_include(inc: str, parent: Path) -> Path:
    for cand in (parent.parent / inc, Path(inc), _repo_root() / inc):
        if cand.is_file():
            return cand
    raise ConfigError(f"{parent}: include '{inc}' not found (looked beside the file, in the current "
                      f"directory and in the repository root)")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def read_yaml(path, _seen=None) -> dict:
    """Read a YAML file, resolving ``includes`` (a path or list of paths; later files and the
    including file win)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    _seen = set() if _seen is None else _seen
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular includes")
    _seen = _seen | {path.resolve()}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at top level, got {type(data).__name__}")
    incs = data.pop("includes", None)
    if incs is None:
        return data
    if isinstance(incs, str):
        incs = [incs]
    merged: dict = {}
    for inc in incs:
        merged = _deep_merge(merged, read_yaml(_resolve_include(inc, path), _seen))
    return _deep_merge(merged, data)


# ----------------------------------------------------------------------------- overrides
def parse_override(text: str):
    """``a.b=value`` → (["a","b"], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, val = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(val) if val.strip() != "" else ""
    except yaml.YAMLError:
        parsed = val
    return key.split("."), parsed


def apply_overrides(data: dict, overrides: Iterable) -> dict:
    """Apply ``key.sub=value`` strings or (dotted_key, value) pairs."""
    data = dict(data)
    for ov in overrides:
        if isinstance(ov, str):
            keys, val = parse_override(ov)
        else:
            keys, val = ov[0].split("."), ov[1]
        d = data
        for k in keys[:-1]:
            if not isinstance(d.get(k), dict):
                d[k] = {}
            else:
                d[k] = dict(d[k])
            d = d[k]
        d[keys[-1]] = val
    return data


# ----------------------------------------------------------------------------- validation
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, List):
        (a,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(a)}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(value, alternatives[0], where)
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errs.append(e)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, List, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (a,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, a, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if is_dataclass(tp):
        return build(tp, value, where)
    return value


def closest_key(key: str, valid: Sequence[str]) -> str:
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else ""


def build(cls, data: Optional[dict], where: str = ""):
    """Instantiate dataclass ``cls`` from ``data`` with full validation.  A ``normalize(data)``
    static method of ``cls``, if any, first maps the raw mapping (e.g. resolves aliases)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    if callable(getattr(cls, "normalize", None)):
        data = cls.normalize(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    extra_ok = getattr(cls, "__allow_extra__", False)
    kwargs = {}
    for k in data:
        if k not in names and not extra_ok:
            key = f"{where}.{k}" if where else k
            raise ConfigError(f"unknown key '{key}'{closest_key(str(k), names)}")
    for f in fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            val = _coerce(data[f.name], hints[f.name], key)
            md = f.metadata
            if md.get("choices") and val is not None:
                vals = val if isinstance(val, list) else [val]
                for v in vals:
                    if v not in md["choices"]:
                        raise ConfigError(f"{key}: {v!r} is not one of {list(md['choices'])}"
                                          f"{closest_key(str(v), [str(c) for c in md['choices']])}")
            if md.get("min") is not None and val is not None and val < md["min"]:
                raise ConfigError(f"{key}: {val!r} is below the minimum {md['min']}")
            if md.get("gt") is not None and val is not None and not val > md["gt"]:
                raise ConfigError(f"{key}: {val!r} must be greater than {md['gt']}")
            if md.get("max") is not None and val is not None and val > md["max"]:
                raise ConfigError(f"{key}: {val!r} is above the maximum {md['max']}")
            kwargs[f.name] = val
    obj = cls(**kwargs)
    if extra_ok:
        obj.extra = {k: v for k, v in data.items() if k not in names}
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj) -> dict:
    """Plain-dict view (for saving next to outputs)."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = to_dict(v) if is_dataclass(v) else v
    if getattr(obj, "extra", None):
        out.update(obj.extra)
    return out


def load_config(cls, path=None, overrides: Iterable = (), base: Optional[dict] = None):
    """Read ``path`` (with includes), apply overrides, validate into ``cls``.

    Errors mention the file."""
    data = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides)
    try:
        return build(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def iter_options(cls, prefix: str = ""):
    """Yield (dotted_key, type_name, default, metadata) for docs."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if is_dataclass(a)] if typing.get_origin(tp) is typing.Union else []
        if inner:
            yield key, "section", None, {**f.metadata, "doc": f.metadata.get("doc", "") + " (optional section)"}
            yield from iter_options(inner[0], key + ".")
            continue
        if is_dataclass(tp):
            yield key, "section", None, f.metadata
            yield from iter_options(tp, key + ".")
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        yield key, _type_name(tp), default, f.metadata
