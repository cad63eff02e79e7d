"""Scoring math shared by every evaluation runner, on numpy arrays of logits."""

from __future__ import annotations

import json
import resource
import sys
import time
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


class ReferenceRows:
    """The reference's log-probabilities (float16 .npy, one row per scored position), written or read one
    window at a time with plain file I/O: a memory map would count the whole file in the evaluating
    process's resident memory (about 1 GB for the sample's 20,480 tokens, 3 GB with a 152k vocabulary)."""

    def __init__(self, path: str, mode: str, shape: tuple[int, int] | None = None) -> None:
        self.f = open(path, "wb" if mode == "w" else "rb")
        if mode == "w":
            np.lib.format.write_array_header_1_0(self.f, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                         "shape": shape})
        else:
            version = np.lib.format.read_magic(self.f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(self.f)
        self.offset, self.n_vocab = self.f.tell(), shape[1]

    def write(self, rows: np.ndarray) -> None:
        self.f.write(rows.astype(np.float16).tobytes())

    def read(self, first_row: int, n_rows: int) -> np.ndarray:
        self.f.seek(self.offset + first_row * self.n_vocab * 2)
        return np.fromfile(self.f, dtype=np.float16, count=n_rows * self.n_vocab).reshape(n_rows, self.n_vocab)

    def close(self) -> None:
        self.f.close()


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
        ref = ReferenceRows(spec["ref_write"], "w", (len(spans) * per_window, n_vocab))
    elif spec.get("ref_read"):
        ref = ReferenceRows(spec["ref_read"], "r")
    acc = Accumulator()
    for i, (a, b) in enumerate(spans):
        window = tokens[a:b].copy()
        if spec.get("bos") is not None:
            window[0] = spec["bos"]
        lp = log_softmax(forward(window))
        if spec.get("ref_write"):
            ref.write(lp)
            acc.add(lp, window[first + 1:b - a])
        else:
            acc.add(lp, window[first + 1:b - a], None if ref is None else ref.read(i * per_window, per_window))
        print(f"progress {i + 1}/{len(spans)}", file=sys.stderr, flush=True)
    if ref is not None:
        ref.close()
    return acc.summary()


def worker_main(argv: list[str], commands: dict[str, Callable]) -> int:
    """The command line of an evaluation worker: `evaluate TARGET SPEC.json OUT.json`, plus its own commands."""
    if argv and argv[0] == "evaluate":
        start = time.monotonic()
        result = commands["evaluate"](argv[1], json.loads(Path(argv[2]).read_text()))
        # Measured here rather than by the parent, so they travel with the result from a Ray task too.
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["seconds"] = round(time.monotonic() - start, 2)
        Path(argv[3]).write_text(json.dumps(result, indent=1))
        return 0
    if argv and argv[0] in commands:
        commands[argv[0]](*argv[1:])
        return 0
    print(f"usage: evaluate TARGET SPEC.json OUT.json | {' | '.join(c for c in commands if c != 'evaluate')}",
          file=sys.stderr)
    return 2
