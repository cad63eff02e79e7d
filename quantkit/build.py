"""The build: plan, make every artifact, evaluate each, write the reports. Resumable."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from . import formats
from .cpus import usable_cpus
from .errors import BuildFolderError, DiskSpaceError, ProfileError, QualityGateFailed, SmokeTestFailed
from .evaluate.chat import smoke_messages
from .evaluate.experts import is_moe, keeps_experts_mapped
from .evaluate.integrity import CONVERSATIONS, ChatFacts, EngineVerdict, check_source_template, folder_facts, mismatches
from .evaluate.placement import refuse_unplaced
from .evaluate.probes import prompts as probe_prompts
from .evaluate.protocol import EvalSpec
from .evaluate.reference_time import ReferenceTime, predict
from .gates import bound_failures
from .executors import Executor, LocalExecutor, Made
from .fsutil import check_free_space, remove_partials, sha256_text
from .graph import StepGraph
from .manifest import SCHEMA, STATE_DIR, Manifest
from .memory import (REFERENCE, StepMemory, machine_memory, reference_peak, streamed_reference_mapped,
                     streamed_reference_peak)
from .plan import ArtifactPlan, BuildPlan, EvalResult, from_record
from .results import Built, Judged
from .profiles import Profile, load_profile
from .progress import Reporter
from .report import parity_checks, write_reports
from .source import Source, resolve, tensor_stats

# Vocabulary size used for the scratch estimate before the reference GGUF exists.
_DEFAULT_VOCAB = 152_064


@dataclass
class BuildResult:
    """What run_build made, measured and judged. A build whose artifacts failed their checks still returns one
    (the files and reports are written); `error()` says what failed, and the CLI exits with its code."""

    plan: BuildPlan
    artifacts: list[Judged]
    built: list[str]  # filenames made in this run (empty on a fully resumed run)
    evaluated: list[str]
    report_json: Path
    report_md: Path
    seconds: float

    @property
    def failed(self) -> list[Judged]:
        """Artifacts outside the profile's bounds or with chat-integrity mismatches (gates.bound_failures)."""
        return [r for r in self.artifacts if r.failures]

    @property
    def smoke_failed(self) -> list[Judged]:
        return [r for r in self.artifacts if r.evaluation and not r.evaluation.smoke_passed]

    def error(self) -> QualityGateFailed | SmokeTestFailed | None:
        """The failure to report (exit 7: failed checks, or a failed smoke test the profile does not allow), or
        None when the build succeeded."""
        if gated := self.failed:
            return QualityGateFailed(
                f"{len(gated)} artifact(s) failed their checks: {', '.join(r.variant for r in gated)} "
                f"(see {self.report_md})",
                "the files and reports are written; `quantkit publish` refuses them unless given --allow-failed")
        if (smoke := self.smoke_failed) and not self.plan.profile.smoke.allow_failures:
            return SmokeTestFailed(
                f"smoke test failed for {len(smoke)} artifact(s): {', '.join(r.variant for r in smoke)} "
                f"(see {self.report_md})",
                "the files and reports are written; set smoke.allow_failures: true in the profile to accept this")
        return None

    def raise_for_failures(self) -> None:
        if (error := self.error()) is not None:
            raise error


