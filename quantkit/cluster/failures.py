"""The one place that turns what Ray raises for a task into a quantkit error: a step that failed on its own (its
QuantkitError, as it is), a node lost or a worker crashed more often than the task may be retried (retryable: a job
worker queues the job again), a step the memory monitor killed (the estimate was too low), a step no node can run.
Whatever else Ray raises is still one line, never a traceback."""

from __future__ import annotations

import re

from ..errors import ClusterError, NotEnoughMemory, QuantkitError, ToolError
from ..fsutil import human_size
from .nodes import Needs
from .tasks import TransientStepError

_OOM_NODE = re.compile(r"\(IP: ([^,)]+)")


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def task_failure(error: Exception, label: str, needs: Needs, retries: int) -> QuantkitError:
    import ray.exceptions as ex

    if isinstance(error, ex.RayTaskError):
        cause = error.cause
        if isinstance(cause, TransientStepError):
            return ClusterError(f"{label} failed {retries + 1} time(s): {cause}", cause.hint, retryable=True)
        if isinstance(cause, QuantkitError):
            return cause
        return ToolError(f"the Ray task for {label} failed: {first_line(error)}", "see the task's log above")
    if isinstance(error, ex.OutOfMemoryError):
        node = m.group(1) if (m := _OOM_NODE.search(str(error))) else "its node"
        return NotEnoughMemory(f"the memory estimate for {label} ({human_size(needs.memory)}) was too low on {node}: "
                               "Ray's memory monitor killed it",
                               "report the step and the model (quantkit/memory.py makes the estimate); a node with "
                               "more memory may run it")
    if isinstance(error, (ex.NodeDiedError, ex.WorkerCrashedError, ex.ObjectLostError, ex.LocalRayletDiedError,
                          ex.RaySystemError)):
        return ClusterError(f"{label} was lost with its node or worker {retries + 1} time(s), more than its {retries} "
                            f"retries allow ({type(error).__name__}: {first_line(error)})",
                            "check the cluster's nodes (`ray status`); the job can be run again as it is "
                            "(QUANTKIT_RAY_RETRIES sets the retries)", retryable=True)
    if isinstance(error, ex.TaskUnschedulableError):
        return ClusterError(f"no node of the Ray cluster can run {label} any more: {first_line(error)}",
                            "add a node that has its CPUs, GPUs and memory", retryable=True)
    if isinstance(error, ex.RuntimeEnvSetupError):
        return ClusterError(f"a node could not set up quantkit's environment for {label}: {first_line(error)}",
                            "see the node's runtime_env_agent.log", retryable=True)
    return ClusterError(f"the Ray task for {label} failed: {type(error).__name__}: {first_line(error)}",
                        "check the cluster (`ray status`)", retryable=True)


def unplaceable(label: str, needs: Needs, biggest: str) -> ClusterError:
    """A submitted step that no node still alive can run (the nodes that could have left)."""
    return ClusterError(f"no node of the Ray cluster can run {label} any more ({needs.cpus} CPU(s), {needs.gpus} "
                        f"GPU(s), {human_size(needs.memory)} of memory on one node; {biggest})",
                        "bring back or add a node that has them; the job can be run again as it is", retryable=True)
