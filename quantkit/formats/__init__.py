"""The format registry: the built-in formats, one folder each under quantkit/formats/, and third-party formats.

A built-in format registers itself with its class keyword (`class GGUFFormat(Format, name="gguf")`, formats/base.py)
when its folder is imported. Third-party packages register whole formats through the `quantkit.formats` entry
point group (the older `quantkit.backends` group is read too), each entry naming a Format subclass (or a
zero-argument callable returning a Format) whose name is the entry's.

Plugins are loaded by name, when a profile asks for them: a plugin that fails to import breaks only the builds
that use it, and `quantkit formats` lists it with its error.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib import metadata

from ..errors import ProfileError
from .base import (REGISTERED, Backend, BuildContext, Card, Evaluation, Format, NoOptions, Requirement, package,
                   versions)

__all__ = ["Backend", "BuildContext", "Card", "Evaluation", "Format", "NoOptions", "Requirement", "package",
           "versions", "names", "get", "load_errors"]

ENTRY_POINT_GROUPS = ("quantkit.formats", "quantkit.backends")

_INSTANCES: dict[str, Format] = {}


@cache
def _builtins() -> frozenset[str]:
    """Import every built-in folder (each registers its formats); their names."""
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")
    return frozenset(REGISTERED)


@cache
def _plugins() -> dict[str, metadata.EntryPoint]:
    """The entry points by name, not loaded. A built-in name is never taken by a plugin; the first group wins."""
    found: dict[str, metadata.EntryPoint] = {}
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            found.setdefault(ep.name, ep)
    return found


def names() -> list[str]:
    """Every format: built in, and each plugin's entry point name (plugins are not imported for this)."""
    return sorted(_builtins() | set(_plugins()))


def get(name: str) -> Format:
    if name not in _INSTANCES:
        _INSTANCES[name] = _make(name)
    return _INSTANCES[name]


def load_errors() -> dict[str, str]:
    """Load every plugin; the ones that cannot be used, with why (what `quantkit formats` lists)."""
    errors = {}
    for name in names():
        try:
            get(name)
        except ProfileError as e:
            errors[name] = f"{e} ({e.hint})"
    return errors


def _make(name: str) -> Format:
    if name in _builtins():
        return REGISTERED[name]()  # a plugin that reuses a built-in's name is never loaded
    ep = _plugins().get(name)
    if ep is None:
        raise ProfileError(f"unknown format {name!r}", f"registered: {', '.join(names())}")
    where = f"plugin {ep.value} ({ep.dist.name if ep.dist else 'no distribution'})"
    try:
        made = ep.load()
        fmt = made() if callable(made) else made
    except Exception as e:  # anything a third party's import can raise
        raise ProfileError(f"format {name!r} cannot be loaded from {where}: {type(e).__name__}: {e}",
                           "install what it needs, or uninstall that package") from e
    if not isinstance(fmt, Format):
        raise ProfileError(f"format {name!r} from {where} is a {type(fmt).__name__}, not a Format",
                           "the entry point must name a Format subclass")
    if fmt.name and fmt.name != name:
        raise ProfileError(f"the entry point {name!r} of {where} names a format called {fmt.name!r}",
                           "the entry point's name and the class keyword (name=...) must be the same")
    if not fmt.name:
        type(fmt).name = name  # a plugin written before the class keyword, named only by its entry point
    return fmt
