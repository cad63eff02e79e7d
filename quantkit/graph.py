"""The plan's artifact steps as a dependency graph: a step is ready as soon as everything it is made from is
recorded, not when a whole "wave" is done, so on a cluster the GGUF quantizations of a model do not wait for an
hours-long GPTQ they do not read.

The contract between the build and an executor (executors.Executor.build): the executor takes `ready()` steps,
builds them and yields each with its facts; the build records the step before it asks for the next one; the executor
then calls `finish(step)`, which may make more steps ready. A step that failed is never finished, so nothing made
from it ever starts; `blocked()` names what waited on it.
"""

from __future__ import annotations

from collections.abc import Callable

from .plan import ArtifactPlan


def inputs_of(item: ArtifactPlan) -> tuple[str, ...]:
    """The artifacts a step reads: its parent and what it uses (the importance matrix)."""
    return tuple(d for d in (item.depends_on, *item.uses) if d)


class StepGraph:
    def __init__(self, items: list[ArtifactPlan], admit: Callable[[ArtifactPlan], bool]) -> None:
        """`items`: the plan's artifacts (each listed after its inputs). `admit(item)` is asked once per step, when
        its inputs are recorded: True if it must be built, False if the build folder already holds it (the step is
        then finished at once)."""
        self.items = items
        self._admit = admit
        self._started: set[str] = set()
        self._finished: set[str] = set()

    def ready(self) -> list[ArtifactPlan]:
        """The steps that can start now and were not handed out before, in plan order."""
        out = []
        progress = True
        while progress:  # a step found up to date may make the ones after it ready
            progress = False
            for item in self.items:
                if item.filename in self._started or not all(d in self._finished for d in inputs_of(item)):
                    continue
                self._started.add(item.filename)
                if self._admit(item):
                    out.append(item)
                else:
                    self._finished.add(item.filename)
                    progress = True
        return out

    def finish(self, item: ArtifactPlan) -> None:
        self._finished.add(item.filename)

    def blocked(self) -> list[str]:
        """Steps that never started: an input of theirs was not made."""
        return [i.filename for i in self.items if i.filename not in self._started]
