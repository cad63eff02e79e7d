"""Run evaluations in child processes and keep their results in the manifest.

Every artifact of a model, whatever its format, is scored on the same token ids (the source's
tokenizer) against the same reference: the fp16 source checkpoint, run once through transformers.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..errors import ProfileError, ToolError
from ..executors import Executor, HelperRun, LocalExecutor
from ..formats.base import HF_RUNNER, Evaluation
from ..fsutil import atomic_path, sha256_text
from ..manifest import Manifest
from ..memory import REFERENCE
from ..plan import STAT_KEYS, EvalResult, from_record
from ..procs import run_python
from ..profiles import Profile
from ..source import Source
from ..progress import Reporter
from .integrity import ChatFacts, folder_facts
from .metrics import windows
from .probes import compare_replies, prompts
from .protocol import EvalOutput, EvalSpec
from .stats import parse_precision
from .text import load_text

# With evaluation.precision, every artifact is first scored on this many windows; the rest as they need.
FIRST_ROUND = 8


def merge_runs(earlier: dict, later: dict) -> dict:
    """One evaluation from two rounds: the later one's statistics (it went on from the earlier one's tokens), the
    earlier one's chat replies, the larger peak memory and the time of both."""
    return {**earlier, **{k: v for k, v in later.items() if k not in ("smoke", "probes")},
            **{k: max(earlier.get(k, 0), later.get(k, 0)) for k in ("peak_rss_bytes", "peak_anon_bytes", "peak_file_bytes")},
            "seconds": earlier.get("seconds", 0) + later.get("seconds", 0)}


def runs_state(state_dir: Path, key: str) -> Path:
    """An unfinished evaluation's per-position values, between rounds (and across an interrupted build)."""
    return state_dir / f"eval-{key[:16]}.state.npz"


def runs_scratch(state_dir: Path, key: str) -> Path:
    """An unfinished evaluation's scratch folder (EvalSpec.scratch): what its runner prepared from the artifact,
    kept from its first round to its last (and across an interrupted build). Named by the evaluation's key, so by
    the artifact's content."""
    return state_dir / f"eval-{key[:16]}.scratch"


