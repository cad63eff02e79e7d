"""The backend registry. A backend turns a checkpoint into artifacts: plan, then build each.

Third-party backends register through the `quantkit.backends` entry point group, each entry
pointing at a Backend subclass (or any zero-argument callable returning a Backend).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..errors import ProfileError
from ..plan import ArtifactPlan, ArtifactResult
from ..progress import Reporter
from ..source import Source

ENTRY_POINT_GROUP = "quantkit.backends"


@dataclass(frozen=True)
class BuildContext:
    source: Source
    out_dir: Path
    reporter: Reporter
    threads: int
    llama_cpp: str | None = None  # user llama.cpp checkout, if any


class Backend(ABC):
    name: str = ""

    @abstractmethod
    def plan(self, source: Source, options: dict[str, Any], ctx_llama_cpp: str | None = None) -> list[ArtifactPlan]:
        """Validate `options` from the profile and list the artifacts; no heavy work here."""

    @abstractmethod
    def build(self, item: ArtifactPlan, ctx: BuildContext) -> dict[str, Any]:
        """Write `item.filename` under ctx.out_dir (atomically); return facts only the build saw."""

    @abstractmethod
    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> ArtifactResult:
        """What the report says of a built artifact (size, types, bits per weight), given build()'s facts."""


_REGISTRY: dict[str, Callable[[], Backend]] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    _REGISTRY[name] = factory


def _load_entry_points() -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def names() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise ProfileError(f"unknown backend {name!r}", f"available: {', '.join(names())}")
    return _REGISTRY[name]()


def _gguf() -> Backend:
    from .gguf import GGUFBackend

    return GGUFBackend()


register("gguf", _gguf)
