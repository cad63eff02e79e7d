"""Before any step runs, a tiny task pinned to each node that can take steps checks that the node can run what it
may be given, and the build refuses with one line per bad node. Without it, a node that lacks a tool, has another
version of one, or cannot see the build folder fails hours into a build, deep in a step.

What a node checks (node_report, on the node):
- every format of the plan loads there (a third-party format's package included) and has what it requires (a
  CUDA requirement only on a node that offers Ray GPUs, and there as many CUDA devices as it offers);
- each artifact's tools have the identity the build's resume keys record (formats' `tools()`, computed on the
  driver): another llama-cpp-python, another llama.cpp binary or another exllamav2 would make other bytes under
  the same key;
- it shares the build's files with the driver: it reads back a probe the driver wrote and writes one the driver
  reads back, in the build folder (a node that sees an empty folder of the same name, or none, is refused), or
  with an artifact store, in the store;
- its scratch: with a store, the node's cache (store.NodeCache) has room for the largest step's inputs and output
  (and the source, when it must fetch it);
- the source, where a step it may run reads it: the driver's folder is there, or it can be fetched (the Hub
  answers for the commit with the token this build passes: a gated source needs HF_TOKEN), with room for it.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ClusterError, ProfileError, QuantkitError
from ..formats import BuildContext, get
from ..fsutil import human_size
from ..plan import ArtifactPlan, BuildPlan
from ..store import ArtifactStore
from .nodes import Node, alive_nodes
from .tasks import HubToken


@dataclass(frozen=True)
class Ask:
    """What every node is asked to confirm (the same for all)."""

    items: tuple[ArtifactPlan, ...]
    tools: dict[str, dict[str, str]]  # the driver's Format.tools per artifact: what the keys record
    context: BuildContext  # without its reporter
    probe: str  # a file in the build folder, or with a store the digest of an object in it
    probe_text: str
    source_bytes: int  # room a node needs to fetch the source
    store: str | None = None  # the artifact store's URL
    scratch_bytes: int = 0  # room a step needs in a node's cache (with a store)


@dataclass(frozen=True)
class NodeReport:
    node: str
    problems: tuple[str, ...]
    wrote: str = ""  # the node's own probe file in the build folder ("" if it could not write one)


def node_report(ask: Ask, name: str, gpus: int, token: HubToken | None) -> NodeReport:
    """The checks of one node, on that node (`name` and `gpus`: how the driver names it and the GPUs it offers)."""
    problems: list[str] = []
    needs_cuda = False
    for backend in dict.fromkeys(i.backend for i in ask.items):
        try:
            requirements = get(backend).requirements()
        except ProfileError as e:
            problems.append(f"format {backend} does not load: {e}")
            continue
        needs_cuda = needs_cuda or any(r.gpu for r in requirements)
        if missing := [r.what for r in requirements if not r.available and (gpus or not r.gpu)]:
            problems.append(f"format {backend} needs {', '.join(missing)}")
    for item in ask.items:
        try:
            tools = get(item.backend).tools(item, ask.context)
        except ProfileError:
            continue  # said above
        except QuantkitError as e:
            problems.append(f"{item.filename}: {e}")
            continue
        want = ask.tools[item.filename]
        if differ := sorted(k for k in tools.keys() | want.keys() if tools.get(k) != want.get(k)):
            here_ = "; ".join(f"{k} {tools.get(k) or 'missing'}" for k in differ)
            problems.append(f"{item.filename} would be made by other tools than the build's keys record ({here_})")
    wrote, problem = _store_probe(ask) if ask.store else _folder_probe(ask)
    problems += [problem] if problem else []
    problems += _source_problems(ask, token)
    if needs_cuda and gpus:
        from ..gpus import cuda_devices

        if (found := cuda_devices()) < gpus:
            problems.append(f"offers {gpus} GPU(s) to Ray and has {found} CUDA device(s)")
    return NodeReport(name, tuple(problems), wrote)


def _folder_probe(ask: Ask) -> tuple[str, str]:
    """(the node's own probe file, a problem or "")."""
    probe = Path(ask.probe)
    try:
        seen = probe.read_text() if probe.is_file() else None
        if seen != ask.probe_text:
            return "", (f"does not see the driver's build folder {probe.parent.parent} (its probe file is "
                        f"{'missing' if seen is None else 'another'} here)")
        mine = probe.with_name(f"{probe.name}.{secrets.token_hex(4)}.node")
        mine.write_text(ask.probe_text)
        return str(mine), ""
    except OSError as e:
        return "", f"cannot use the build folder {probe.parent.parent}: {e.strerror or e}"


def _store_probe(ask: Ask) -> tuple[str, str]:
    """(the digest of the node's own probe in the store, a problem or ""); and its cache's room."""
    from ..store import ArtifactStore, NodeCache

    cache = NodeCache()
    try:
        store = ArtifactStore(ask.store)
        work = cache.work_folder()
        try:
            if store.fetch(ask.probe, work / "probe", cache).read_text() != ask.probe_text:
                return "", f"reads other bytes from the store {ask.store} than the driver wrote"
            (work / "mine").write_text(f"{ask.probe_text} {secrets.token_hex(8)}")
            wrote = store.put(work / "mine").digest
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except Exception as e:  # whatever the store's filesystem raises: the node cannot use it
        return "", f"cannot use the store {ask.store}: {type(e).__name__}: {e}"
    if (free := shutil.disk_usage(cache.root).free) < ask.scratch_bytes:
        return wrote, (f"has {human_size(free)} free for its cache {cache.root} and a step needs "
                       f"{human_size(ask.scratch_bytes)} (QUANTKIT_NODE_CACHE puts it elsewhere)")
    return wrote, ""


def _source_problems(ask: Ask, token: HubToken | None) -> list[str]:
    source = ask.context.source
    if source.path.exists() or not any(get(i.backend).reads_source(i) for i in ask.items):
        return []
    if not source.repo_id and ask.store:
        return []  # the driver uploads it to the store
    if not source.repo_id:
        return [f"does not see the source folder {source.path} (a local source must be on storage every node shares)"]
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    from ..network import short

    try:  # what a download asks first: gated, missing, or out of reach, the node cannot fetch the source
        get_hf_file_metadata(hf_hub_url(source.repo_id, "config.json", revision=source.revision),
                             token=token.value if token else None)
    except Exception as e:
        gated = "gated" in type(e).__name__.lower()
        return [f"cannot fetch the source {source.repo_id}@{(source.revision or '')[:12]}: {type(e).__name__}: "
                f"{short(e)}" + ("; set HF_TOKEN to a token with access" if gated and token is None else "")]
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(cache).free) < ask.source_bytes:
        return [f"has {human_size(free)} free in its Hugging Face cache {cache} and the source needs "
                f"{human_size(ask.source_bytes)}"]
    return []


