"""Where a build's artifact steps run: in this process, one after another, or as Ray tasks.

The build hands an executor one wave of steps at a time (steps whose inputs are all built), so
the GGUF quantizations of a model, and its GPTQ, AWQ and EXL2 variants, can run at once on a
cluster; a format that builds its steps together (EXL2's ladder) gets them as one run, one process, one Ray
task (runs_of). Either way the same Format.build_many writes the same files; only the place differs. Ray does
the scheduling (CPUs, memory and GPUs per task); quantkit only states each step's needs.

The Hub token: a build task may read the Hub on its node (the source, when that node lacks its folder, and
`hf:` calibration and evaluation texts), so it gets this process's token as an argument, set in its environment
only while it runs (with_hub_token). Not through the task's runtime_env env_vars, as Ray's docs suggest for
environment variables: Ray 2.60 writes those in plain text into each node's runtime_env_agent.log and lists them in
its state API. Helper tasks (evaluations) get none: their runners read local files only.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

from .formats import BuildContext, get
from .errors import QuantkitError, ToolError
from .fsutil import human_size
from .plan import ArtifactPlan
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


class Executor(Protocol):
    def build(self, steps: list[ArtifactPlan], context: BuildContext) -> StepFacts:
        """Build every step (their inputs exist); yield each with its facts as it finishes, so the build
        records finished work even when a later step fails."""

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        """Run each helper; yield each as it finishes."""


@dataclass(frozen=True)
class HubToken:
    """The Hub token, as an argument of a Ray task; never in a repr, so no message or log line shows it."""

    value: str = field(repr=False)

    @classmethod
    def here(cls) -> "HubToken | None":
        """The token this process would use (HF_TOKEN, or the login `hf auth login` stored); None without one."""
        from huggingface_hub import get_token

        token = get_token()
        return cls(token) if token else None


def reads_hub(item: ArtifactPlan, context: BuildContext) -> bool:
    """Whether the build task of `item` may read the Hub on its node: a source from the Hub (downloaded again
    where its folder is missing), or a text given as hf:ORG/DATASET (calibration, and the evaluation text a
    calibration is checked against)."""
    return bool(context.source.repo_id) or context.evaluation_text.startswith("hf:") or any(
        s.startswith("hf:") for s in _strings(item.options))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


@contextlib.contextmanager
def _hub_token(token: HubToken | None) -> Iterator[None]:
    """HF_TOKEN set while the task runs, and the previous value back after: Ray runs later tasks, which may not need
    it, in the same worker process. Helpers the task starts get no token all the same (procs.child_env)."""
    if token is None:
        yield
        return
    before = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token.value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = before


def with_hub_token(token: HubToken | None, fn, *args) -> Any:
    """fn(*args) with `token` as HF_TOKEN (None: the worker's environment as it is); what Ray runs as a task."""
    with _hub_token(token):
        return fn(*args)


def runs_of(steps: list[ArtifactPlan]) -> list[list[ArtifactPlan]]:
    """A wave's steps as the runs that make them: a run of its own for each, except that the steps of a format
    that builds_together share one (EXL2's ladder), where the first of them stands in the wave."""
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
    def build(self, steps: list[ArtifactPlan], context: BuildContext) -> StepFacts:
        for run in runs_of(steps):
            yield from timed_builds(run, context)

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        for run in runs:
            with reporter.step(run.label) as bar:
                def on_line(line: str) -> None:
                    if m := _PROGRESS.search(line):
                        bar.update(int(m.group(1)), int(m.group(2)))

                run_python(run.args, on_line=on_line, cwd=run.cwd, env=dict(run.env), what=run.label)
            yield run


def helper_step(run: HelperRun) -> None:
    """One helper, in a Ray worker process."""
    run_python(run.args, cwd=run.cwd, env=dict(run.env), what=run.label)


def build_step(items: list[ArtifactPlan], context: BuildContext) -> list[dict[str, Any]]:
    """One run's artifacts (runs_of), in a Ray worker process; each one's facts, in order. The reporter is rebuilt
    there (a console does not travel)."""
    source = context.source
    if not source.path.exists() and source.repo_id:
        # Another node: fetch the same commit into this node's Hugging Face cache.
        from .source import resolve

        source = replace(resolve(source.repo_id, revision=source.revision, allow_pickle=source.converted is not None),
                         name=source.name)
    return [facts for _, facts in timed_builds(items, replace(context, source=source, reporter=Reporter(quiet=False)))]


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
        env = {"py_modules": [str(Path(quantkit.__file__).parent)]}
        if os.environ.get("HF_ENDPOINT"):
            env["env_vars"] = {"HF_ENDPOINT": os.environ["HF_ENDPOINT"]}
        if not sys.stderr.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # task output in a log file: no colour codes
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True, logging_level="WARNING",
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ToolError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}",
                            "start one with `ray start --head`, or pass its address (host:port, ray://host:10001 or auto)") from e
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.max_cpus = max((int(r.get("CPU", 0)) for r in nodes), default=0)
        self.max_memory = max((int(r.get("memory", 0)) for r in nodes), default=0)
        self.max_gpus = max((int(r.get("GPU", 0)) for r in nodes), default=0)
        self._build = ray.remote(with_hub_token)
        self._helper = ray.remote(helper_step)

    def needs(self, run: list[ArtifactPlan], threads: int) -> dict[str, Any]:
        """A run's Ray resources (its steps run one after another: the largest step's memory); refused up front if
        no node could ever run it (Ray would wait forever)."""
        item = max(run, key=lambda i: i.predicted_peak_bytes)
        gpus = get(item.backend).gpus
        if gpus > self.max_gpus:
            raise QuantkitError(f"{item.filename} needs {gpus} GPU(s) and no node of the Ray cluster has that many",
                                "add a GPU node to the cluster, or set `if_unavailable: skip` for that backend")
        if item.predicted_peak_bytes > self.max_memory:
            raise QuantkitError(f"{item.filename} needs about {human_size(item.predicted_peak_bytes)} of memory and the "
                                f"largest Ray node offers {human_size(self.max_memory)}", "add a larger node to the cluster")
        name = item.filename if len(run) == 1 else f"{run[0].filename} and {len(run) - 1} more"
        return {"num_cpus": self._cpus(threads), "num_gpus": gpus,
                "memory": item.predicted_peak_bytes or None, "name": f"quantkit build {name}"}

    def _cpus(self, wanted: int) -> int:
        return max(1, min(wanted, self.max_cpus))

    def build(self, steps: list[ArtifactPlan], context: BuildContext) -> StepFacts:
        portable = replace(context, reporter=None)
        token = HubToken.here()
        tasks = {self._build.options(**self.needs(run, context.threads)).remote(
                     token if any(reads_hub(item, context) for item in run) else None, build_step, run, portable): run
                 for run in runs_of(steps)}
        for run, facts in self._gather(tasks, context.reporter, lambda run: ", ".join(i.filename for i in run)):
            yield from zip(run, facts)

    def run_helpers(self, runs: list[HelperRun], reporter: Reporter) -> Iterator[HelperRun]:
        if any(run.gpus > self.max_gpus for run in runs):
            raise QuantkitError("an evaluation needs a GPU and no node of the Ray cluster has one", "add a GPU node")
        tasks = {self._helper.options(num_cpus=self._cpus(run.cpus), num_gpus=run.gpus, memory=run.memory or None,
                                      name=f"quantkit {run.label}").remote(run): run for run in runs}
        for run, _ in self._gather(tasks, reporter, lambda run: run.label):
            yield run

    def _gather(self, tasks: dict, reporter: Reporter, name) -> Iterator[tuple[Any, Any]]:
        """Each task's (what it was for, value) as it finishes. After a failure the others run on, so what
        they finish is recorded and a rerun resumes from there; then the first failure is raised."""
        for what in tasks.values():
            reporter.info(f"→ {name(what)}: Ray task submitted")
        failure = None
        while tasks:
            [ref], _ = self.ray.wait(list(tasks), num_returns=1)
            what = tasks.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:
                failure = failure or (e.cause if isinstance(e.cause, QuantkitError) else
                                      ToolError(f"the Ray task for {name(what)} failed: {str(e).splitlines()[0]}",
                                                "see the task's log above"))
                continue
            reporter.info(f"✓ {name(what)} (Ray)")
            yield what, value
        if failure:
            raise failure
