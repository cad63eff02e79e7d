"""Scoring math shared by every evaluation runner, on numpy arrays of logits. The loop that runs it over the
text (and the runner protocol around it) is in protocol.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..fsutil import atomic_path
from .stats import MIN_BASE_LOGPROB, statistics


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities, computed in place on one copy (this runs on every scored position)."""
    x = np.array(logits, dtype=np.float32)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def windows(n_tokens: int, window: int) -> list[tuple[int, int]]:
    """llama.cpp's perplexity layout: consecutive, non-overlapping windows of `window` tokens."""
    return [(i * window, (i + 1) * window) for i in range(n_tokens // window)]


def scored_range(window: int) -> tuple[int, int]:
    """Positions whose next-token prediction counts: the second half of each window, as llama-perplexity
    does, so every scored token has at least window/2 tokens of context."""
    return window // 2, window - 1


class Windows:
    """The evaluation text as every runner and every parity check reads it: windows(len, window), each one's first
    token replaced by BOS where the source tokenizer puts BOS in front of a text (as llama-perplexity does)."""

    def __init__(self, tokens: np.ndarray, window: int, bos: int | None) -> None:
        self.tokens, self.window, self.bos = tokens, window, bos
        self.spans = windows(len(tokens), window)

    @classmethod
    def of(cls, spec) -> "Windows":
        """From an evaluation spec (protocol.EvalSpec, or a mapping with its keys tokens, ctx and bos)."""
        return cls(np.load(spec["tokens"]), spec["ctx"], spec.get("bos"))

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> np.ndarray:
        a, b = self.spans[i]
        ids = self.tokens[a:b].copy()
        if self.bos is not None:
            ids[0] = self.bos
        return ids


def kl_per_position(ref: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(reference || other) at each row of two float32 log-probability arrays, as llama-perplexity computes it:
    over the reference's tokens above its cutoff. Every KL-divergence quantkit reports is this one (the scores,
    and each runtime's parity: parity.py)."""
    # In place, as this runs on every scored position.
    terms = np.subtract(ref, logprobs)
    terms *= np.exp(ref)
    terms[ref <= MIN_BASE_LOGPROB] = 0.0
    # KL >= 0; the float16 storage of the reference can round a near-zero value below it.
    return np.maximum(terms.sum(axis=-1, dtype=np.float64), 0.0)


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
        self.parts["kld"].append(kl_per_position(ref, logprobs))
        self.parts["nll_base"].append(nll_base)
        self.parts["p_diff"].append(np.exp(-nll) - np.exp(-nll_base))
        self.parts["same_top"].append(ref.argmax(axis=-1) == logprobs.argmax(axis=-1))

    def windows(self, per_window: int) -> int:
        return sum(len(x) for x in self.parts["nll"]) // per_window

    def save(self, path: Path) -> None:
        """Atomically: an evaluation run again (a Ray retry) while a lost attempt still writes never reads half a
        state."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # an open file: np.savez would add ".npz" to a name
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


def worker_main(argv: list[str], commands: dict[str, Callable]) -> int:
    """protocol.runner_main, by the name and from the module runners written before protocol.py import it."""
    from .protocol import runner_main

    return runner_main(argv, commands)
