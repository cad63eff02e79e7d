"""Run evaluations in child processes and keep their results in the manifest."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import ProfileError
from ..fsutil import atomic_path, sha256_text
from ..manifest import Manifest
from ..plan import EvalResult
from ..procs import run_python
from ..profiles import Profile
from ..progress import Reporter
from .metrics import scored_range, windows
from .text import load_text

WORKER = "quantkit.evaluate.gguf_worker"
_PROGRESS = re.compile(r"progress (\d+)/(\d+)")


class Evaluator:
    """Evaluates GGUF artifacts of one build against its reference (the f16/bf16 GGUF)."""

    def __init__(self, manifest: Manifest, profile: Profile, reference: Path, reporter: Reporter, threads: int) -> None:
        self.m, self.profile, self.reference, self.reporter, self.threads = manifest, profile, reference, reporter, threads
        self.state = manifest.state_dir
        self.ctx = profile.evaluation.ctx
        self.ran: list[str] = []  # artifacts evaluated in this run (not taken from the manifest)

    def tokens(self) -> Path:
        """The evaluation text as the reference's token ids: the same ids for every artifact."""
        text = load_text(self.profile.evaluation.text)
        out = self.state / "eval-tokens.npy"
        key = sha256_text("tokens", self.m.sha256(self.reference), sha256_text(text), str(self.profile.evaluation.max_tokens))
        if not self.m.done("tokens", key, out):
            self.state.mkdir(parents=True, exist_ok=True)
            text_file = self.state / "eval-text.txt"
            text_file.write_text(text, encoding="utf-8")
            with atomic_path(out) as tmp:
                run_python(["-m", WORKER, "tokenize", str(self.reference), str(text_file), str(tmp)], what="tokenizer")
                if self.profile.evaluation.max_tokens:
                    ids = np.load(tmp)[: self.profile.evaluation.max_tokens]
                    with open(tmp, "wb") as f:
                        np.save(f, ids)
            text_file.unlink()
            n = len(np.load(out))
            self.m.record("tokens", key, out, count=n)
        return out

    def check_length(self, tokens: Path) -> int:
        n = len(np.load(tokens))
        if n < 2 * self.ctx:
            raise ProfileError(f"the evaluation text has {n} tokens, fewer than two windows of ctx {self.ctx}",
                               "use a longer text, a smaller evaluation.ctx, or a larger evaluation.max_tokens")
        return n

    def scratch_bytes(self, n_tokens: int, n_vocab: int) -> int:
        first, last = scored_range(self.ctx)
        return len(windows(n_tokens, self.ctx)) * (last - first) * n_vocab * 2

    def evaluate(self, artifact: Path, label: str) -> EvalResult:
        tokens = self.tokens()
        self.check_length(tokens)
        smoke = asdict(self.profile.smoke)
        is_ref = artifact == self.reference
        ref_path = self.state / "reference-logprobs.npy"
        tokens_sha = self.m.sha256(tokens)
        ref_key = sha256_text("reference", self.m.sha256(self.reference), tokens_sha, str(self.ctx))
        key = sha256_text("eval", self.m.sha256(artifact), tokens_sha, ref_key, json.dumps(smoke, sort_keys=True))
        step = f"eval:{artifact.name}"
        rec = self.m.done(step, key)
        if is_ref and rec and not self.m.done("reference", ref_key, ref_path):
            rec = None  # the reference's log-probabilities are gone: recompute them with its evaluation
        if rec:
            return EvalResult(**rec["result"])
        if not is_ref:
            self.evaluate(self.reference, self.reference.name)  # make sure reference log-probs exist
        spec = {"tokens": str(tokens), "ctx": self.ctx, "threads": self.threads, "smoke": smoke}
        spec_file = self.state / f"eval-{artifact.name}.spec.json"
        result_file = self.state / f"eval-{artifact.name}.result.json"
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(self.reporter.step(f"evaluate {label}"))
            if is_ref:
                spec["ref_write"] = str(stack.enter_context(atomic_path(ref_path)))
            else:
                spec["ref_read"] = str(ref_path)
            spec_file.write_text(json.dumps(spec))

            def on_line(line: str) -> None:
                if m := _PROGRESS.search(line):
                    bar.update(int(m.group(1)), int(m.group(2)))

            run_python(["-m", WORKER, "evaluate", str(artifact), str(spec_file), str(result_file)],
                       on_line=on_line, what=f"evaluation of {artifact.name}")
            raw = json.loads(result_file.read_text())
        result_file.unlink()
        spec_file.unlink()
        if is_ref:
            self.m.record("reference", ref_key, ref_path)
        self.ran.append(artifact.name)
        result = self._result(raw, is_ref)
        self.m.record(step, key, result=asdict(result), smoke_prompt=raw["smoke"].get("prompt", ""))
        return result

    def _result(self, raw: dict, is_ref: bool) -> EvalResult:
        ref_rec = self.m.steps.get(f"eval:{self.reference.name}")
        ref_ppl = raw["perplexity"] if is_ref else (ref_rec or {}).get("result", {}).get("perplexity")
        smoke = raw["smoke"]
        return EvalResult(
            perplexity=raw["perplexity"],
            ppl_delta_pct=None if ref_ppl is None else 100.0 * (raw["perplexity"] / ref_ppl - 1.0),
            kld_mean=0.0 if is_ref else raw.get("kld_mean"),
            kld_p99=0.0 if is_ref else raw.get("kld_p99"),
            top1_agreement=1.0 if is_ref else raw.get("top1_agreement"),
            tokens_scored=raw["tokens_scored"],
            smoke_passed=smoke["passed"], smoke_reply=smoke["reply"], smoke_reason=smoke["reason"],
        )
