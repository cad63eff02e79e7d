"""Scoring math shared by every evaluation runner, on numpy arrays of logits."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..memwatch import MemoryWatch
from .stats import MIN_BASE_LOGPROB, Precision, statistics


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


class Accumulator:
    """Per-position values of every scored window: llama-perplexity's statistics (stats.py) are computed from
    them, and an evaluation with a precision target stops as soon as they are precise enough."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "nll_base", "kld", "p_diff", "same_top")}

    def add(self, logprobs: np.ndarray, targets: np.ndarray, ref_logprobs: np.ndarray | None = None) -> None:
        rows = np.arange(len(targets))
        nll = -logprobs[rows, targets].astype(np.float64)
        self.parts["nll"].append(nll)
        if ref_logprobs is None:
            return
        ref = ref_logprobs.astype(np.float32)
        nll_base = -ref[rows, targets].astype(np.float64)
        # KL(reference || artifact) per position, over the reference's tokens above llama-perplexity's cutoff;
        # in place, as this runs on every scored position.
        terms = np.subtract(ref, logprobs)
        terms *= np.exp(ref)
        terms[ref <= MIN_BASE_LOGPROB] = 0.0
        # KL >= 0; the float16 storage of the reference can round a near-zero value below it.
        self.parts["kld"].append(np.maximum(terms.sum(axis=-1, dtype=np.float64), 0.0))
        self.parts["nll_base"].append(nll_base)
        self.parts["p_diff"].append(np.exp(-nll) - np.exp(-nll_base))
        self.parts["same_top"].append(ref.argmax(axis=-1) == logprobs.argmax(axis=-1))

    def windows(self, per_window: int) -> int:
        return sum(len(x) for x in self.parts["nll"]) // per_window

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # an open file: np.savez would add ".npz" to a name without it
            np.savez(f, **{k: v for k in self.parts if (v := self.values(k)) is not None})

    @classmethod
    def load(cls, path: Path) -> "Accumulator":
        acc = cls()
        with np.load(path) as saved:
            for k in saved.files:
                acc.parts[k] = [saved[k]]
        return acc

    def values(self, key: str) -> np.ndarray | None:
        return np.concatenate(self.parts[key]) if self.parts[key] else None

    def summary(self) -> dict:
        return statistics(*(self.values(k) for k in ("nll", "nll_base", "kld", "p_diff", "same_top")))


class ReferenceRows:
    """The reference's log-probabilities (float16 .npy, one row per scored position of every window of the
    text), written or read one window at a time with plain file I/O: a memory map would count the whole file
    in the evaluating process's resident memory (about 1 GB for the sample's 20,480 tokens, 3 GB with a 152k
    vocabulary). The header names every window from the start; the rows are written as far as they were
    needed ("a": reopened to write more windows)."""

    def __init__(self, path: str, mode: str, shape: tuple[int, int] | None = None) -> None:
        if mode == "w":
            self.f = open(path, "wb")
            np.lib.format.write_array_header_1_0(self.f, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                         "shape": shape})
        else:
            self.f = open(path, "r+b" if mode == "a" else "rb")
            version = np.lib.format.read_magic(self.f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(self.f)
        self.offset, self.n_vocab = self.f.tell(), shape[1]

    def write(self, first_row: int, rows: np.ndarray) -> None:
        self.f.seek(self.offset + first_row * self.n_vocab * 2)
        self.f.write(rows.astype(np.float16).tobytes())

    def read(self, first_row: int, n_rows: int) -> np.ndarray:
        self.f.seek(self.offset + first_row * self.n_vocab * 2)
        return np.fromfile(self.f, dtype=np.float16, count=n_rows * self.n_vocab).reshape(n_rows, self.n_vocab)

    def close(self) -> None:
        self.f.close()


def score(forward: Callable[[np.ndarray], np.ndarray], spec: dict, n_vocab: int,
          prepare: Callable[[list[np.ndarray]], None] | None = None) -> dict:
    """Run windows of spec["tokens"] through `forward` (window ids -> logits of the scored positions) and
    accumulate; write the log-probabilities to spec["ref_write"], or compare with spec["ref_read"].

    spec["windows"] caps the windows scored (default: all); spec["state"] keeps the per-position values
    between runs, so a later run with a higher cap goes on from where this one stopped; spec["precision"]
    ({relative, confidence}) stops as soon as the mean KLD is that precise. `prepare(windows)`, if given, is called
    first with every window this run may score, in order (a runner that computes them all at once: streamed.py)."""
    ctx = spec["ctx"]
    tokens = np.load(spec["tokens"])
    spans = windows(len(tokens), ctx)
    first, last = scored_range(ctx)
    per_window = last - first
    stop = min(spec.get("windows") or len(spans), len(spans))
    precision = Precision(**spec["precision"]) if spec.get("precision") else None
    state = Path(spec["state"]) if spec.get("state") else None
    acc = Accumulator.load(state) if state and state.exists() else Accumulator()
    start = acc.windows(per_window)
    ref = None
    if spec.get("ref_write"):
        ref = ReferenceRows(spec["ref_write"], "a" if start else "w", (len(spans) * per_window, n_vocab))
    elif spec.get("ref_read"):
        ref = ReferenceRows(spec["ref_read"], "r")
    done = precision is not None and precision.reached(acc.values("kld"))

    def window(i: int) -> np.ndarray:
        a, b = spans[i]
        ids = tokens[a:b].copy()
        if spec.get("bos") is not None:
            ids[0] = spec["bos"]
        return ids

    if prepare is not None and not done:
        prepare([window(i) for i in range(start, stop)])
    for i in range(start, stop):
        if done:
            break
        ids = window(i)
        lp = log_softmax(forward(ids))
        if spec.get("ref_write"):
            ref.write(i * per_window, lp)
            acc.add(lp, ids[first + 1:])
        else:
            acc.add(lp, ids[first + 1:], None if ref is None else ref.read(i * per_window, per_window))
        done = precision is not None and precision.reached(acc.values("kld"))
        print(f"progress {i + 1}/{stop}", file=sys.stderr, flush=True)
    if ref is not None:
        ref.close()
    if state:
        acc.save(state)
    return acc.summary() | {"windows": acc.windows(per_window), "precise": done}


def worker_main(argv: list[str], commands: dict[str, Callable]) -> int:
    """The command line of an evaluation worker: `evaluate TARGET SPEC.json OUT.json`, plus its own commands."""
    if argv and argv[0] == "evaluate":
        start = time.monotonic()
        with MemoryWatch() as watch:
            result = commands["evaluate"](argv[1], json.loads(Path(argv[2]).read_text()))
        # Measured here rather than by the parent, so they travel with the result from a Ray task too.
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result |= watch.facts()
        result["seconds"] = round(time.monotonic() - start, 2)
        Path(argv[3]).write_text(json.dumps(result, indent=1))
        return 0
    if argv and argv[0] in commands:
        commands[argv[0]](*argv[1:])
        return 0
    print(f"usage: evaluate TARGET SPEC.json OUT.json | {' | '.join(c for c in commands if c != 'evaluate')}",
          file=sys.stderr)
    return 2
