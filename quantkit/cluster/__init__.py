"""Builds on a Ray cluster: the executor (executor.py), the tasks nodes run (tasks.py), where a step fits
(nodes.py), each node's preflight (preflight.py) and what a Ray failure means (failures.py). docs/cluster.md."""

from .executor import RayExecutor

__all__ = ["RayExecutor"]
