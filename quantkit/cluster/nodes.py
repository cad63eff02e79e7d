"""The nodes of a Ray cluster as quantkit sees them, and where a step can run: on one node that has its CPUs, its
GPUs and its memory together. Taking each maximum over all nodes separately let a GPU step that fits no single node
(the GPU node too small, the large node without a GPU) pass the check and then wait forever."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ClusterError
from ..fsutil import human_size


@dataclass(frozen=True)
class Node:
    id: str  # Ray's node id (hex)
    name: str  # its address (and node name, where it differs), for messages
    cpus: int
    gpus: int
    memory: int  # bytes of Ray's "memory" resource

    @classmethod
    def from_ray(cls, info: dict[str, Any]) -> "Node":
        """One entry of ray.nodes()."""
        r = info.get("Resources") or {}
        address, name = info.get("NodeManagerAddress", "?"), info.get("NodeName", "")
        return cls(id=info["NodeID"], name=address if name in ("", address) else f"{name} ({address})",
                   cpus=int(r.get("CPU", 0)), gpus=int(r.get("GPU", 0)), memory=int(r.get("memory", 0)))

    def describe(self) -> str:
        return f"{self.name}: {self.cpus} CPU(s), {self.gpus} GPU(s), {human_size(self.memory)} of memory"


@dataclass(frozen=True)
class Needs:
    """What one Ray task asks for (its options: num_cpus, num_gpus, memory)."""

    cpus: int
    gpus: int = 0
    memory: int = 0  # predicted peak bytes (0: unknown)

    def fits(self, node: Node) -> bool:
        return node.cpus >= self.cpus and node.gpus >= self.gpus and node.memory >= self.memory

    def options(self) -> dict[str, Any]:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "memory": self.memory or None}


def alive_nodes(ray) -> list[Node]:
    return [Node.from_ray(n) for n in ray.nodes() if n.get("Alive")]


def largest(nodes: list[Node]) -> Node | None:
    """The node with the most GPUs, then memory, then CPUs: the one a refusal names."""
    return max(nodes, key=lambda n: (n.gpus, n.memory, n.cpus), default=None)


def place(label: str, threads: int, gpus: int, memory: int, nodes: list[Node]) -> Needs:
    """The Needs of a step that would use `threads` CPU threads: as many as the largest node that has its GPUs and
    memory offers (at least one), refused when no single node has its GPUs, its memory and a CPU together."""
    able = [n for n in nodes if n.cpus >= 1 and n.gpus >= gpus and n.memory >= memory]
    if not able:
        big = largest([n for n in nodes if n.cpus >= 1]) or largest(nodes)
        offers = f"the largest node, {big.describe()}" if big else "the cluster has no node"
        raise ClusterError(f"{label} needs {gpus} GPU(s), {human_size(memory)} of memory and a CPU on one node, and no "
                           f"node of the Ray cluster has them together ({offers})",
                           "add a node that has them, lower the step's needs in the profile, or set "
                           "`if_unavailable: skip` for its format")
    return Needs(cpus=max(1, min(threads, max(n.cpus for n in able))), gpus=gpus, memory=memory)
