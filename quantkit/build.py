"""The build: plan, make every artifact, evaluate each, write the reports. Resumable."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import formats
from .errors import DiskSpaceError, ProfileError, QualityGateFailed, SmokeTestFailed
from .evaluate.chat import smoke_messages
from .evaluate.experts import is_moe, keeps_experts_mapped
from .evaluate.integrity import check as check_chat, check_source_template, folder_facts
from .evaluate.placement import refuse_unplaced
from .evaluate.probes import prompts as probe_prompts
from .evaluate.reference_time import ReferenceTime, predict
from .gates import judge
from .executors import Executor, LocalExecutor
from .fsutil import check_free_space, remove_partials, sha256_text
from .manifest import SCHEMA, Manifest
from .memory import (REFERENCE, StepMemory, machine_memory, reference_peak, streamed_reference_mapped,
                     streamed_reference_peak)
from .plan import ArtifactPlan, ArtifactResult, BuildPlan, from_record
from .profiles import Profile, load_profile
from .progress import Reporter
from .report import parity_checks, write_reports
from .source import Source, resolve, tensor_stats

# Vocabulary size used for the scratch estimate before the reference GGUF exists.
_DEFAULT_VOCAB = 152_064


@dataclass
class BuildResult:
    plan: BuildPlan
    artifacts: list[ArtifactResult]
    built: list[str]  # filenames made in this run (empty on a fully resumed run)
    evaluated: list[str]
    report_json: Path
    report_md: Path
    seconds: float


def make_plan(source: str | Source, profile: str | Profile | None = None, out: str | Path = "builds", *,
              revision: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
              converter: str | None = None, remote_gpus: bool = False, memory_limit: int | None = None,
              memory_where: str = "this machine", gpu_memory: int = 0, reporter: Reporter | None = None) -> BuildPlan:
    """What a build will make. `converter`: a checkout of a format's converter to use instead of the bundled one
    (GGUF: a llama.cpp tree; the CLI's --llama-cpp). `remote_gpus`: the steps run on a Ray cluster with GPU nodes, so a backend that
    needs a GPU is planned even where this machine has none. `memory_limit`: what one step may use (default:
    this machine's memory, or $QUANTKIT_MEMORY); BuildPlan.check_memory() refuses steps beyond it. `gpu_memory`:
    plan for a machine with a CUDA GPU of this many bytes (the CLI's `plan --gpu`), as remote_gpus does. `reporter` hears
    of the download's retries and of a source taken from the Hugging Face cache."""
    src = source if isinstance(source, Source) else resolve(
        source, revision=revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        log=reporter.warn if reporter else None)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    ev = prof.evaluation
    if ev.max_tokens and ev.max_tokens < 2 * ev.ctx:
        raise ProfileError(f"evaluation.max_tokens {ev.max_tokens} is less than two windows of ctx {ev.ctx}",
                           f"set evaluation.max_tokens to at least {2 * ev.ctx} (or 0 for the whole text)")
    facts = folder_facts(src.path)
    check_source_template(facts)
    if is_moe(src.config) and ev.enabled:
        # A MoE's router and expert names are where a checkpoint and transformers' loader part ways.
        refuse_unplaced(src.path, str(src.config.get("model_type") or ""))
    chosen, skipped = [], []
    for name, options in prof.backends.items():
        options = dict(options)
        when = options.pop("if_unavailable", "fail")
        if when not in ("fail", "skip"):
            raise ProfileError(f"{name}.if_unavailable must be fail or skip, got {when!r}", "fix the profile")
        backend = formats.get(name)
        backend.validate(options)
        try:
            backend.check(remote_gpus or gpu_memory > 0)  # every backend's needs, before any of them plans or builds
        except ProfileError as e:
            if when == "fail":
                raise
            skipped.append(f"{name}: {e}; skipped (if_unavailable: skip)")
            continue
        chosen.append((backend, options))
    items = []
    for backend, options in chosen:
        items += backend.plan(src, options, converter)
    vocab = int(src.config.get("vocab_size") or _DEFAULT_VOCAB)
    tokens = ev.max_tokens or 31_000  # the bundled text is 30,930 SmolLM2 tokens
    scratch = (tokens // ev.ctx) * (ev.ctx // 2) * vocab * 2 if ev.enabled else 0
    evaluations = []
    limit = machine_memory() if memory_limit is None else memory_limit
    streamed = False
    ref_time = None
    if ev.enabled:
        stats = tensor_stats(src.path)
        reference, streamed = reference_step(src, stats, ev, vocab, tokens // ev.ctx, limit)
        evaluations.append(reference)
        ref_time = predict_reference_time(stats, prof, facts, (tokens // ev.ctx) * ev.ctx, streamed)
        for item in items:
            fmt = formats.get(item.backend)
            if fmt.runner and item.is_model:
                held = item.runtime_bytes or item.predicted_bytes
                evaluations.append(StepMemory(f"evaluate {item.filename}", item.filename,
                                              fmt.evaluation_peak(held, vocab, ev.ctx, src.config, item),
                                              fmt.evaluation_mapped(item),
                                              max(1, -(-(tokens // ev.ctx) // fmt.windows_per_pass))))
        # Evaluations run one at a time: the largest scratch folder one of them writes (MLX's dequantized checkpoint).
        scratch += max((formats.get(i.backend).evaluation_scratch(i) for i in items if i.is_model), default=0)
    # Absolute: converters run in working directories of their own.
    return BuildPlan(source=src, profile=prof, out_dir=Path(out).absolute() / src.name, artifacts=items,
                     eval_scratch_bytes=scratch, skipped=skipped, evaluations=evaluations,
                     memory_limit=limit, memory_where=memory_where, reference_streamed=streamed, gpu_memory=gpu_memory,
                     reference_time=ref_time)


def reference_step(src: Source, stats, ev, vocab: int, n_windows: int, limit: int) -> tuple[StepMemory, bool]:
    """The reference's step and whether it runs streamed (evaluate/streamed.py): as the profile says, or with
    `auto`, when the in-memory run would need more than `limit` and the checkpoint can be read layer by layer.
    `stats`: source.TensorStats of the checkpoint."""
    # Experts kept one module each (evaluate/experts.py): no fused copy, and one expert widened at a time.
    mapped = keeps_experts_mapped(src.config)
    in_memory = reference_peak(stats.params, stats.weight_bytes, stats.largest if mapped else stats.largest_module,
                               vocab, ev.ctx, 0 if mapped else stats.expert_bytes)
    # A MoE transformers fuses on load cannot be read a tensor per parameter (no defuser for it).
    streamable = mapped or not is_moe(src.config)
    streamed = ev.reference == "streamed" or (ev.reference == "auto" and streamable and bool(limit) and in_memory > limit)
    if not streamed:
        # The weights as stored stay memory-mapped, and every window runs through all of them; fused experts are
        # copies (anonymous), their file pages read once.
        weights = stats.weight_bytes - (0 if mapped else stats.expert_bytes)
        return StepMemory("reference (fp16 source, transformers)", REFERENCE, in_memory, weights, max(1, n_windows)), False
    peak = streamed_reference_peak(stats, src.config, vocab, ev.ctx, max(1, n_windows))
    return StepMemory("reference (fp16 source, transformers, streamed layer by layer)", REFERENCE, peak,
                      streamed_reference_mapped(stats, src.config)), True


def predict_reference_time(stats, prof: Profile, facts, scored_tokens: int, streamed: bool) -> ReferenceTime:
    """The reference's scoring and chat turns, timed as evaluate/reference_time.py predicts: the chat turns are the
    smoke test (when the source has a chat template) and the probes, on the prompts the build will render."""
    prompts, replies = [], {}
    if facts.template and not streamed:  # the streamed reference does not generate
        smoke = prof.smoke
        prompts.append(facts.render_messages(smoke_messages(smoke.system, smoke.question)))
        replies["smoke"] = smoke.max_tokens
        if prof.chat_checks.enabled:
            for name, prompt in probe_prompts(facts, prof.chat_checks).items():
                prompts.append(prompt)
                replies[name.replace("_", " ")] = prof.chat_checks.max_tokens
    return predict(stats.params, stats.weight_bytes, scored_tokens, prompts, replies)


def run_build(plan: BuildPlan, *, reporter: Reporter | None = None, threads: int | None = None,
              converter: str | None = None, executor: Executor | None = None) -> BuildResult:
    """Build what is missing, evaluate, report. `executor`: where the artifact steps run (default: here,
    one after another; quantkit.executors.RayExecutor: as tasks on a Ray cluster)."""
    from .evaluate.runner import Evaluator

    reporter = reporter or Reporter()
    plan.check_memory()
    for line in plan.skipped + plan.re_reads():
        reporter.warn(line)
    threads = threads or os.cpu_count() or 1
    start = time.monotonic()
    out = plan.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".quantkit-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DiskSpaceError(f"cannot write to the output folder {out}: {e.strerror or e}",
                             "pass --out to a folder you can write to") from e
    manifest = Manifest(out)
    manifest.lock()
    if manifest.upgraded:
        reporter.info(f"{out.name} was built by an older quantkit (manifest schema {manifest.schema}, now {SCHEMA}): "
                      "what it keyed differently is made again, the rest is kept")
    for p in remove_partials(out):
        reporter.info(f"removed {p.name} left by an interrupted run")

    source_key = _source_key(plan.source, manifest)
    missing = [a for a in plan.artifacts if not (out / a.filename).exists()]
    need = sum(a.predicted_bytes for a in missing)
    if not (manifest.state_dir / "reference-logprobs.npy").exists():
        need += plan.eval_scratch_bytes
    check_free_space(out, need, f"{len(missing)} artifact(s) and evaluation scratch")

    # The evaluation text is tokenized first: one too short for the context fails before any build.
    executor = executor or LocalExecutor()
    evaluating = plan.profile.evaluation.enabled
    source_chat = folder_facts(plan.source.path)
    evaluator = Evaluator(manifest, plan.profile, plan.source.path, source_key, reporter, threads, executor,
                          memory={e.target: e.peak_bytes for e in plan.evaluations}, source_chat=source_chat,
                          streamed=plan.reference_streamed)
    tokens = None
    if evaluating:
        ids, bos = evaluator.tokens()
        tokens = {"tokens": str(ids), "bos": bos, "ctx": plan.profile.evaluation.ctx}
    ctx = formats.BuildContext(source=plan.source, out_dir=out, reporter=reporter, threads=threads, converter=converter,
                                evaluation_text=plan.profile.evaluation.text, evaluation=tokens)
    built, keys, tools = [], {}, {}
    described: dict[str, ArtifactResult] = {}

    def record(item: ArtifactPlan, facts: dict) -> None:
        path = out / item.filename
        result = formats.get(item.backend).describe(item, path, facts)
        result.sha256 = manifest.sha256(path)  # hashed once, by the manifest's cache
        result.peak_rss_bytes = int(facts.get("peak_rss_bytes", 0))
        result.peak_anon_bytes, result.peak_file_bytes = int(facts.get("peak_anon_bytes", 0)), int(facts.get("peak_file_bytes", 0))
        result.seconds = float(facts.get("seconds", 0.0))
        result.tools = tools[item.filename]
        described[item.filename] = result
        manifest.record(f"artifact:{item.filename}", keys[item.filename], path, facts=facts, result=result.to_dict())

    for wave in _waves(plan.artifacts):
        todo = []
        for item in wave:
            keys[item.filename] = key = _artifact_key(item, ctx, keys, manifest, source_key, tools)
            rec = manifest.done(f"artifact:{item.filename}", key, out / item.filename)
            old = from_record(ArtifactResult, {k: v for k, v in rec["result"].items() if k != "evaluation"}) \
                if rec and isinstance(rec.get("result"), dict) else None
            if rec is None:
                todo.append(item)
            elif old is None:  # built, then interrupted before it was described (or described by an older quantkit)
                record(item, rec.get("facts", {}))
                built.append(item.filename)
            else:
                described[item.filename] = old
                reporter.info(f"✓ {item.filename} (up to date)")
        for item, facts in executor.build(todo, ctx):
            record(item, facts)
            built.append(item.filename)
    results = []
    for item in plan.artifacts:
        result = described[item.filename]
        result.role, result.uses, result.predicted_bytes = item.role, list(item.uses), item.predicted_bytes  # plan facts
        result.predicted_peak_bytes = item.predicted_peak_bytes
        results.append(result)

    scored = []  # (result, (file, evaluation runner, GPUs it needs)) for every model artifact
    for item, result in zip(plan.artifacts, results):
        fmt = formats.get(item.backend)
        if fmt.runner and item.is_model:
            result.integrity = [m.render() for m in check_chat(source_chat, fmt.chat_facts(out / item.filename))]
            if evaluating:
                scored.append((result, (out / item.filename, fmt.runner, fmt.gpus)))
    for (result, _), evaluation in zip(scored, evaluator.evaluate([target for _, target in scored])):
        result.evaluation = evaluation
    reference = evaluator.reference_result() if evaluating else None

    for r in results:
        r.failures = judge(r.to_dict(), plan.profile.bounds)
    report_json, report_md = write_reports(plan, results, reference, manifest)
    for check in parity_checks([r.to_dict() for r in results]):
        if not check.passed:
            reporter.warn(f"{check.render()}: every file this runtime measured is suspect")
    seconds = time.monotonic() - start
    failures = [r for r in results if r.evaluation and not r.evaluation.smoke_passed]
    for r in failures:
        reporter.warn(f"smoke test failed for {r.filename}: {r.evaluation.smoke_reason}; reply: {r.evaluation.smoke_reply!r}")
    result = BuildResult(plan, results, built, evaluator.ran, report_json, report_md, seconds)
    if gated := [r for r in results if r.failures]:
        for r in gated:
            reporter.warn(f"{r.filename} failed: {'; '.join(r.failures)}")
        raise QualityGateFailed(
            f"{len(gated)} artifact(s) failed their checks: {', '.join(r.variant for r in gated)} (see {report_md})",
            "the files and reports are written; `quantkit publish` refuses them unless given --allow-failed",
        )
    if failures and not plan.profile.smoke.allow_failures:
        raise SmokeTestFailed(
            f"smoke test failed for {len(failures)} artifact(s): {', '.join(r.variant for r in failures)} (see {report_md})",
            "the files and reports are written; set smoke.allow_failures: true in the profile to accept this",
        )
    return result


def _waves(items: list[ArtifactPlan]) -> list[list[ArtifactPlan]]:
    """The plan in waves: each artifact comes one wave after the last of its inputs (plan order within a wave)."""
    depth: dict[str, int] = {}
    for item in items:  # a plan lists every artifact after its inputs
        depth[item.filename] = 1 + max((depth.get(d, -1) for d in (item.depends_on, *item.uses) if d), default=-1)
    waves: list[list[ArtifactPlan]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for item in items:
        waves[depth[item.filename]].append(item)
    return waves


def _artifact_key(item: ArtifactPlan, ctx: formats.BuildContext, keys: dict[str, str], manifest: Manifest,
                  source_key: str, tools: dict[str, dict[str, str]]) -> str:
    """Everything that changes the artifact's bytes: its plan, what it is made from (the parent's content, the
    keys of the artifacts it uses), and what its format says besides (its own tools' versions, the content of
    files its options name). Never a path: a moved build folder keeps its keys."""
    fmt = formats.get(item.backend)
    tools[item.filename] = fmt.tools(item, ctx)
    parent_sha = manifest.sha256(ctx.out_dir / item.depends_on) if item.depends_on else source_key
    made_by = json.dumps({"tools": tools[item.filename], "inputs": fmt.inputs(item, ctx)}, sort_keys=True)
    return sha256_text("artifact", item.backend, item.variant, repr(sorted(item.options.items())),
                       keys.get(item.depends_on, ""), parent_sha, *(keys[u] for u in item.uses), made_by)


def _source_key(source: Source, manifest: Manifest) -> str:
    files = sorted(p for p in source.path.iterdir() if p.is_file() and not p.name.startswith("."))
    return sha256_text("source", *(f"{p.name}:{manifest.sha256(p)}" for p in files))