class Evaluator:
    def __init__(self, manifest: Manifest, profile: Profile, source: Source, source_key: str, reporter: Reporter,
                 threads: int, executor: Executor | None = None, memory: dict[str, int] | None = None,
                 source_chat: ChatFacts | None = None, streamed: bool = False) -> None:
        """`memory`: each step's predicted peak (artifact file name, or "reference"), for Ray's placement and the report.
        `streamed`: the reference runs layer by layer (evaluate/streamed.py), scoring only."""
        self.m, self.profile, self.source, self.source_key = manifest, profile, source, source_key
        self.memory = memory or {}
        self.reporter, self.threads = reporter, threads
        self.executor = executor or LocalExecutor()
        self.state = manifest.state_dir
        self.window = profile.evaluation.window
        self.ran: list[str] = []  # what was evaluated in this run (not taken from the manifest)
        self._tokens: tuple[Path, int | None] | None = None
        self.source_chat = source_chat or folder_facts(source.path)
        self.precision = parse_precision(profile.evaluation.precision)
        self.last_reference: EvalResult | None = None
        self.streamed = streamed

    def tokens(self) -> tuple[Path, int | None]:
        """The evaluation text as the source tokenizer's ids, and the BOS id each window starts with (if any)."""
        if self._tokens is None:
            self._tokens = self._make_tokens()
        return self._tokens

    def _make_tokens(self) -> tuple[Path, int | None]:
        text = load_text(self.profile.evaluation.text)
        out = self.state / "eval-tokens.npy"
        key = sha256_text("tokens", self.source_key, sha256_text(text), str(self.profile.evaluation.max_tokens))
        rec = self.m.done("tokens", key, out)
        if not rec:
            self.state.mkdir(parents=True, exist_ok=True)
            text_file, bos_file = self.state / "eval-text.txt", self.state / "eval-bos.json"
            text_file.write_text(text, encoding="utf-8")
            with atomic_path(out) as tmp:
                run_python(["-m", HF_RUNNER, "tokenize", str(self.source.path), str(text_file), str(tmp), str(bos_file)],
                           what="tokenizer")
                if self.profile.evaluation.max_tokens:
                    ids = np.load(tmp)[: self.profile.evaluation.max_tokens]
                    with open(tmp, "wb") as f:
                        np.save(f, ids)
            bos = json.loads(bos_file.read_text())["bos"]
            text_file.unlink()
            bos_file.unlink()
            rec = self.m.record("tokens", key, out, count=len(np.load(out)), bos=bos)
        n = rec["count"]
        if n < 2 * self.window:
            raise ProfileError(f"the evaluation text has {n} tokens, fewer than two windows of {self.window}",
                               "use a longer text, a smaller evaluation.window, or a larger evaluation.max_tokens")
        return out, rec.get("bos")

    def _keys(self) -> tuple[Path, str, str, EvalSpec]:
        tokens, bos = self.tokens()
        # What the runner asks and checks; whether a failure fails the build (allow_failures) is the build's call.
        smoke = {k: v for k, v in asdict(self.profile.smoke).items() if k != "allow_failures"}
        ref_key = sha256_text(REFERENCE, self.source_key, self.m.sha256(tokens), str(self.window))
        checks = self.profile.chat_checks
        probes = prompts(self.source_chat, checks) if checks.enabled and self.source_chat.template else None
        # `generate`: how the reference decodes its replies (hf_runner), keyed, as every artifact's probes are judged
        # against them; `streamed` is keyed too: the streamed reference has no chat replies to compare with.
        spec = EvalSpec(tokens=str(tokens), bos=bos, window=self.window, threads=self.threads, smoke=smoke, generate="stored",
                        probes=probes, probe_tokens=checks.max_tokens if probes is not None else None,
                        precision=self.precision, streamed=self.streamed)
        # The tokens are keyed by content (in ref_key), never by their path: protocol.UNKEYED.
        return tokens, ref_key, sha256_text(ref_key, spec.key_json()), spec

    @property
    def total_windows(self) -> int:
        return len(windows(int(self.m.steps["tokens"]["count"]), self.window))

    def reference(self, n_windows: int | None = None) -> EvalResult:
        """The fp16 source's own scores; its log-probabilities are kept for every artifact's KL-divergence.
        `n_windows`: at least this many windows of them (default: all); more are added to the same file."""
        _, ref_key, key, spec = self._keys()
        want = min(n_windows or self.total_windows, self.total_windows)
        ref_path, state = self.state / "reference-logprobs.npy", self.state / f"reference-{ref_key[:16]}.state.npz"
        rec = self._done(f"eval:{REFERENCE}", key)
        have = self.m.done(REFERENCE, ref_key, ref_path)
        if rec and have and have.get("windows", self.total_windows) >= want:
            self.last_reference = from_record(EvalResult, rec["result"])
            return self.last_reference
        if not have:
            self.m.discard(state)
        # No chat turns for more windows of a finished reference (its replies are known), nor for a streamed one
        # (a generated token would read every layer again: evaluate/streamed.py).
        spec = replace(spec, reference=True, ref_write=str(ref_path), windows=want, state=str(state),
                       chat=not ((rec and have) or self.streamed), causality=True)
        run = replace(self._helper(HF_RUNNER, self.source.path, spec, "the fp16 source (reference)",
                                   memory_key=REFERENCE), source=self.source)
        [run] = self.executor.run_helpers([run], self.reporter)
        raw = self._result(run)
        self.m.record(REFERENCE, ref_key, ref_path, windows=raw["windows"])
        if rec and have:
            raw = merge_runs(rec["raw"], raw)
        self.last_reference = self._record(f"eval:{REFERENCE}", key, raw, None, REFERENCE)
        return self.last_reference

    def reference_result(self) -> EvalResult:
        """The reference as far as the evaluations needed it (all of the text, without a precision target)."""
        return self.last_reference or self.reference(FIRST_ROUND if self.precision else None)

    def evaluate(self, artifacts: list[tuple[Path, Evaluation, bool]]) -> list[EvalResult]:
        """Score each (artifact, its format's Evaluation, whether it is its runtime's parity run: an unquantized
        intermediate, which also gets the causality probe) against the reference; the runs the manifest does not
        already hold go to the executor together (on Ray, at once). With evaluation.precision, in rounds: a few
        windows each, then as many more as the least precise artifact needs (the reference grows with them)."""
        _, _, base_key, spec = self._keys()
        results: dict[Path, EvalResult] = {}
        todo: dict[Path, tuple[Evaluation, bool, str]] = {}
        for artifact, evaluation, parity_run in artifacts:
            # The runner's environment is keyed with it: what it sets changes how the runtime computes.
            key = sha256_text("eval", evaluation.runner, *(f"{k}={v}" for k, v in sorted(evaluation.env.items())),
                              self.m.sha256(artifact), base_key)
            if rec := self._done(f"eval:{artifact.name}", key):
                results[artifact] = from_record(EvalResult, rec["result"])
            else:
                todo[artifact] = (evaluation, parity_run, key)
        self._drop_scratch(keep={key for _, _, key in todo.values()})
        total = self.total_windows
        n = min(FIRST_ROUND, total) if self.precision else total
        first: dict[Path, dict] = {}  # each artifact's first run: its chat replies and memory
        while todo:
            ref = self.reference(n)
            runs = {}
            for artifact, (evaluation, parity_run, key) in todo.items():
                run_spec = replace(spec, ref_read=str(self.state / "reference-logprobs.npy"), windows=n,
                                   state=str(runs_state(self.state, key)), scratch=str(runs_scratch(self.state, key)),
                                   chat=artifact not in first, causality=parity_run)
                runs[self._helper(evaluation.runner, artifact, run_spec, artifact.name, evaluation.gpus,
                                  env=evaluation.env)] = artifact
            need = n
            for run in self.executor.run_helpers(list(runs), self.reporter):
                artifact = runs[run]
                raw = self._result(run)
                if artifact in first:
                    raw = merge_runs(first[artifact], raw)
                first[artifact] = raw
                if raw.get("precise") or raw["windows"] >= total or not self.precision:
                    _, _, key = todo.pop(artifact)
                    self.m.discard(runs_state(self.state, key))
                    shutil.rmtree(runs_scratch(self.state, key), ignore_errors=True)
                    results[artifact] = self._record(f"eval:{artifact.name}", key, raw, ref, artifact.name)
                else:
                    need = max(need, self.precision.windows_needed(raw["kld_mean"], raw["kld_se"], raw["windows"]))
            n = min(total, max(need, n + 1))
        return [results[a] for a, _, _ in artifacts]

    def _drop_scratch(self, keep: set[str]) -> None:
        """Remove the scratch folders no evaluation of this run will use: an interrupted build's, of an artifact
        since changed or no longer built."""
        wanted = {runs_scratch(self.state, key).name for key in keep}
        for path in self.state.glob("eval-*.scratch"):
            if path.name not in wanted:
                shutil.rmtree(path, ignore_errors=True)

    def _done(self, step: str, key: str) -> dict | None:
        """The manifest's record of a finished evaluation, if its result can still be read (one an older quantkit
        wrote in a shape this one cannot read is run again)."""
        rec = self.m.done(step, key)
        ok = rec is not None and isinstance(rec.get("result"), dict) and from_record(EvalResult, rec["result"]) is not None
        return rec if ok else None

    def _helper(self, runner: str, target: Path, spec: EvalSpec, label: str, gpus: int = 0,
                memory_key: str | None = None, env: Mapping[str, str] | None = None) -> HelperRun:
        name = re.sub(r"[^\w.-]", "_", target.name)
        spec_file, result_file = self.state / f"eval-{name}.spec.json", self.state / f"eval-{name}.result.json"
        spec_file.write_text(json.dumps(spec.to_json()))
        return HelperRun(f"evaluate {label}", ("-m", runner, "evaluate", str(target), str(spec_file), str(result_file)),
                         self.state, cpus=self.threads, gpus=gpus, memory=self.memory.get(memory_key or target.name, 0),
                         env=tuple(sorted((env or {}).items())))

    def _result(self, run: HelperRun) -> dict:
        """The runner's EvalOutput, as the JSON the manifest keeps."""
        spec_file, result_file = Path(run.args[-2]), Path(run.args[-1])
        try:
            raw = EvalOutput.from_json(json.loads(result_file.read_text())).to_json()
        except ValueError as e:
            raise ToolError(f"{run.label}: its runner ({run.args[1]}) wrote no evaluation: {e}",
                            "the runner must write an EvalOutput (quantkit/evaluate/protocol.py)") from e
        result_file.unlink()
        spec_file.unlink()
        self.ran.append(run.label.removeprefix("evaluate "))
        return raw

    def _record(self, step: str, key: str, raw: dict, ref: EvalResult | None, label: str) -> EvalResult:
        smoke = raw["smoke"]
        is_ref = ref is None
        stats = {k: raw.get(k) for k in STAT_KEYS}
        if is_ref:
            stats |= {"kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0}
        probes = compare_replies(raw.get("probes") or {}, self.profile.chat_checks, None if is_ref else ref.probes)
        result = EvalResult(
            perplexity=raw["perplexity"],
            # Against the reference on the same tokens (PPL(Q)/PPL(base), as llama-perplexity): with a precision
            # target, an artifact may stop before the reference does.
            ppl_delta_pct=0.0 if is_ref else 100.0 * math.expm1(raw["ln_ppl_ratio"]),
            tokens_scored=raw["tokens_scored"],
            smoke_passed=smoke["passed"], smoke_reply=smoke["reply"], smoke_reason=smoke["reason"],
            peak_rss_bytes=int(raw.get("peak_rss_bytes", 0)), peak_gpu_bytes=int(raw.get("peak_gpu_bytes", 0)),
            peak_anon_bytes=int(raw.get("peak_anon_bytes", 0)), peak_file_bytes=int(raw.get("peak_file_bytes", 0)),
            predicted_peak_bytes=self.memory.get(label, 0), seconds=float(raw.get("seconds", 0.0)),
            note=raw.get("note", ""), windows=int(raw.get("windows", 0)), probes=probes, **stats,
        )
        if result.note:
            self.reporter.warn(f"{label}: {result.note}")
        self.m.record(step, key, result=asdict(result), smoke_prompt=smoke.get("prompt", ""), raw=raw)
        return result
