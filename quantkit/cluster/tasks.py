"""What runs on a Ray node: a build run (one or more artifact steps), an evaluation helper, and the node's
preflight (preflight.py). Ray ships this package to every node (py_modules); everything else a step needs (the
llama.cpp bindings and tools, torch, a format's own packages) must be installed on the node, as for a local build.

Each task says where it ran and which attempt it was (StepOutcome), so the build can tell what a lost node cost.

The Hub token: a build task may read the Hub on its node (the source, when that node lacks its folder, and `hf:`
calibration and evaluation texts), so it gets this process's token as an argument, set in its environment only
while it runs (with_hub_token). Not through the task's runtime_env env_vars, as Ray's docs suggest for environment
variables: Ray 2.60 writes those in plain text into each node's runtime_env_agent.log and lists them in its state
API.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import QuantkitError
from ..executors import HelperRun, timed_builds
from ..formats import BuildContext, get
from ..fsutil import partial_path
from ..plan import ArtifactPlan
from ..procs import run_python
from ..progress import Reporter
from ..source import Source


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


def with_hub_token(token: HubToken | None, fn: Callable, *args) -> Any:
    """fn(*args) with `token` as HF_TOKEN (None: the worker's environment as it is); what Ray runs as a task."""
    with _hub_token(token):
        return fn(*args)


class StartLog:
    """Which of a build's tasks have started: a tiny actor (no CPU) the tasks tell as they start and the driver
    asks, so that a task still waiting for a node past QUANTKIT_RAY_PENDING_S is told from one that runs long."""

    def __init__(self) -> None:
        self.started: set[str] = set()

    def start(self, key: str) -> None:
        self.started.add(key)

    def keys(self) -> set[str]:
        return self.started


def started(log: Any, key: str, token: HubToken | None, fn: Callable, *args) -> Any:
    """What Ray runs as a task: tell `log` (a StartLog actor; None: nobody) that `key` started, then fn(*args) with
    `token` (with_hub_token)."""
    if log is not None:
        log.start.remote(key)  # not waited for: a lost message only leaves the pending limit unchecked
    return with_hub_token(token, fn, *args)


def reads_hub(item: ArtifactPlan, context: BuildContext) -> bool:
    """Whether the build task of `item` may read the Hub on its node: a source from the Hub that it reads
    (downloaded again where its folder is missing), or a text given as hf:ORG/DATASET (calibration, and the
    evaluation text a calibration is checked against)."""
    return (bool(context.source.repo_id) and get(item.backend).reads_source(item)) or \
        context.evaluation_text.startswith("hf:") or any(s.startswith("hf:") for s in _strings(item.options))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class TransientStepError(QuantkitError):
    """A step failed in a way another attempt may not (the network): Ray retries it (retry_exceptions), up to the
    task's max_retries."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message, hint, retryable=True)

    def __reduce__(self):  # a QuantkitError's keyword-only argument does not survive pickling on its own
        return (type(self), (str(self), self.hint))


@dataclass(frozen=True)
class StepOutcome:
    """What a task returns: its value, and where (Ray's node id) and at which attempt it ran (0: the first)."""

    value: Any
    node: str
    attempt: int


def here() -> tuple[str, int]:
    """This task's node (Ray's node id: the driver knows its name) and attempt number."""
    import ray

    worker = ray._private.worker.global_worker  # the attempt number has no public accessor in Ray 2.60
    attempt = worker.core_worker.get_current_task_attempt_number() if hasattr(worker, "core_worker") else 0
    return ray.get_runtime_context().get_node_id(), int(attempt)


def assigned_cpus(default: int) -> int:
    """The CPUs Ray gave this task: the threads its tools may use (not this node's os.cpu_count())."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else default


def on_this_node(source: Source) -> Source:
    """`source` as this node has it: the same commit fetched into its own Hugging Face cache when the driver's
    folder is not here (a converted pickle is converted here again: allow_pickle is the driver's choice)."""
    if source.path.exists() or not source.repo_id:
        return source
    from ..source import resolve

    return replace(resolve(source.repo_id, revision=source.revision, allow_pickle=source.converted is not None),
                   name=source.name)


def transient(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs); a failure the network caused becomes a TransientStepError, which Ray retries."""
    from .. import network

    try:
        return fn(*args, **kwargs)
    except QuantkitError as e:
        if e.retryable and not isinstance(e, TransientStepError):
            raise TransientStepError(str(e), e.hint) from e
        raise
    except Exception as e:
        if network.is_transient(e):
            raise TransientStepError(f"{type(e).__name__}: {network.short(e)}", "check the node's network") from e
        raise


def build_step(items: list[ArtifactPlan], context: BuildContext) -> StepOutcome:
    """One run's artifacts (executors.runs_of), in a Ray worker process; each one's facts, in order. The source is
    fetched only if a step reads it; threads are what Ray assigned; the reporter is rebuilt (a console does not
    travel)."""
    node, attempt = here()
    source = context.source
    if any(get(i.backend).reads_source(i) for i in items):
        source = transient(on_this_node, source)
    context = replace(context, source=source, reporter=Reporter(quiet=False), threads=assigned_cpus(context.threads))
    facts = transient(lambda: [f for _, f in timed_builds(items, context)])
    return StepOutcome(facts, node, attempt)


def helper_step(run: HelperRun) -> StepOutcome:
    """One helper (an evaluation: `-m RUNNER evaluate TARGET SPEC OUT`), in a Ray worker process: its spec's threads
    are what Ray assigned (a copy of the spec says so; threads are never keyed), and the reference's source is
    fetched first where this node lacks its folder."""
    node, attempt = here()
    args = list(run.args)
    if run.source is not None:
        args[3] = str(transient(on_this_node, run.source).path)
    spec = Path(args[4])
    mine = partial_path(spec)
    mine.write_text(json.dumps({**json.loads(spec.read_text()), "threads": assigned_cpus(run.cpus)}))
    args[4] = str(mine)
    try:
        transient(lambda: run_python(args, cwd=run.cwd, env=dict(run.env), what=run.label))
    finally:
        mine.unlink(missing_ok=True)
    return StepOutcome(None, node, attempt)
