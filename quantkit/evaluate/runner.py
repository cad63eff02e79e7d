"""Run evaluations in child processes and keep their results in the manifest.

Every artifact of a model, whatever its format, is scored on the same token ids (the source's
tokenizer) against the same reference: the fp16 source checkpoint, run once through transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import ProfileError
from ..executors import Executor, HelperRun, LocalExecutor
from ..fsutil import atomic_path, sha256_text
from ..manifest import Manifest
from ..memory import REFERENCE
from ..plan import EvalResult
from ..procs import run_python
from ..profiles import Profile
from ..progress import Reporter
from .text import load_text

WORKERS = {"gguf": "quantkit.evaluate.gguf_worker", "hf": "quantkit.evaluate.hf_worker",
           "exl2": "quantkit.evaluate.exl2_worker"}


class Evaluator:
    def __init__(self, manifest: Manifest, profile: Profile, source: Path, source_key: str, reporter: Reporter,
                 threads: int, executor: Executor | None = None, memory: dict[str, int] | None = None) -> None:
        """`memory`: each step's predicted peak (artifact file name, or "reference"), for Ray's placement and the report."""
        self.m, self.profile, self.source, self.source_key = manifest, profile, source, source_key
        self.memory = memory or {}
        self.reporter, self.threads = reporter, threads
        self.executor = executor or LocalExecutor()
        self.state = manifest.state_dir
        self.ctx = profile.evaluation.ctx
        self.ran: list[str] = []  # what was evaluated in this run (not taken from the manifest)
        self._tokens: tuple[Path, int | None] | None = None

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
                run_python(["-m", WORKERS["hf"], "tokenize", str(self.source), str(text_file), str(tmp), str(bos_file)],
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
        if n < 2 * self.ctx:
            raise ProfileError(f"the evaluation text has {n} tokens, fewer than two windows of ctx {self.ctx}",
                               "use a longer text, a smaller evaluation.ctx, or a larger evaluation.max_tokens")
        return out, rec.get("bos")

    def _keys(self) -> tuple[Path, str, str, dict]:
        tokens, bos = self.tokens()
        smoke = asdict(self.profile.smoke)
        ref_key = sha256_text(REFERENCE, self.source_key, self.m.sha256(tokens), str(self.ctx))
        spec = {"tokens": str(tokens), "bos": bos, "ctx": self.ctx, "threads": self.threads, "smoke": smoke}
        return tokens, ref_key, sha256_text(ref_key, json.dumps(smoke, sort_keys=True)), spec

    def reference(self) -> EvalResult:
        """The fp16 source's own scores; its log-probabilities are kept for every artifact's KL-divergence."""
        _, ref_key, key, spec = self._keys()
        ref_path = self.state / "reference-logprobs.npy"
        rec = self.m.done(f"eval:{REFERENCE}", key)
        if rec and self.m.done(REFERENCE, ref_key, ref_path):
            return EvalResult(**rec["result"])
        with atomic_path(ref_path) as tmp:
            [run] = self.executor.run_helpers([self._helper("hf", self.source, {**spec, "reference": True, "ref_write": str(tmp)},
                                                            "the fp16 source (reference)", memory_key=REFERENCE)], self.reporter)
            raw = self._result(run)
        self.m.record(REFERENCE, ref_key, ref_path)
        return self._record(f"eval:{REFERENCE}", key, raw, None, REFERENCE)

    def evaluate(self, artifacts: list[tuple[Path, str, int]]) -> list[EvalResult]:
        """Score each (artifact, runner, GPUs it needs) against the reference; the runs the manifest does not
        already hold go to the executor together (on Ray, at once)."""
        _, _, base_key, spec = self._keys()
        results: dict[Path, EvalResult] = {}
        todo: dict[HelperRun, tuple[Path, str]] = {}
        spec = {**spec, "ref_read": str(self.state / "reference-logprobs.npy")}
        for artifact, runner, gpus in artifacts:
            key = sha256_text("eval", runner, self.m.sha256(artifact), base_key)
            if rec := self.m.done(f"eval:{artifact.name}", key):
                results[artifact] = EvalResult(**rec["result"])
                continue
            todo[self._helper(runner, artifact, spec, artifact.name, gpus)] = (artifact, key)
        if todo:
            ref = self.reference()
            for run in self.executor.run_helpers(list(todo), self.reporter):
                artifact, key = todo[run]
                results[artifact] = self._record(f"eval:{artifact.name}", key, self._result(run), ref.perplexity, artifact.name)
        return [results[a] for a, _, _ in artifacts]

    def _helper(self, runner: str, target: Path, spec: dict, label: str, gpus: int = 0,
                memory_key: str | None = None) -> HelperRun:
        name = re.sub(r"[^\w.-]", "_", target.name)
        spec_file, result_file = self.state / f"eval-{name}.spec.json", self.state / f"eval-{name}.result.json"
        spec_file.write_text(json.dumps(spec))
        return HelperRun(f"evaluate {label}", ("-m", WORKERS[runner], "evaluate", str(target), str(spec_file), str(result_file)),
                         self.state, cpus=self.threads, gpus=gpus, memory=self.memory.get(memory_key or target.name, 0))

    def _result(self, run: HelperRun) -> dict:
        spec_file, result_file = Path(run.args[-2]), Path(run.args[-1])
        raw = json.loads(result_file.read_text())
        result_file.unlink()
        spec_file.unlink()
        self.ran.append(run.label.removeprefix("evaluate "))
        return raw

    def _record(self, step: str, key: str, raw: dict, ref_ppl: float | None, label: str) -> EvalResult:
        smoke = raw["smoke"]
        is_ref = ref_ppl is None
        result = EvalResult(
            perplexity=raw["perplexity"],
            ppl_delta_pct=0.0 if is_ref else 100.0 * (raw["perplexity"] / ref_ppl - 1.0),
            kld_mean=0.0 if is_ref else raw.get("kld_mean"),
            kld_p99=0.0 if is_ref else raw.get("kld_p99"),
            top1_agreement=1.0 if is_ref else raw.get("top1_agreement"),
            tokens_scored=raw["tokens_scored"],
            smoke_passed=smoke["passed"], smoke_reply=smoke["reply"], smoke_reason=smoke["reason"],
            peak_rss_bytes=int(raw.get("peak_rss_bytes", 0)), peak_gpu_bytes=int(raw.get("peak_gpu_bytes", 0)),
            predicted_peak_bytes=self.memory.get(label, 0), seconds=float(raw.get("seconds", 0.0)),
            note=raw.get("note", ""),
        )
        if result.note:
            self.reporter.warn(f"{label}: {result.note}")
        self.m.record(step, key, result=asdict(result), smoke_prompt=smoke.get("prompt", ""))
        return result
