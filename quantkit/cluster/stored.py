"""References in, facts out: the tasks of a build whose nodes share no filesystem (`--store URL`).

A task gets content-addressed references to what it reads (store.Ref: digest, size, name), and the source as a
reference (SourceRef: a Hub repo at a commit with its flags, or a local folder uploaded to the store). It never gets a
path of the driver's. On its node it fetches its inputs into the node's cache (store.NodeCache: once per node,
locked, checked), fetches the source only if its step reads it, works in a folder of its own, and commits what it
made to the store. It returns what the driver would otherwise read from the files: for an artifact its digest,
size, description, chat facts and the build's facts (Made); for an evaluation the runner's output, and the store
references of the files it wrote (the reference's log-probabilities, an unfinished evaluation's state). The driver
never opens an artifact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..evaluate.protocol import EvalSpec
from ..executors import Made, timed_builds
from ..fsutil import HashCache
from ..formats import BuildContext, get
from ..plan import ArtifactPlan
from ..procs import run_python
from ..progress import Reporter
from ..source import Source
from ..store import ArtifactStore, NodeCache, Ref
from .tasks import StepOutcome, assigned_cpus, here, transient


@dataclass(frozen=True)
class SourceRef:
    """The source as a node gets it: the same Hub commit, fetched into the node's Hugging Face cache, or the driver's
    local folder, uploaded to the store (`tree`)."""

    name: str
    repo_id: str | None = None
    revision: str | None = None
    allow_pickle: bool = False  # the driver's --allow-pickle: a pickled source is converted on the node too
    tree: str | None = None

    @classmethod
    def of(cls, source: Source, store: ArtifactStore, hashes: HashCache | None = None) -> "SourceRef":
        if source.repo_id:
            return cls(source.name, source.repo_id, source.revision, source.converted is not None)
        return cls(source.name, tree=store.put(source.path, hashes).digest)

    def on_node(self, store: ArtifactStore, cache: NodeCache) -> Source:
        from ..source import resolve

        if self.repo_id:
            return replace(transient(resolve, self.repo_id, revision=self.revision, allow_pickle=self.allow_pickle),
                           name=self.name)
        # Under the source's own name: the converter names the model after its folder, as on the driver.
        folder = cache.root / "sources" / self.tree / self.name
        if not (folder.parent / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            transient(store.fetch, self.tree, folder, cache)
            (folder.parent / ".complete").touch()
        return resolve(str(folder), name=self.name)

    def absent(self, work: Path) -> Source:
        """A stand-in for a step that does not read the source (formats' reads_source): its name only."""
        return Source(path=work / ".source-not-fetched", name=self.name, repo_id=self.repo_id, revision=self.revision)


@dataclass(frozen=True)
class StepRecipe:
    """Everything a build task needs besides its steps, without a path of the driver's."""

    store: str
    source: SourceRef
    inputs: tuple[Ref, ...]  # the artifacts its steps read (their parents, what they use), by name
    threads: int
    converter: str | None  # a llama.cpp checkout of the user's: a tool, at the same path on every node (preflight)
    evaluation_text: str
    evaluation: EvalSpec | None  # its tokens: `tokens`
    tokens: Ref | None = None


def build_stored(items: list[ArtifactPlan], recipe: StepRecipe) -> StepOutcome:
    """One run's artifacts (executors.runs_of) on this node: each one's Made, in order."""
    node, attempt = here()
    cache, store = NodeCache(), ArtifactStore(recipe.store)
    work = cache.work_folder()
    try:
        for ref in recipe.inputs:
            transient(store.fetch, ref.digest, work / ref.name, cache)
        reads = any(get(i.backend).reads_source(i) for i in items)
        source = recipe.source.on_node(store, cache) if reads else recipe.source.absent(work)
        evaluation = recipe.evaluation
        if evaluation is not None and recipe.tokens is not None:
            tokens = transient(store.fetch, recipe.tokens.digest, work / ".quantkit" / "eval-tokens.npy", cache)
            evaluation = replace(evaluation, tokens=str(tokens))
        context = BuildContext(source=source, out_dir=work, reporter=Reporter(quiet=False),
                               threads=assigned_cpus(recipe.threads), converter=recipe.converter,
                               evaluation_text=recipe.evaluation_text, evaluation=evaluation)
        made = []
        for item, facts in transient(lambda: list(timed_builds(items, context))):
            fmt, path = get(item.backend), work / item.filename
            description = fmt.describe(item, path, facts)
            chat = fmt.chat_facts(path) if fmt.evaluation and item.is_model else None
            ref = transient(store.put, path)
            made.append(Made(item.filename, ref.digest, ref.size, description, chat, facts))
        return StepOutcome(made, node, attempt)
    finally:
        shutil.rmtree(work, ignore_errors=True)


PLACED = "<on the node>"  # a spec's path the node fills in


@dataclass(frozen=True)
class StoredEval:
    """One evaluation (`python -m RUNNER evaluate TARGET SPEC OUT`, evaluate/protocol.py) without the driver's paths:
    its spec's files are references, and what the runner writes comes back."""

    store: str
    label: str
    runner: str
    spec: dict  # the spec's JSON, its files PLACED (and its scratch folder a name): the node puts its paths in
    tokens: Ref
    target: Ref | None = None  # the artifact scored; None: the source itself (the reference)
    source: SourceRef | None = None
    ref_read: Ref | None = None  # the reference's log-probabilities, read
    ref_write: Ref | None = None  # ...written: the ones there so far (a later round adds windows), or None
    state: Ref | None = None  # an unfinished evaluation's state, gone on from
    env: tuple[tuple[str, str], ...] = ()
    cpus: int = 1


@dataclass(frozen=True)
class EvalReturn:
    output: dict  # the runner's EvalOutput, as JSON
    ref_write: Ref | None  # the log-probabilities it wrote, in the store
    state: Ref | None  # its state, in the store (None: it kept none)


def evaluate_stored(run: StoredEval) -> StepOutcome:
    node, attempt = here()
    cache, store = NodeCache(), ArtifactStore(run.store)
    work = cache.work_folder()
    try:
        spec = dict(run.spec)
        spec["tokens"] = str(transient(store.fetch, run.tokens.digest, work / "eval-tokens.npy", cache))
        if run.target is not None:
            target = transient(store.fetch, run.target.digest, work / run.target.name, cache)
        else:
            target = run.source.on_node(store, cache).path
        if run.ref_read is not None:
            spec["ref_read"] = str(transient(store.fetch, run.ref_read.digest, work / "reference-logprobs.npy", cache))
        # What the runner writes is a copy of its own, never a link into the cache.
        for key, ref, name in (("ref_write", run.ref_write, "reference-out.npy"), ("state", run.state, "state.npz")):
            if spec.get(key):
                spec[key] = str(work / name)
                if ref is not None:
                    shutil.copyfile(transient(store.fetch, ref.digest, work / f"{name}.in", cache), work / name)
        if spec.get("scratch"):  # kept between rounds on this node, under its name (the evaluation's key)
            spec["scratch"] = str(cache.root / "scratch" / spec["scratch"])
        spec["threads"] = assigned_cpus(run.cpus)
        (work / "spec.json").write_text(json.dumps(spec))
        transient(lambda: run_python(["-m", run.runner, "evaluate", str(target), str(work / "spec.json"),
                                      str(work / "out.json")], cwd=work, env=dict(run.env), what=run.label))
        output = json.loads((work / "out.json").read_text())
        wrote = {key: transient(store.put, Path(spec[key])) if spec.get(key) and Path(spec[key]).exists() else None
                 for key in ("ref_write", "state")}
        return StepOutcome(EvalReturn(output, wrote["ref_write"], wrote["state"]), node, attempt)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def on_stored(store_url: str, ref: Ref, fn: Callable, *args: Any) -> StepOutcome:
    """fn(PATH, *args) on this node, PATH the artifact `ref` fetched here (an engine check of a stored artifact)."""
    node, attempt = here()
    cache = NodeCache()
    work = cache.work_folder()
    try:
        path = transient(ArtifactStore(store_url).fetch, ref.digest, work / ref.name, cache)
        return StepOutcome(fn(path, *args), node, attempt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