def run_preflight(ray, nodes: list[Node], plan: BuildPlan, context: BuildContext, tools: dict[str, dict[str, str]],
                  token: HubToken | None, store: ArtifactStore | None = None) -> list[NodeReport]:
    """The checks on every node that can take a step (a CPU); raise ClusterError with a line per bad node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..fsutil import tree_size
    from ..graph import inputs_of

    state = plan.out_dir / ".quantkit"
    state.mkdir(parents=True, exist_ok=True)
    probe = state / f"preflight-{secrets.token_hex(4)}"
    probe.write_text(secrets.token_hex(16))
    sizes = {i.filename: i.predicted_bytes for i in plan.artifacts}
    source_bytes = tree_size(plan.source.path)
    scratch = max((sizes[i.filename] + sum(sizes.get(d, 0) for d in inputs_of(i))
                   + (source_bytes if get(i.backend).reads_source(i) else 0) for i in plan.artifacts), default=0)
    portable = replace(context, reporter=None)
    if store:  # no path of the driver's travels: a node has none of them
        nowhere = Path("/nonexistent-driver-path")
        portable = replace(portable, out_dir=nowhere, source=replace(context.source, path=nowhere, config={}),
                           evaluation=None)
    ask = Ask(tuple(plan.artifacts), tools, portable,
              store.put(probe).digest if store else str(probe), probe.read_text(), source_bytes,
              store.url if store else None, scratch if store else 0)
    check = ray.remote(node_report)
    workers = [n for n in nodes if n.cpus >= 1]
    refs = [check.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n.id, soft=False),
                          name=f"quantkit preflight {n.name}", max_retries=0).remote(ask, n.name, n.gpus, token)
            for n in workers]
    reports = []
    try:
        for node, ref in zip(workers, refs):
            try:
                report = ray.get(ref, timeout=300)
            except Exception as e:  # the node died, or could not start a worker: it cannot run steps either
                if node.id not in {n.id for n in alive_nodes(ray)}:
                    continue  # gone since it was listed: Ray will not place a step there
                report = NodeReport(node.name, (f"the preflight could not run there: {type(e).__name__}: "
                                                f"{str(e).splitlines()[0] if str(e) else ''}",))
            if report.wrote and not _wrote_back(report.wrote, store):
                report = replace(report, problems=report.problems + (
                    "writes where the driver does not see it (its probe is not there)",))
            reports.append(report)
    finally:
        probe.unlink(missing_ok=True)
    bad = [r for r in reports if r.problems]
    if bad:
        raise ClusterError(f"{len(bad)} of {len(reports)} Ray node(s) cannot run this build:\n" + "\n".join(
            f"  {r.node}: {'; '.join(r.problems)}" for r in bad),
            "fix those nodes (docs/cluster.md says what each needs), or stop them")
    return reports


def _wrote_back(wrote: str, store: ArtifactStore | None) -> bool:
    """Whether the driver sees the probe a node wrote (a file of the build folder, removed; or a store object)."""
    if store is not None:
        return store.has(wrote)
    mine = Path(wrote)
    seen = mine.is_file()
    mine.unlink(missing_ok=True)
    return seen
