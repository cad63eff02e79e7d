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
from typing import Any, Iterator, Protocol

from .formats import BuildContext, get
from .graph import StepGraph
from .plan import ArtifactPlan, BuildPlan
from .source import Source
from .procs import run_python
from .progress import Reporter

StepFacts = Iterator[tuple[ArtifactPlan, dict[str, Any]]]
_PROGRESS = re.compile(r"progress (\d+)/(\d+)")  # how helpers report progress (runners do)


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
    def prepare(self, plan: BuildPlan, context: BuildContext) -> None:
        """Refuse, before anything runs, a build this executor cannot finish (a step, or an evaluation, that no
        node can take; a node that cannot run what it may be given)."""

    def build(self, graph: StepGraph, context: BuildContext) -> StepFacts:
        """Build the graph's steps as they become ready; yield each with its facts as it finishes, so the build
        records finished work even when a later step fails (graph.py: the contract)."""

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        """Run each helper; yield each as it finishes."""


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


def timed_builds(items: list[ArtifactPlan], context: BuildContext) -> StepFacts:
    """Format.build_many, each item with its wall time among the facts the report keeps (the time since the one
    before it, unless the format measured its own)."""
    start = time.monotonic()
    for item, facts in get(items[0].backend).build_many(items, context):
        now = time.monotonic()
        yield item, {"seconds": round(now - start, 2), **facts}
        start = now


class LocalExecutor:
    def prepare(self, plan: BuildPlan, context: BuildContext) -> None:
        """Nothing: the plan already checked this machine (memory, tools)."""

    def build(self, graph: StepGraph, context: BuildContext) -> StepFacts:
        while batch := graph.ready():
            for run in runs_of(batch):
                for item, facts in timed_builds(run, context):
                    yield item, facts
                    graph.finish(item)

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        for run in runs:
            with reporter.step(run.label) as bar:
                def on_line(line: str) -> None:
                    if m := _PROGRESS.search(line):
                        bar.update(int(m.group(1)), int(m.group(2)))

                run_python(run.args, on_line=on_line, cwd=run.cwd, env=dict(run.env), what=run.label)
            yield run
