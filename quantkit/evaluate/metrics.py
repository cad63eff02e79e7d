"""Scoring math shared by every evaluation runner, on numpy arrays of logits."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities, computed in place on one copy (this runs on every scored position)."""
    x = np.array(logits, dtype=np.float32)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def windows(n_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """llama.cpp's perplexity layout: consecutive, non-overlapping windows of `ctx` tokens."""
    return [(i * ctx, (i + 1) * ctx) for i in range(n_tokens // ctx)]


def scored_range(ctx: int) -> tuple[int, int]:
    """Positions whose next-token prediction counts: the second half of each window, as llama-perplexity
    does, so every scored token has at least ctx/2 tokens of context."""
    return ctx // 2, ctx - 1


@dataclass
class Accumulator:
    nll: float = 0.0
    count: int = 0
    kld: list[np.ndarray] = field(default_factory=list)
    top1_hits: int = 0

    def add(self, logprobs: np.ndarray, targets: np.ndarray, ref_logprobs: np.ndarray | None = None) -> None:
        self.nll -= float(logprobs[np.arange(len(targets)), targets].astype(np.float64).sum())
        self.count += len(targets)
        if ref_logprobs is not None:
            ref = ref_logprobs.astype(np.float32)
            # KL(reference || artifact) per position, as llama-perplexity --kl-divergence reports it.
            # KL >= 0; the float16 storage of the reference can round a near-zero value below it.
            self.kld.append(np.maximum((np.exp(ref) * (ref - logprobs)).sum(axis=-1), 0.0))
            self.top1_hits += int((ref.argmax(axis=-1) == logprobs.argmax(axis=-1)).sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / max(self.count, 1)))

    def summary(self) -> dict:
        out = {"perplexity": self.perplexity, "tokens_scored": self.count}
        if self.kld:
            k = np.concatenate(self.kld)
            out |= {"kld_mean": float(k.mean()), "kld_p99": float(np.percentile(k, 99)),
                    "top1_agreement": self.top1_hits / max(self.count, 1)}
        return out


def score(forward: Callable[[np.ndarray], np.ndarray], spec: dict, n_vocab: int) -> dict:
    """Run every window of spec["tokens"] through `forward` (window ids -> logits of the scored positions)
    and accumulate; write the log-probabilities to spec["ref_write"], or compare with spec["ref_read"]."""
    ctx = spec["ctx"]
    tokens = np.load(spec["tokens"])
    spans = windows(len(tokens), ctx)
    first, last = scored_range(ctx)
    per_window = last - first
    ref = None
    if spec.get("ref_write"):
        ref = np.lib.format.open_memmap(spec["ref_write"], mode="w+", dtype=np.float16,
                                        shape=(len(spans) * per_window, n_vocab))
    elif spec.get("ref_read"):
        ref = np.load(spec["ref_read"], mmap_mode="r")
    acc = Accumulator()
    for i, (a, b) in enumerate(spans):
        window = tokens[a:b].copy()
        if spec.get("bos") is not None:
            window[0] = spec["bos"]
        lp = log_softmax(forward(window))
        rows = slice(i * per_window, (i + 1) * per_window)
        if spec.get("ref_write"):
            ref[rows] = lp.astype(np.float16)
            acc.add(lp, window[first + 1:b - a])
        else:
            acc.add(lp, window[first + 1:b - a], None if ref is None else np.asarray(ref[rows]))
        print(f"progress {i + 1}/{len(spans)}", file=sys.stderr, flush=True)
    if spec.get("ref_write"):
        ref.flush()
    return acc.summary()


def worker_main(argv: list[str], commands: dict[str, Callable]) -> int:
    """The command line of an evaluation worker: `evaluate TARGET SPEC.json OUT.json`, plus its own commands."""
    if argv and argv[0] == "evaluate":
        result = commands["evaluate"](argv[1], json.loads(Path(argv[2]).read_text()))
        Path(argv[3]).write_text(json.dumps(result, indent=1))
        return 0
    if argv and argv[0] in commands:
        commands[argv[0]](*argv[1:])
        return 0
    print(f"usage: evaluate TARGET SPEC.json OUT.json | {' | '.join(c for c in commands if c != 'evaluate')}",
          file=sys.stderr)
    return 2
