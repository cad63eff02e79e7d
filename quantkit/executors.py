"""Where a build's artifact steps run: in this process, one after another, or as Ray tasks (quantkit/cluster/).

The build hands an executor its steps as a dependency graph (graph.StepGraph): a step starts as soon as its inputs
are recorded, so on a cluster the GGUF quantizations of a model, and its GPTQ, AWQ and EXL2 variants, run at once;
a format that builds its steps together (EXL2's ladder) gets the ones ready together as one run, one process, one
Ray task (runs_of). Either way the same Format.build_many writes the same files; only the place differs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, TypeVar

from .evaluate.integrity import ChatFacts
from .formats import BuildContext, get
from .graph import StepGraph
from .manifest import Manifest
from .plan import ArtifactPlan, BuildPlan
from .results import Description
from .source import Source
from .procs import run_python
from .progress import Reporter


@dataclass(frozen=True)
class Made:
    """An artifact a step made where the build cannot see it (a Ray task that committed it to the build's artifact
    store): what the build would otherwise read from the file."""

    filename: str
    digest: str  # what the manifest records as its sha256 (fsutil.HashCache: a folder's digest of its files)
    size: int
    description: Description  # Format.describe, run where the file was
    chat: ChatFacts | None  # Format.chat_facts, as the artifact's runtime reads it; None: not a model
    facts: dict[str, Any]


# Each finished step, the facts its build returned, and Made where the build has no file of it.
StepFacts = Iterator[tuple[ArtifactPlan, dict[str, Any], "Made | None"]]
_PROGRESS = re.compile(r"progress (\d+)/(\d+)")  # how helpers report progress (runners do)
T = TypeVar("T")


@dataclass(frozen=True)
class HelperRun:
    """`python ARGS...` in `cwd`, writing its result to files there: one evaluation, for example."""

    label: str
    args: tuple[str, ...]
    cwd: Path
    cpus: int = 1
    gpus: int = 0
    memory: int = 0  # predicted peak bytes (0: unknown)
    env: tuple[tuple[str, str], ...] = ()  # variables set for it (a format's Evaluation.env); hashable, as runs key dicts
    # The run's target (args[3]) is this source's folder: a node where that folder is missing fetches the same
    # commit into its own Hugging Face cache first (the reference, on a Ray node).
    source: Source | None = None


class Executor(Protocol):
    # The artifact store the build's files go to (a fsspec URL), where the nodes share no filesystem; None: the
    # build folder itself.
    store_url: str | None

    def prepare(self, plan: BuildPlan, context: BuildContext, manifest: Manifest) -> None:
        """Refuse, before anything runs, a build this executor cannot finish (a step, or an evaluation, that no
        node can take; a node that cannot run what it may be given)."""

    def build(self, graph: StepGraph, context: BuildContext) -> StepFacts:
        """Build the graph's steps as they become ready; yield each with its facts as it finishes, so the build
        records finished work even when a later step fails (graph.py: the contract)."""

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        """Run each helper; yield each as it finishes (its result file written)."""

    def on_artifact(self, path: Path, fn: Callable[..., T], *args: Any) -> T:
        """fn(path, *args) where the artifact at `path` of the build folder is (an engine check)."""


def runs_of(steps: list[ArtifactPlan]) -> list[list[ArtifactPlan]]:
    """Steps ready together as the runs that make them: a run of its own for each, except that the steps of a
    format that builds_together share one (EXL2's ladder), where the first of them stands in the list."""
    runs: list[list[ArtifactPlan]] = []
    together: dict[str, list[ArtifactPlan]] = {}
    for item in steps:
        if not get(item.backend).builds_together:
            runs.append([item])
        elif item.backend in together:
            together[item.backend].append(item)
        else:
            runs.append(together.setdefault(item.backend, [item]))
    return runs


def timed_builds(items: list[ArtifactPlan], context: BuildContext) -> Iterator[tuple[ArtifactPlan, dict[str, Any]]]:
    """Format.build_many, each item with its wall time among the facts the report keeps (the time since the one
    before it, unless the format measured its own)."""
    start = time.monotonic()
    for item, facts in get(items[0].backend).build_many(items, context):
        now = time.monotonic()
        yield item, {"seconds": round(now - start, 2), **facts}
        start = now


class LocalExecutor:
    store_url = None

    def prepare(self, plan: BuildPlan, context: BuildContext, manifest: Manifest) -> None:
        """Nothing: the plan already checked this machine (memory, tools)."""

    def build(self, graph: StepGraph, context: BuildContext) -> StepFacts:
        while batch := graph.ready():
            for run in runs_of(batch):
                for item, facts in timed_builds(run, context):
                    yield item, facts, None
                    graph.finish(item)

    def on_artifact(self, path: Path, fn: Callable[..., T], *args: Any) -> T:
        return fn(path, *args)

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        for run in runs:
            with reporter.step(run.label) as bar:
                def on_line(line: str) -> None:
                    if m := _PROGRESS.search(line):
                        bar.update(int(m.group(1)), int(m.group(2)))

                run_python(run.args, on_line=on_line, cwd=run.cwd, env=dict(run.env), what=run.label)
            yield run
