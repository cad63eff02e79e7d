"""The format registry: one folder per format under quantkit/formats/, each a Format (formats/base.py).

Built-in formats are the subpackages of this package: each one's FORMATS maps names to Format classes, so
adding a format adds a folder and nothing else. Third-party packages register whole formats through the
`quantkit.formats` entry point group (the older `quantkit.backends` group is read too), each entry pointing
at a Format subclass or any zero-argument callable returning one.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata
from typing import Callable

from ..errors import ProfileError
from .base import Backend, BuildContext, Card, Format, Requirement, package, versions

__all__ = ["Backend", "BuildContext", "Card", "Format", "Requirement", "package", "versions", "register", "names", "get"]

ENTRY_POINT_GROUPS = ("quantkit.formats", "quantkit.backends")

_REGISTRY: dict[str, Callable[[], Format]] = {}
_INSTANCES: dict[str, Format] = {}
_LOADED = False


def register(name: str, factory: Callable[[], Format]) -> None:
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


def _load() -> None:
    """The built-in folders, then the entry points (a built-in name is never replaced by a plugin)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            for name, cls in importlib.import_module(f"{__name__}.{info.name}").FORMATS.items():
                _REGISTRY.setdefault(name, cls)
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            if ep.name not in _REGISTRY:
                _REGISTRY[ep.name] = ep.load()


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> Format:
    _load()
    if name not in _REGISTRY:
        raise ProfileError(f"unknown backend {name!r}", f"registered: {', '.join(names())}")
    if name not in _INSTANCES:
        fmt = _REGISTRY[name]()
        fmt.name = fmt.name or name
        _INSTANCES[name] = fmt
    return _INSTANCES[name]
