"""RayExecutor: a build's artifact steps and evaluations as Ray tasks, each where its CPUs, GPUs and memory are.

Ray does the placing and the retrying; quantkit states each task's needs (nodes.place), refuses what no node can
run before anything is submitted, checks every node first (preflight.py), submits a step as soon as its inputs
are recorded (graph.StepGraph), and turns whatever Ray raises into one line (failures.py).

Failures: a task lost with its node or worker, or failed by the network (tasks.TransientStepError), is retried by
Ray up to QUANTKIT_RAY_RETRIES times (default 3). Each attempt writes under a name of its own (fsutil.partial_path),
so an attempt that was only cut off, still writing, never clobbers the next one. After a failure the other tasks
run on and what they finish is recorded, so a rerun resumes from there; then the first failure is raised. A
submitted task that no node still alive can run (its node is gone) is cancelled, not left pending forever.

The build folder must be on storage every node shares (and the source too, unless it comes from the Hub, which a
node that lacks it fetches); the preflight proves it with a probe file before any step starts. docs/cluster.md.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import formats
from ..errors import ClusterError, QuantkitError, ToolError
from ..executors import HelperRun, StepFacts, runs_of
from ..formats import BuildContext
from ..graph import StepGraph
from ..plan import ArtifactPlan, BuildPlan
from ..progress import Reporter
from .failures import task_failure, unplaceable
from .nodes import Needs, Node, alive_nodes, largest, place
from .preflight import run_preflight
from .tasks import HubToken, StepOutcome, TransientStepError, build_step, helper_step, reads_hub, with_hub_token

RETRIES_ENV = "QUANTKIT_RAY_RETRIES"
# Settings a task reads the way this process does (where the Hub is, how hard to retry it); never the token.
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DOWNLOAD_TIMEOUT", "QUANTKIT_RETRY_BACKOFF_S",
                 "QUANTKIT_HUB_TIMEOUT_S")
POLL_S = 5.0  # how often pending tasks are checked against the nodes still alive


@dataclass(frozen=True)
class _Task:
    label: str
    needs: Needs
    what: Any  # the run (a list of ArtifactPlans) or the HelperRun


class RayExecutor:
    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise QuantkitError("--ray needs the ray package", "install the ray extra: pip install 'quantkit[ray]' "
                                "(./scripts/setup.sh installs it by default)") from None
        import quantkit

        self.ray = ray
        # The cluster runs this very quantkit (py_modules ships the package); its dependencies (llama.cpp
        # bindings and tools, torch, ...) must be installed on every node, as for a local build.
        env: dict[str, Any] = {"py_modules": [str(Path(quantkit.__file__).parent)]}
        if forwarded := {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}:
            env["env_vars"] = forwarded
        if not sys.stderr.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # task output in a log file: no colour codes
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True, logging_level="WARNING",
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ToolError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}",
                            "start one with `ray start --head`, or pass its address (host:port, ray://host:10001 or auto)") from e
        self.retries = int(os.environ.get(RETRIES_ENV, 3))
        self._names: dict[str, str] = {}
        self._build = ray.remote(with_hub_token)
        self._helper = ray.remote(with_hub_token)

    def nodes(self) -> list[Node]:
        """The nodes alive now (their names are kept, to name a node after it died)."""
        found = alive_nodes(self.ray)
        self._names.update({n.id: n.name for n in found})
        return found

    @property
    def max_memory(self) -> int:
        """The memory of the largest node that can take a step (what the plan's memory check uses)."""
        return max((n.memory for n in self.nodes() if n.cpus >= 1), default=0)

    @property
    def max_gpus(self) -> int:
        return max((n.gpus for n in self.nodes() if n.cpus >= 1), default=0)

    # Before anything runs
    def prepare(self, plan: BuildPlan, context: BuildContext) -> None:
        """Refuse a step or an evaluation that fits no single node, then check every node (preflight.py)."""
        nodes = self.nodes()
        for item in plan.artifacts:
            self._needs([item], context.threads, nodes)
        by_name = {i.filename: i for i in plan.artifacts}
        for step in plan.evaluations:
            item = by_name.get(step.target)
            evaluation = formats.get(item.backend).evaluation if item else None
            place(step.step, context.threads, evaluation.gpus if evaluation else 0, step.peak_bytes, nodes)
        tools = {i.filename: formats.get(i.backend).tools(i, context) for i in plan.artifacts}
        reports = run_preflight(self.ray, nodes, plan, context, tools, HubToken.here())
        context.reporter.info(f"Ray preflight: {len(reports)} node(s) ready ({', '.join(r.node for r in reports)})")

    def _needs(self, run: list[ArtifactPlan], threads: int, nodes: list[Node]) -> Needs:
        """A run's needs (its steps run one after another: the largest step's memory)."""
        item = max(run, key=lambda i: i.predicted_peak_bytes)
        return place(self._label(run), threads, formats.get(item.backend).gpus, item.predicted_peak_bytes, nodes)

    @staticmethod
    def _label(run: list[ArtifactPlan]) -> str:
        return run[0].filename if len(run) == 1 else f"{run[0].filename} and {len(run) - 1} more"

    # Steps
    def build(self, graph: StepGraph, context: BuildContext) -> StepFacts:
        portable = replace(context, reporter=None)
        token = HubToken.here()
        reporter = context.reporter
        pending: dict[Any, _Task] = {}

        def submit() -> None:
            ready = graph.ready()
            nodes = self.nodes() if ready else []
            for run in runs_of(ready):
                needs = self._needs(run, context.threads, nodes)
                hub = token if any(reads_hub(item, context) for item in run) else None
                ref = self._submit(self._build, needs, f"quantkit build {self._label(run)}", hub, build_step, run, portable)
                pending[ref] = _Task(", ".join(i.filename for i in run), needs, run)
                reporter.info(f"→ {pending[ref].label}: Ray task submitted")

        for task, outcome in self._gather(pending, reporter, refill=submit):
            for item, facts in zip(task.what, outcome.value):
                yield item, {**facts, "ran_on": {"node": self._names.get(outcome.node, outcome.node),
                                                 "attempt": outcome.attempt}}
                graph.finish(item)
        if blocked := graph.blocked():
            raise ClusterError(f"{len(blocked)} step(s) never started: {', '.join(blocked)}", "see the errors above")

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        nodes = self.nodes()
        pending: dict[Any, _Task] = {}
        for run in runs:
            needs = place(run.label, run.cpus, run.gpus, run.memory, nodes)
            token = HubToken.here() if run.source is not None and run.source.repo_id else None
            ref = self._submit(self._helper, needs, f"quantkit {run.label}", token, helper_step, run)
            pending[ref] = _Task(run.label, needs, run)
            reporter.info(f"→ {run.label}: Ray task submitted")
        for task, _ in self._gather(pending, reporter):
            yield task.what

    def _submit(self, remote, needs: Needs, name: str, token: HubToken | None, fn: Callable, *args) -> Any:
        return remote.options(**needs.options(), name=name, max_retries=self.retries,
                              retry_exceptions=[TransientStepError]).remote(token, fn, *args)

    def _gather(self, pending: dict[Any, _Task], reporter: Reporter,
                refill: Callable[[], None] = lambda: None) -> Iterator[tuple[_Task, StepOutcome]]:
        """Each task and its outcome as it finishes; `refill` submits what became ready since. After a failure the
        others run on (and refill goes on submitting what does not depend on it), so what they finish is
        recorded; then the first failure is raised."""
        failure: QuantkitError | None = None
        refill()
        checked = time.monotonic()
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if not done:
                if time.monotonic() - checked >= POLL_S:
                    failure = failure or self._drop_unplaceable(pending, reporter)
                    checked = time.monotonic()
                continue
            [ref] = done
            task = pending.pop(ref)
            try:
                outcome: StepOutcome = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                error = task_failure(e, task.label, task.needs, self.retries)
                reporter.warn(f"✗ {task.label}: {error}")
                failure = failure or error
                continue
            where = self._names.get(outcome.node, outcome.node)
            again = f", attempt {outcome.attempt + 1}" if outcome.attempt else ""
            reporter.info(f"✓ {task.label} (Ray, {where}{again})")
            yield task, outcome
            refill()
        if failure:
            raise failure

    def _drop_unplaceable(self, pending: dict[Any, _Task], reporter: Reporter) -> QuantkitError | None:
        """Cancel the pending tasks no node still alive can run; the error for the first of them."""
        nodes = [n for n in self.nodes() if n.cpus >= 1]
        failure = None
        for ref, task in list(pending.items()):
            if not any(task.needs.fits(n) for n in nodes):
                self.ray.cancel(ref, force=True)
                del pending[ref]
                big = largest(nodes)
                error = unplaceable(task.label, task.needs, f"the largest node left, {big.describe()}" if big else
                                    "no node is left")
                reporter.warn(f"✗ {task.label}: {error}")
                failure = failure or error
        return failure