def make_plan(source: str | Source, profile: str | Profile | None = None, out: str | Path = "builds", *,
              revision: str | None = None, allow_pickle: bool = False,
              converter: str | None = None, remote_gpus: bool = False, memory_limit: int | None = None,
              memory_where: str = "this machine", gpu_memory: int = 0, reporter: Reporter | None = None) -> BuildPlan:
    """What a build will make. `converter`: a checkout of a format's converter to use instead of the bundled one
    (GGUF: a llama.cpp tree; the CLI's --llama-cpp). `remote_gpus`: the steps run on a Ray cluster with GPU nodes, so a backend that
    needs a GPU is planned even where this machine has none. `memory_limit`: what one step may use (default:
    this machine's memory, or $QUANTKIT_MEMORY); BuildPlan.check_memory() refuses steps beyond it. `gpu_memory`:
    plan for a machine with a CUDA GPU of this many bytes (the CLI's `plan --gpu`), as remote_gpus does. `reporter` hears
    of the download's retries and of a source taken from the Hugging Face cache."""
    src = source if isinstance(source, Source) else resolve(
        source, revision=revision, allow_pickle=allow_pickle, log=reporter.warn if reporter else None)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    ev = prof.evaluation
    facts = folder_facts(src.path)
    check_source_template(facts)
    if is_moe(src.config) and ev.enabled:
        # A MoE's router and expert names are where a checkpoint and transformers' loader part ways.
        refuse_unplaced(src.path, str(src.config.get("model_type") or ""))
    for line in prof.deprecated:
        (reporter.warn if reporter else warnings.warn)(line)
    # Every format's options are read first: a typo is reported even for a format this machine cannot run.
    read = []
    for name, options in prof.formats.items():
        options = dict(options)
        when = options.pop("if_unavailable", "fail")
        if when not in ("fail", "skip"):
            raise ProfileError(f"{name}.if_unavailable must be fail or skip, got {when!r}", "fix the profile")
        fmt = formats.get(name)
        read.append((fmt, fmt.read_options(options), when))
    chosen, skipped = [], []
    for fmt, options, when in read:
        try:
            fmt.require(remote_gpus or gpu_memory > 0)  # every format's needs, before any of them plans or builds
        except ProfileError as e:
            if when == "fail":
                raise
            skipped.append(f"{fmt.name}: {e}; skipped (if_unavailable: skip)")
            continue
        chosen.append((fmt, options))
    items = []
    for fmt, options in chosen:
        items += fmt.plan(src, options, converter)
    vocab = int(src.config.get("vocab_size") or _DEFAULT_VOCAB)
    tokens = ev.max_tokens or 31_000  # the bundled text is 30,930 SmolLM2 tokens
    scratch = (tokens // ev.window) * (ev.window // 2) * vocab * 2 if ev.enabled else 0
    evaluations = []
    limit = machine_memory() if memory_limit is None else memory_limit
    streamed = False
    ref_time = None
    eval_temp = 0
    if ev.enabled:
        stats = tensor_stats(src.path)
        reference, streamed = reference_step(src, stats, ev, vocab, tokens // ev.window, limit)
        evaluations.append(reference)
        ref_time = predict_reference_time(stats, prof, facts, (tokens // ev.window) * ev.window, streamed)
        for item in items:
            fmt = formats.get(item.backend)
            if fmt.evaluation and item.is_model:
                held = item.runtime_bytes or item.predicted_bytes
                evaluations.append(StepMemory(f"evaluate {item.filename}", item.filename,
                                              fmt.evaluation_peak(held, vocab, ev.window, src.config, item),
                                              fmt.evaluation_mapped(item),
                                              max(1, -(-(tokens // ev.window) // fmt.evaluation.windows_per_pass))))
        # A runner's scratch (MLX's dequantized checkpoint) stays from an artifact's first round to its last: with a
        # precision target every artifact's can be there at once; without, each goes when its one run ends.
        temp = [formats.get(i.backend).evaluation_scratch(i) for i in items if i.is_model]
        eval_temp = sum(temp) if ev.precision else max(temp, default=0)
        scratch += eval_temp
    # Absolute: converters run in working directories of their own.
    return BuildPlan(source=src, profile=prof, out_dir=Path(out).absolute() / src.name, artifacts=items,
                     eval_scratch_bytes=scratch, skipped=skipped, evaluations=evaluations,
                     memory_limit=limit, memory_where=memory_where, reference_streamed=streamed, gpu_memory=gpu_memory,
                     reference_time=ref_time, eval_temp_bytes=eval_temp)


def reference_step(src: Source, stats, ev, vocab: int, n_windows: int, limit: int) -> tuple[StepMemory, bool]:
    """The reference's step and whether it runs streamed (evaluate/streamed.py): as the profile says, or with
    `auto`, when the in-memory run would need more than `limit` and the checkpoint can be read layer by layer.
    `stats`: source.TensorStats of the checkpoint."""
    # Experts kept one module each (evaluate/experts.py): no fused copy, and one expert widened at a time.
    mapped = keeps_experts_mapped(src.config)
    in_memory = reference_peak(stats.params, stats.weight_bytes, stats.largest if mapped else stats.largest_module,
                               vocab, ev.window, 0 if mapped else stats.expert_bytes)
    # A MoE transformers fuses on load cannot be read a tensor per parameter (no defuser for it).
    streamable = mapped or not is_moe(src.config)
    streamed = ev.reference == "streamed" or (ev.reference == "auto" and streamable and bool(limit) and in_memory > limit)
    if not streamed:
        # The weights as stored stay memory-mapped, and every window runs through all of them; fused experts are
        # copies (anonymous), their file pages read once.
        weights = stats.weight_bytes - (0 if mapped else stats.expert_bytes)
        return StepMemory("reference (fp16 source, transformers)", REFERENCE, in_memory, weights, max(1, n_windows)), False
    peak = streamed_reference_peak(stats, src.config, vocab, ev.window, max(1, n_windows))
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
              converter: str | None = None, executor: Executor | None = None, store: str | None = None) -> BuildResult:
    """Build what is missing, evaluate, judge, report. `executor`: where the artifact steps run (default: here,
    one after another; quantkit.cluster.RayExecutor: as tasks on a Ray cluster). `store`: an artifact store URL
    (store.py) that keeps the build for other machines: a local build uploads each artifact once it is made and
    mirrors its manifest and reports there, so a worker elsewhere resumes or publishes it from the store alone (a
    RayExecutor has its own, which this must then be). Artifacts that fail their checks do not raise: the result
    lists them (BuildResult.error, raise_for_failures)."""
    from .evaluate.evaluator import Evaluator

    reporter = reporter or Reporter()
    plan.check_memory()
    for line in plan.skipped + plan.re_reads():
        reporter.warn(line)
    threads = threads or usable_cpus()
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
    executor = executor or LocalExecutor()
    if store and executor.store_url and store != executor.store_url:
        raise BuildFolderError(f"the build's store {store} is not its Ray executor's ({executor.store_url})",
                               "pass one store")
    manifest = _open_manifest(out, executor.store_url or store, reporter, steps_here=not executor.store_url)
    if manifest.upgraded:
        reporter.info(f"{out.name} was built by an older quantkit (manifest schema {manifest.schema}, now {SCHEMA}): "
                      "what it keyed differently is made again, the rest is kept")
    for p in remove_partials(out):
        reporter.info(f"removed {p.name} left by an interrupted run")

    source_key = _source_key(plan.source, manifest)
    if not executor.store_url:  # with a store, the artifacts and the evaluation's files go there
        missing = [a for a in plan.artifacts if not (out / a.filename).exists()]
        need = sum(a.predicted_bytes for a in missing)
        if not (manifest.state_dir / "reference-logprobs.npy").exists():
            need += plan.eval_scratch_bytes
        elif any(f"eval:{a.filename}" not in manifest.steps for a in plan.artifacts if a.is_model):
            need += plan.eval_temp_bytes  # the reference rows are there; an artifact still to score writes its scratch
        check_free_space(out, need, f"{len(missing)} artifact(s) and evaluation scratch")

    # The evaluation text is tokenized first: one too short for the context fails before any build.
    evaluating = plan.profile.evaluation.enabled
    source_chat = folder_facts(plan.source.path)
    if plan.profile.chat_checks.engine:  # an engine that is not installed stops the build now, not after it
        for name in dict.fromkeys(i.backend for i in plan.artifacts):
            formats.get(name).engine_identity()
    evaluator = Evaluator(manifest, plan.profile, plan.source, source_key, reporter, threads, executor,
                          memory={e.target: e.peak_bytes for e in plan.evaluations}, source_chat=source_chat,
                          streamed=plan.reference_streamed)
    tokens = None
    if evaluating:
        ids, bos = evaluator.tokens()
        tokens = EvalSpec(tokens=str(ids), window=plan.profile.evaluation.window, bos=bos, threads=threads)
    context = formats.BuildContext(source=plan.source, out_dir=out, reporter=reporter, threads=threads, converter=converter,
                                evaluation_text=plan.profile.evaluation.text, evaluation=tokens)
    executor.prepare(plan, context, manifest)
    built, keys, tools = [], {}, {}
    keep_here = manifest.store is not None and not executor.store_url  # a local build with a store: upload each artifact
    made: dict[str, Built] = {}

    def record(item: ArtifactPlan, facts: dict, stored: Made | None = None) -> None:
        """Record a finished step: from its file, or from what the task that made it in the store read of it."""
        path = out / item.filename
        if stored:
            manifest.keep_stored(path, stored.digest)
            described, chat = stored.description, {"chat": stored.chat.to_json()} if stored.chat else {}
        else:
            described, chat = formats.get(item.backend).describe(item, path, facts), {}
        made[item.filename] = result = Built.make(item, described, manifest.sha256(path), facts, tools[item.filename])
        manifest.record(f"artifact:{item.filename}", keys[item.filename], path, facts=facts, result=result.to_dict(),
                        **chat)
        if keep_here:
            _store_artifact(manifest, path, reporter)

    def admit(item: ArtifactPlan) -> bool:
        """Whether `item` is still to build (its inputs are recorded, so its key can be made)."""
        keys[item.filename] = key = _artifact_key(item, context, keys, manifest, source_key, tools)
        rec = manifest.done(f"artifact:{item.filename}", key, out / item.filename)
        old = Built.from_dict(rec["result"]) if rec and isinstance(rec.get("result"), dict) else None
        if rec is None:
            return True
        fmt = formats.get(item.backend)
        if manifest.stored_digest(out / item.filename) and (old is None or (
                fmt.evaluation and item.is_model and "chat" not in rec)):
            return True  # in the store, without what its task read of it there (its description, its chat facts)
        if old is None:  # built, then interrupted before it was described (or described by an older quantkit)
            record(item, rec.get("facts", {}))
            built.append(item.filename)
        else:
            made[item.filename] = old.planned_as(item)
            reporter.info(f"✓ {item.filename} (up to date)")
        return False

    for item, facts, stored in executor.build(StepGraph(plan.artifacts, admit), context):
        record(item, facts, stored)
        built.append(item.filename)
    for p in remove_partials(out):  # an attempt on a node that was lost: its step was made again elsewhere
        reporter.info(f"removed {p.name} left by a lost attempt")
    if keep_here:  # and those made before the build had its store
        for item in plan.artifacts:
            _store_artifact(manifest, out / item.filename, reporter)

    # Measured: the chat integrity of every model a runner can load, and its evaluation (the runs go out together).
    integrity: dict[str, list[str]] = {}
    scored = []  # (file name, (file, its format's Evaluation, a parity run)) for every model artifact
    for item in plan.artifacts:
        fmt = formats.get(item.backend)
        if fmt.evaluation and item.is_model:
            chat = _chat_facts(item, out, manifest)
            integrity[item.filename] = [m.render() for m in mismatches(source_chat, chat)]
            if evaluating:
                scored.append((item.filename, (out / item.filename, fmt.evaluation, item.role == "intermediate")))
    evaluations = dict(zip([name for name, _ in scored], evaluator.evaluate([target for _, target in scored])))
    reference = evaluator.reference_result() if evaluating else None
    engines = (engine_verdicts(plan.artifacts, out, manifest, source_chat, source_call(reference), reporter, threads,
                               executor) if plan.profile.chat_checks.engine else {})
    for name, verdict in engines.items():
        integrity[name] += verdict.template
    measured = [made[i.filename].measured(integrity.get(i.filename, []), evaluations.get(i.filename),
                                          engines.get(i.filename)) for i in plan.artifacts]
    results = [m.judged(bound_failures(m, plan.profile.bounds)) for m in measured]

    report_json, report_md = write_reports(plan, results, reference, manifest)
    if manifest.store:  # another coordinator resumes, and publishes, from the store alone
        for path in (report_json, report_md):
            manifest.store.put_state(out.name, path.name, path)
    for check in parity_checks(results):
        if not check.passed:
            reporter.warn(f"{check.render()}: every file this runtime measured is suspect")
    result = BuildResult(plan, results, built, evaluator.ran, report_json, report_md, time.monotonic() - start)
    for r in result.smoke_failed:
        reporter.warn(f"smoke test failed for {r.filename}: {r.evaluation.smoke_reason}; reply: {r.evaluation.smoke_reply!r}")
    for r in result.failed:
        reporter.warn(f"{r.filename} failed: {'; '.join(r.failures)}")
    return result


def source_call(reference: EvalResult | None) -> dict | None:
    """The fp16 source's tool call ({name, arguments}) from its tool-call probe, when it made a valid one."""
    probe = (reference.probes or {}).get("tool_call") if reference else None
    value = probe.get("value") if isinstance(probe, dict) and probe.get("valid") else None
    return {"name": value["name"], "arguments": value["arguments"]} if isinstance(value, dict) and "name" in value else None


def engine_verdicts(items: list[ArtifactPlan] | list[Judged], out: Path, manifest: Manifest, source: ChatFacts,
                    call: dict | None, reporter: Reporter, threads: int,
                    executor: Executor | None = None) -> dict[str, EngineVerdict]:
    """Each model artifact's chat setup in its runtime's own engine (Format.engine_check), where `executor` has the
    file (default: here). A verdict is kept in the manifest under everything it depends on (the file's content, the
    engine, the source's renderings, the call), so a resumed build asks the engine again only about what changed.
    `items`: a plan's artifacts, or a report's."""
    executor = executor or LocalExecutor()
    renders = json.dumps([source.render(name) for name in CONVERSATIONS])
    verdicts = {}
    for item in items:
        fmt = formats.get(item.backend)
        if not (fmt.evaluation and item.is_model) or not (engine := fmt.engine_identity()):
            continue
        path = out / item.filename
        key = sha256_text("engine", manifest.sha256(path), engine, renders, json.dumps(call, sort_keys=True))
        rec = manifest.done(f"engine:{item.filename}", key)
        if rec and (verdict := from_record(EngineVerdict, rec.get("verdict") or {})):
            verdicts[item.filename] = verdict
            continue
        reporter.info(f"checking {item.filename} in {engine.split()[0]}: template and tool calls")
        verdicts[item.filename] = verdict = executor.on_artifact(path, fmt.engine_check, source, call, threads)
        manifest.record(f"engine:{item.filename}", key, verdict=asdict(verdict))
    return verdicts


def _open_manifest(out: Path, store_url: str | None, reporter: Reporter, steps_here: bool) -> Manifest:
    """The build folder's manifest, locked. With a store: taken from the store when this folder has none (another
    coordinator's build, resumed), and mirrored there after every change. When the steps run here (`steps_here`:
    not as tasks that read the store themselves), the artifacts the build keeps only in its store are fetched
    first: a local step reads its inputs here."""
    if store_url and not (out / STATE_DIR / "manifest.json").exists():
        from .store import ArtifactStore

        if ArtifactStore(store_url).get_state(out.name, f"{STATE_DIR}/manifest.json", out / STATE_DIR / "manifest.json"):
            reporter.info(f"resuming {out.name} from the manifest in {store_url}")
    manifest = Manifest(out)
    manifest.lock()
    if store := manifest.open_store(store_url):
        manifest.mirror = lambda path: store.put_state(out.name, f"{STATE_DIR}/{path.name}", path)
        if steps_here:
            manifest.fetch_stored(reporter.info)
    return manifest


def _store_artifact(manifest: Manifest, path: Path, reporter: Reporter) -> None:
    """A local build with a store: an artifact made here, uploaded unless the store has it as it is now."""
    rel = path.relative_to(manifest.out_dir).as_posix()
    if not path.exists() or manifest.stored.get(rel) == manifest.hashes.sha256(path):
        return
    reporter.info(f"storing {rel} in {manifest.store_url}")
    manifest.keep_stored(path, manifest.store.put(path, manifest.hashes).digest)
    manifest.save()


def _chat_facts(item: ArtifactPlan, out: Path, manifest: Manifest) -> ChatFacts:
    """The artifact's chat facts: read from its file, or for one in the store, as its task read them there."""
    path = out / item.filename
    if manifest.stored_digest(path):
        return ChatFacts.from_json(manifest.steps[f"artifact:{item.filename}"]["chat"])
    return formats.get(item.backend).chat_facts(path)


def _artifact_key(item: ArtifactPlan, context: formats.BuildContext, keys: dict[str, str], manifest: Manifest,
                  source_key: str, tools: dict[str, dict[str, str]]) -> str:
    """Everything that changes the artifact's bytes: its plan, what it is made from (the parent's content, the
    keys of the artifacts it uses), and what its format says besides (its own tools' versions, the content of
    files its options name). Never a path: a moved build folder keeps its keys."""
    fmt = formats.get(item.backend)
    tools[item.filename] = fmt.tools(item, context)
    parent_sha = manifest.made_sha256(context.out_dir / item.depends_on) if item.depends_on else source_key
    made_by = json.dumps({"tools": tools[item.filename], "inputs": fmt.inputs(item, context)}, sort_keys=True)
    return sha256_text("artifact", item.backend, item.variant, repr(sorted(item.options.items())),
                       keys.get(item.depends_on, ""), parent_sha, *(keys[u] for u in item.uses), made_by)


def _source_key(source: Source, manifest: Manifest) -> str:
    files = sorted(p for p in source.path.iterdir() if p.is_file() and not p.name.startswith("."))
    return sha256_text("source", *(f"{p.name}:{manifest.sha256(p)}" for p in files))
