"""The backend registry. A backend turns a checkpoint into artifacts: plan, then build each.

Third-party backends register through the `quantkit.backends` entry point group, each entry
pointing at a Backend subclass (or any zero-argument callable returning a Backend).
"""

from __future__ import annotations

import importlib.util
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
    evaluation_text: str = "builtin:botchan"  # calibration must not contain it
    # The evaluation's token ids, for checks a backend runs against the reference before it builds (EXL2's
    # parity preflight): {"tokens": path of the .npy, "bos": id or None, "ctx": window}; None with evaluation off.
    evaluation: dict[str, Any] | None = None


@dataclass(frozen=True)
class Requirement:
    """Something a backend needs on this machine, checked before any work starts."""

    what: str  # "package gptqmodel", "a CUDA GPU"
    available: bool
    hint: str = ""  # how to get it
    gpu: bool = False  # a GPU on this machine: a Ray cluster with GPU nodes meets it instead


def package(dist: str, module: str, hint: str) -> Requirement:
    """A Python package, found without importing it (heavy imports stay lazy)."""
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return Requirement(f"package {dist}", False, hint)
    return Requirement(f"package {dist} {version}", importlib.util.find_spec(module) is not None, hint)


class Backend(ABC):
    name: str = ""
    # Which evaluation runner measures this backend's artifacts; None: reported without evaluation.
    evaluator: str | None = None
    # GPUs one build step needs: a worker without one does not take the job, Ray places the step on a GPU node.
    gpus: int = 0

    def requirements(self) -> list[Requirement]:
        """What this backend needs; `quantkit backends` lists it, and a plan refuses a backend that lacks any."""
        return []

    def validate(self, options: dict[str, Any]) -> None:
        """Check the profile's options without the source or this machine's means, so a mistake in them is
        reported even where the backend cannot run (plan() validates again, with the source)."""

    def check(self, remote_gpus: bool = False) -> None:
        """Refuse if this machine lacks a requirement (`remote_gpus`: the steps run where GPUs are, on Ray)."""
        missing = [r for r in self.requirements() if not r.available and not (r.gpu and remote_gpus)]
        if missing:
            raise ProfileError(f"backend {self.name} needs {', '.join(r.what for r in missing)}",
                               "; ".join(r.hint for r in missing if r.hint) or "install what it needs")

    def step_peak(self, params: int) -> int:
        """Peak memory of this backend's heaviest build step for a model of `params` 16-bit parameters, when only
        the count is known (a job queued from a Hub listing); plan() gives each step's exact estimate."""
        return 0

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
        raise ProfileError(f"unknown backend {name!r}", f"registered: {', '.join(names())}")
    backend = _REGISTRY[name]()
    backend.name = backend.name or name
    return backend


def _gguf() -> Backend:
    from .gguf import GGUFBackend

    return GGUFBackend()


def _gptq() -> Backend:
    from .gptq import GPTQBackend

    return GPTQBackend()


def _awq() -> Backend:
    from .gptq import AWQBackend

    return AWQBackend()


def _exl2() -> Backend:
    from .exl2 import EXL2Backend

    return EXL2Backend()


register("gguf", _gguf)
register("gptq", _gptq)
register("awq", _awq)
register("exl2", _exl2)
