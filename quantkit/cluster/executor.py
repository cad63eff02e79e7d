"""RayExecutor: a build's artifact steps and evaluations as Ray tasks, each where its CPUs, GPUs and memory are.

Ray does the placing and the retrying; quantkit states each task's needs (nodes.place), refuses what no node can
run before anything is submitted, checks every node first (preflight.py), submits a step as soon as its inputs
are recorded (graph.StepGraph), and turns whatever Ray raises into one line (failures.py).

Failures: a task lost with its node or worker, or failed by the network (tasks.TransientStepError), is retried by
Ray up to QUANTKIT_RAY_RETRIES times (default 3). Each attempt writes under a name of its own (fsutil.partial_path),
so an attempt that was only cut off, still writing, never clobbers the next one. After a failure the other tasks
run on and what they finish is recorded, so a rerun resumes from there; then the first failure is raised. A
submitted task that no node still alive can run (its node is gone) is cancelled, not left pending forever.

Two ways to share files (docs/cluster.md):
- a shared folder (no store): the build folder is on storage every node mounts at the same path (and the source too,
  unless it comes from the Hub, which a node that lacks it fetches); the preflight proves it with a probe file;
- an artifact store (`store`: an fsspec URL): nothing is shared but the store. Tasks get references and return
  facts (stored.py); the driver never opens an artifact: what it records comes back from the tasks, its evaluation
  files go to the store, and a step is placed, softly, on the node that made its parent (the parent is in that
  node's cache already).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import formats
from ..errors import ClusterError, QuantkitError, ToolError
from ..executors import HelperRun, StepFacts, T, runs_of
from ..formats import BuildContext
from ..fsutil import human_size
from ..graph import StepGraph, inputs_of
from ..manifest import Manifest
from ..plan import ArtifactPlan, BuildPlan
from ..progress import Reporter
from ..store import ArtifactStore, Ref
from .failures import task_failure, unplaceable
from .nodes import Needs, Node, alive_nodes, largest, place
from .preflight import run_preflight
from .stored import PLACED, EvalReturn, SourceRef, StepRecipe, StoredEval, build_stored, evaluate_stored, on_stored
from .tasks import (HubToken, StartLog, StepOutcome, TransientStepError, build_step, helper_step, reads_hub,
                    started)

RETRIES_ENV = "QUANTKIT_RAY_RETRIES"
PENDING_ENV = "QUANTKIT_RAY_PENDING_S"  # how long a task may wait for a node before the build fails (default 2 h)
# Settings a task reads the way this process does (where the Hub is, how hard to retry it); never the token.
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DOWNLOAD_TIMEOUT", "QUANTKIT_RETRY_BACKOFF_S",
                 "QUANTKIT_HUB_TIMEOUT_S")
POLL_S = 5.0  # how often pending tasks are checked against the nodes still alive


@dataclass(frozen=True)
class _Task:
    label: str
    needs: Needs
    what: Any  # the run (a list of ArtifactPlans) or the HelperRun
    key: str = ""  # what it tells the StartLog
    submitted: float = field(default_factory=time.monotonic)


class RayExecutor:
    def __init__(self, address: str, store: str | None = None) -> None:
        """`store`: the fsspec URL of the build's artifact store (None: the build folder is shared storage)."""
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
        self.pending_s = float(os.environ.get(PENDING_ENV, 7200))
        self._starts = None  # the build's StartLog actor, made with the first task
        self.store_url = store
        self.store = ArtifactStore(store) if store else None
        self.manifest: Manifest | None = None
        self._source: SourceRef | None = None
        self._where: dict[str, str] = {}  # artifact file name -> the node (id) that made it, in this run
        self._names: dict[str, str] = {}
        self._build = ray.remote(started)
        self._helper = ray.remote(started)

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
    def prepare(self, plan: BuildPlan, context: BuildContext, manifest: Manifest) -> None:
        """Refuse a step or an evaluation that fits no single node, then check every node (preflight.py). With a
        store, the source's reference is made (a local source is uploaded)."""
        self.manifest = manifest
        nodes = self.nodes()
        for item in plan.artifacts:
            self._needs([item], context.threads, nodes)
        by_name = {i.filename: i for i in plan.artifacts}
        for step in plan.evaluations:
            item = by_name.get(step.target)
            evaluation = formats.get(item.backend).evaluation if item else None
            place(step.step, context.threads, evaluation.gpus if evaluation else 0, step.peak_bytes, nodes)
        tools = {i.filename: formats.get(i.backend).tools(i, context) for i in plan.artifacts}
        reports = run_preflight(self.ray, nodes, plan, context, tools, HubToken.here(), self.store)
        if self.store:
            self._source = SourceRef.of(plan.source, self.store, manifest.hashes)
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
                name = f"quantkit build {self._label(run)}"
                if self.store:
                    ref, key = self._submit(self._build, needs, name, hub, build_stored, run,
                                            self._recipe(run, context), near=self._near(run))
                else:
                    ref, key = self._submit(self._build, needs, name, hub, build_step, run, portable)
                pending[ref] = _Task(", ".join(i.filename for i in run), needs, run, key)
                reporter.info(f"→ {pending[ref].label}: Ray task submitted")

        for task, outcome in self._gather(pending, reporter, refill=submit):
            ran_on = {"node": self._names.get(outcome.node, outcome.node), "attempt": outcome.attempt}
            for item, value in zip(task.what, outcome.value):
                self._where[item.filename] = outcome.node
                if self.store:
                    yield item, {**value.facts, "ran_on": ran_on}, value
                else:
                    yield item, {**value, "ran_on": ran_on}, None
                graph.finish(item)
        if blocked := graph.blocked():
            raise ClusterError(f"{len(blocked)} step(s) never started: {', '.join(blocked)}", "see the errors above")

    def _ref(self, path: Path) -> Ref:
        """A file of the build folder as a store reference: the store's copy, or this one uploaded (a folder
        built here before, carried on with a store)."""
        if digest := self.manifest.stored_digest(path):
            return Ref(digest, 0, path.name)
        ref = self.store.put(path, self.manifest.hashes)
        self.manifest.keep_stored(path, ref.digest)
        return ref

    def _recipe(self, run: list[ArtifactPlan], context: BuildContext) -> StepRecipe:
        made_here = {i.filename for i in run}
        inputs = tuple(self._ref(context.out_dir / name) for name in dict.fromkeys(
            d for item in run for d in inputs_of(item) if d not in made_here))
        tokens = self._ref(Path(context.evaluation.tokens)) if context.evaluation else None
        return StepRecipe(self.store_url, self._source, inputs, context.threads, context.converter,
                          context.evaluation_text, replace(context.evaluation, tokens="") if context.evaluation else None,
                          tokens)

    def _near(self, run: list[ArtifactPlan]) -> str | None:
        """The node that made a parent of the run in this build: its cache has it already."""
        return next((self._where[d] for item in run for d in inputs_of(item) if d in self._where), None)

    # Evaluations
    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        nodes = self.nodes()
        pending: dict[Any, _Task] = {}
        for run in runs:
            needs = place(run.label, run.cpus, run.gpus, run.memory, nodes)
            token = HubToken.here() if run.source is not None and run.source.repo_id else None
            if self.store:
                stored = self._stored_eval(run)
                near = self._where.get(stored.target.name) if stored.target else None
                ref, key = self._submit(self._helper, needs, f"quantkit {run.label}", token, evaluate_stored, stored,
                                        near=near)
            else:
                ref, key = self._submit(self._helper, needs, f"quantkit {run.label}", token, helper_step, run)
            pending[ref] = _Task(run.label, needs, run, key)
            reporter.info(f"→ {run.label}: Ray task submitted")
        for task, outcome in self._gather(pending, reporter):
            if self.store:
                self._took(task.what, outcome.value)
            yield task.what

    def _stored_eval(self, run: HelperRun) -> StoredEval:
        """A helper run (`-m RUNNER evaluate TARGET SPEC OUT`, its spec a file of the driver's) as references."""
        _, runner, _, target, spec_file, _ = run.args
        spec = json.loads(Path(spec_file).read_text())
        optional = {key: self._ref(Path(spec[key])) if spec.get(key) and self.manifest.present(Path(spec[key])) else None
                    for key in ("ref_read", "ref_write", "state")}
        tokens = self._ref(Path(spec["tokens"]))
        # The node puts its own paths in; only whether each file is asked for travels.
        spec.update({key: PLACED for key in ("tokens", "ref_read", "ref_write", "state") if spec.get(key)})
        if spec.get("scratch"):
            spec["scratch"] = Path(spec["scratch"]).name
        return StoredEval(self.store_url, run.label, runner, spec, tokens,
                          None if run.source is not None else self._ref(Path(target)),
                          self._source if run.source is not None else None,
                          env=run.env, cpus=run.cpus, **optional)

    def _took(self, run: HelperRun, result: EvalReturn) -> None:
        """An evaluation's outcome where the evaluator reads it: its result file, and what it wrote, in the store."""
        spec = json.loads(Path(run.args[4]).read_text())
        Path(run.args[5]).write_text(json.dumps(result.output))
        for key, ref in (("ref_write", result.ref_write), ("state", result.state)):
            if ref is not None and spec.get(key):
                self.manifest.keep_stored(Path(spec[key]), ref.digest)
        self.manifest.save()

    def on_artifact(self, path: Path, fn: Callable[..., T], *args: Any) -> T:
        if not self.store or path.exists():
            return fn(path, *args)
        needs = place(f"a check of {path.name}", 1, 0, 0, self.nodes())
        ref, key = self._submit(self._helper, needs, f"quantkit check {path.name}", None, on_stored, self.store_url,
                                self._ref(path), fn, *args, near=self._where.get(path.name))
        [(_, outcome)] = list(self._gather({ref: _Task(f"check {path.name}", needs, path, key)}, Reporter(quiet=True)))
        return outcome.value

    def _submit(self, remote, needs: Needs, name: str, token: HubToken | None, fn: Callable, *args,
                near: str | None = None) -> tuple[Any, str]:
        """The task's reference and its StartLog key. `near`: a node to prefer (soft affinity: any other node that
        fits will do)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._starts is None:  # on the driver's node (soft): it lives as long as the build does
            here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=True)
            self._starts = self.ray.remote(num_cpus=0)(StartLog).options(scheduling_strategy=here).remote()
        key = uuid.uuid4().hex
        strategy = NodeAffinitySchedulingStrategy(near, soft=True) if near else "DEFAULT"
        ref = remote.options(**needs.options(), name=name, max_retries=self.retries, scheduling_strategy=strategy,
                             retry_exceptions=[TransientStepError]).remote(self._starts, key, token, fn, *args)
        return ref, key

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
                    failure = failure or self._drop_unplaceable(pending, reporter) or self._drop_waiting(pending, reporter)
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

    def _drop_waiting(self, pending: dict[Any, _Task], reporter: Reporter) -> QuantkitError | None:
        """Cancel the tasks that have waited for a node longer than the pending limit without starting."""
        late = {ref: t for ref, t in pending.items() if time.monotonic() - t.submitted > self.pending_s}
        if not late:
            return None
        try:
            begun = self.ray.get(self._starts.keys.remote(), timeout=30)
        except self.ray.exceptions.RayError:
            return None  # the StartLog is gone with its node: nothing to tell waiting from running by
        failure = None
        for ref, task in late.items():
            if task.key not in begun:
                error = ClusterError(f"{task.label} waited {time.monotonic() - task.submitted:.0f}s and never started: "
                                     f"no node had its {task.needs.cpus} CPU(s), {task.needs.gpus} GPU(s) and "
                                     f"{human_size(task.needs.memory)} of memory free",
                                     f"the cluster is busy or too small; {PENDING_ENV} sets how long a step may wait",
                                     retryable=True)
                self._cancel(pending, ref, error, reporter)
                failure = failure or error
        return failure

    def _cancel(self, pending: dict[Any, _Task], ref: Any, error: QuantkitError, reporter: Reporter) -> None:
        """Cancel a submitted task that will never run, and say why."""
        self.ray.cancel(ref, force=True)
        reporter.warn(f"✗ {pending.pop(ref).label}: {error}")

    def _drop_unplaceable(self, pending: dict[Any, _Task], reporter: Reporter) -> QuantkitError | None:
        """Cancel the pending tasks no node still alive can run; the error for the first of them."""
        nodes = [n for n in self.nodes() if n.cpus >= 1]
        failure = None
        big = largest(nodes)
        for ref, task in list(pending.items()):
            if not any(task.needs.fits(n) for n in nodes):
                error = unplaceable(task.label, task.needs, f"the largest node left, {big.describe()}" if big else
                                    "no node is left")
                self._cancel(pending, ref, error, reporter)
                failure = failure or error
        return failure

