"""Before any step runs, a tiny task pinned to each node that can take steps checks that the node can run what it
may be given, and the build refuses with one line per bad node. Without it, a node that lacks a tool, has another
version of one, or cannot see the build folder fails hours into a build, deep in a step.

What a node checks (node_report, on the node):
- every format of the plan loads there (a third-party format's package included) and has what it requires (a
  CUDA requirement only on a node that offers Ray GPUs, and there as many CUDA devices as it offers);
- each artifact's tools have the identity the build's resume keys record (formats' `tools()`, computed on the
  driver): another llama-cpp-python, another llama.cpp binary or another exllamav2 would make other bytes under
  the same key;
- the build folder is the driver's: it reads back a probe file the driver wrote there, and writes one the driver
  reads back (a node that sees an empty folder of the same name, or none, is refused);
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
from .nodes import Node
from .tasks import HubToken


@dataclass(frozen=True)
class Ask:
    """What every node is asked to confirm (the same for all)."""

    items: tuple[ArtifactPlan, ...]
    tools: dict[str, dict[str, str]]  # the driver's Format.tools per artifact: what the keys record
    context: BuildContext  # without its reporter
    probe: str  # a file in the build folder
    probe_text: str
    source_bytes: int  # room a node needs to fetch the source


@dataclass(frozen=True)
class NodeReport:
    node: str
    problems: tuple[str, ...]
    wrote: str = ""  # the node's own probe file in the build folder ("" if it could not write one)


def node_report(ask: Ask, name: str, gpus: int, token: HubToken | None) -> NodeReport:
    """The checks of one node, on that node (`name` and `gpus`: how the driver names it and the GPUs it offers)."""
    problems: list[str] = []
    for backend in dict.fromkeys(i.backend for i in ask.items):
        try:
            fmt = get(backend)
        except ProfileError as e:
            problems.append(f"format {backend} does not load: {e}")
            continue
        missing = [r.what for r in fmt.requirements() if not r.available and (gpus or not r.gpu)]
        if missing:
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
    wrote = ""
    probe = Path(ask.probe)
    try:
        seen = probe.read_text() if probe.is_file() else None
        if seen != ask.probe_text:
            problems.append(f"does not see the driver's build folder {probe.parent.parent} (its probe file is "
                            f"{'missing' if seen is None else 'another'} here)")
        else:
            mine = probe.with_name(f"{probe.name}.{secrets.token_hex(4)}.node")
            mine.write_text(name)
            wrote = str(mine)
    except OSError as e:
        problems.append(f"cannot use the build folder {probe.parent.parent}: {e.strerror or e}")
    problems += _source_problems(ask, token)
    if any(r.gpu for b in dict.fromkeys(i.backend for i in ask.items) for r in _requirements(b)) and gpus:
        from ..gpus import cuda_devices

        if (found := cuda_devices()) < gpus:
            problems.append(f"offers {gpus} GPU(s) to Ray and has {found} CUDA device(s)")
    return NodeReport(name, tuple(problems), wrote)


def _requirements(backend: str):
    try:
        return get(backend).requirements()
    except ProfileError:
        return []


def _source_problems(ask: Ask, token: HubToken | None) -> list[str]:
    source = ask.context.source
    if source.path.exists() or not any(get(i.backend).reads_source(i) for i in ask.items):
        return []
    if not source.repo_id:
        return [f"does not see the source folder {source.path} (a local source must be on storage every node shares)"]
    from huggingface_hub import auth_check, constants

    try:
        auth_check(source.repo_id, token=token.value if token else None)
    except Exception as e:  # gated, missing, or the Hub out of reach: the node cannot fetch the source
        gated = "gated" in type(e).__name__.lower()
        return [f"cannot fetch the source {source.repo_id}: {type(e).__name__}"
                + ("; set HF_TOKEN to a token with access" if gated and token is None else "")]
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(cache).free) < ask.source_bytes:
        return [f"has {human_size(free)} free in its Hugging Face cache {cache} and the source needs "
                f"{human_size(ask.source_bytes)}"]
    return []


def run_preflight(ray, nodes: list[Node], plan: BuildPlan, context: BuildContext, tools: dict[str, dict[str, str]],
                  token: HubToken | None) -> list[NodeReport]:
    """The checks on every node that can take a step (a CPU); raise ClusterError with a line per bad node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..fsutil import tree_size

    state = plan.out_dir / ".quantkit"
    state.mkdir(parents=True, exist_ok=True)
    probe = state / f"preflight-{secrets.token_hex(4)}"
    probe.write_text(secrets.token_hex(16))
    ask = Ask(tuple(plan.artifacts), tools, replace(context, reporter=None), str(probe), probe.read_text(),
              tree_size(plan.source.path))
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
                report = NodeReport(node.name, (f"the preflight could not run there: {type(e).__name__}: "
                                                f"{str(e).splitlines()[0] if str(e) else ''}",))
            if report.wrote:
                mine = Path(report.wrote)
                if not mine.is_file():
                    report = replace(report, problems=report.problems + (
                        "writes to a build folder the driver does not see (its probe file is not here)",))
                mine.unlink(missing_ok=True)
            reports.append(report)
    finally:
        probe.unlink(missing_ok=True)
    bad = [r for r in reports if r.problems]
    if bad:
        raise ClusterError(f"{len(bad)} of {len(reports)} Ray node(s) cannot run this build:\n" + "\n".join(
            f"  {r.node}: {'; '.join(r.problems)}" for r in bad),
            "fix those nodes (docs/cluster.md says what each needs), or stop them")
    return reports
