"""The causality probe: a runtime that lets a position see later tokens scores text it should be predicting.

A decoder's prediction at position p depends on tokens 0..p only. The probe scores one window, then the same
window with every token from position `cut` on changed, and compares the predictions before `cut`: a causal
runtime gives them unchanged (the same shapes, the same kernels: in practice bit for bit), one that attends to
future tokens moves them by whole nats. exllamav2 0.3.2 on torch's SDPA without flash-attn is such a runtime (its
decoder mask is None outside packed batches), and nothing else quantkit measured would have shown it: its KLD
against the reference only looked bad.

Each runtime's parity run runs it first (protocol.score, through the runtime's own forward, when the spec asks:
the reference through transformers, an unquantized intermediate such as llama.cpp's F16), and so do the runtimes'
own parity checks (exllamav2's preflight, mlx-lm's check against transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ToolError
from .metrics import log_softmax

# The largest move (nats, in any log-probability of a scored position before the cut) a causal runtime may show.
# Same shapes and kernels give 0 in practice: the sample through transformers (float32, CPU) moved by 0.0, and by
# 22.5 nats with its attention made bidirectional (tests/test_causality.py).
MAX_DELTA = 1e-2


@dataclass(frozen=True)
class Causality:
    """What the probe measured on one runtime."""

    runtime: str
    max_delta: float  # the largest |Δ log p| before the cut
    cut: int  # the first changed position of the window
    positions: int  # scored positions compared (those before the cut)

    @property
    def passed(self) -> bool:
        return self.max_delta <= MAX_DELTA

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "max_delta": self.max_delta, "cut": self.cut, "positions": self.positions,
                "passed": self.passed, "bound": MAX_DELTA}

    def check(self) -> "Causality":
        """Itself, or the error that stops the build: every score this runtime gives would be wrong."""
        if not self.passed:
            raise ToolError(f"{self.runtime} attends to future tokens: changing a window's tokens from position "
                            f"{self.cut} on moved its predictions before that by up to {self.max_delta:.3g} nats "
                            f"(a causal runtime: at most {MAX_DELTA:g})",
                            "its scores and replies would be wrong: check the attention backend the runtime runs "
                            "with, or leave this format out of the profile")
        return self


def probe_windows(window: np.ndarray, first: int, last: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The window and its changed twin, and the cut: half-way through the scored positions first..last-1, so that
    as many scored positions lie before it as after."""
    cut = (first + last) // 2
    changed = np.array(window, copy=True)
    changed[cut:] = (changed[cut:] + 1) % vocab_size  # every token from the cut on is another one
    return np.asarray(window), changed, cut


def measure(runtime: str, scored: Callable[[np.ndarray], np.ndarray], window: np.ndarray, first: int, last: int,
            vocab_size: int) -> Causality:
    """The probe through `scored`: window -> logits of its positions first..last-1 (a Runtime's forward)."""
    original, changed, cut = probe_windows(window, first, last, vocab_size)
    return compare(runtime, scored(original), scored(changed), first, cut)


def compare(runtime: str, original: np.ndarray, changed: np.ndarray, first: int, cut: int) -> Causality:
    """Logits of positions first.. of the window and of its changed twin (probe_windows), compared before the cut
    (the prediction at position p is row p - first)."""
    rows = cut - first
    a, b = log_softmax(np.asarray(original)[:rows]), log_softmax(np.asarray(changed)[:rows])
    return Causality(runtime, float(np.abs(a - b).max()), cut, rows)
