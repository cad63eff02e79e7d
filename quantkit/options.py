"""Typed options from YAML mappings: one strict loader for the profile's sections and every format's options.

A section is a frozen dataclass; its fields' annotations are the schema. An unknown key, or a value of the wrong
type, is a ProfileError naming the key by its full path (`gptq.variants[0].group_szie`), so a typo never quietly
builds the default. A field whose YAML name is not a Python name says so in its metadata: `field(metadata=
{"key": "from"})`.

Supported annotations: str, int, float (an int is accepted), bool, None, `X | Y`, `list[X]`, `dict[str, X]`, `Any`
and nested dataclasses (read from a mapping).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .errors import ProfileError

_T = TypeVar("_T")


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def load_options(cls: type[_T], data: Any, where: str) -> _T:
    """`data` (a mapping from YAML, or None for all defaults) as `cls`, checked key by key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"{where} must be a mapping, got {data!r}", f"allowed keys: {', '.join(_keys(cls))}")
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {unknown}", f"allowed: {', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        f = fields[key]
        values[f.name] = _coerce(hints[f.name], value, f"{where}.{key}")
    missing = [yaml_key(f) for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProfileError(f"{where}: missing key(s) {missing}", f"give {', '.join(missing)}")
    return cls(**values)


def _keys(cls) -> list[str]:
    return [yaml_key(f) for f in dataclasses.fields(cls)]


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        alternatives = typing.get_args(hint)
        # A mapping is read as the union's dataclass, if it has one: its own errors then name the wrong key.
        if isinstance(value, dict):
            for alt in alternatives:
                if dataclasses.is_dataclass(alt):
                    return load_options(alt, value, where)
        for alt in alternatives:
            if _is(alt, value):
                return _coerce(alt, value, where)
        raise ProfileError(f"{where} must be {_describe(hint)}, got {value!r}", "fix the profile")
    if origin is list:
        if not isinstance(value, list):
            raise ProfileError(f"{where} must be a list, got {value!r}", "fix the profile")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"{where} must be a mapping, got {value!r}", "fix the profile")
        key_hint, item = typing.get_args(hint) or (Any, Any)
        return {_coerce(key_hint, k, f"{where} key"): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return load_options(hint, value, where)
    if not _is(hint, value):
        raise ProfileError(f"{where} must be {_describe(hint)}, got {value!r}", "fix the profile")
    return float(value) if hint is float else value


def _is(hint: Any, value: Any) -> bool:
    """Whether `value` has the shape `hint` asks for, at the top level."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is not None:
        return isinstance(value, origin)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
