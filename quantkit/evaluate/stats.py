"""The statistics `llama-perplexity --kl-divergence` prints, with its definitions and error bars, computed
from per-position values (tools/perplexity/perplexity.cpp in the llama.cpp tree setup.sh builds).

Every error bar is one standard error of the mean over scored positions, as llama.cpp prints it; positions
within a window are correlated, so it understates the spread a little, for llama.cpp's numbers and ours alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import ProfileError

# llama-perplexity leaves out of the KL-divergence the reference's tokens below this log-probability.
MIN_BASE_LOGPROB = -16.0
# A precision target is not trusted before this many positions (4 windows of 512): positions within a window
# are correlated, so one window's error bar is too optimistic.
MIN_PRECISION_COUNT = 1000
# Below this (nats), a KLD is at the resolution of the float16 reference rows: llama.cpp's F16 file of the
# sample measures 4e-5. An error bar this small is precise enough whatever the relative error.
KLD_RESOLUTION = 1e-4


def mean_and_se(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    f = float(x.mean(dtype=np.float64))
    var = float(np.square(x, dtype=np.float64).mean()) - f * f
    return f, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    cov = float((a.astype(np.float64) * b).mean()) - float(a.mean(dtype=np.float64)) * float(b.mean(dtype=np.float64))
    return cov / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear between the two nearest ranks."""
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    return float((1 - (p - i)) * sorted_values[i] + (p - i) * sorted_values[min(i + 1, len(sorted_values) - 1)])


def median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(sorted_values[n // 2] if n % 2 else 0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))


def statistics(nll: np.ndarray, nll_base: np.ndarray | None = None, kld: np.ndarray | None = None,
               p_diff: np.ndarray | None = None, same_top: np.ndarray | None = None) -> dict:
    """PPL ± SE alone (the reference), or everything llama-perplexity prints against a base."""
    log_ppl, log_ppl_se = mean_and_se(nll)
    out = {"perplexity": math.exp(log_ppl), "perplexity_se": math.exp(log_ppl) * log_ppl_se, "tokens_scored": len(nll)}
    if nll_base is None:
        return out
    log_base, log_base_se = mean_and_se(nll_base)
    cov = covariance_of_means(nll, nll_base)
    k = np.sort(kld)
    kld_mean, kld_se = mean_and_se(kld)
    mse, mse_se = mean_and_se(np.square(p_diff, dtype=np.float64))
    rms = math.sqrt(mse)
    top = float(same_top.mean())
    return out | {
        "ln_ppl_ratio": log_ppl - log_base,
        "ln_ppl_ratio_se": math.sqrt(max(log_ppl_se ** 2 + log_base_se ** 2 - 2 * cov, 0.0)),
        "kld_mean": kld_mean, "kld_se": kld_se, "kld_median": median(k), "kld_p90": percentile(k, 0.90),
        "kld_p95": percentile(k, 0.95), "kld_p99": percentile(k, 0.99), "kld_p999": percentile(k, 0.999),
        "kld_max": float(k[-1]),
        "top1_agreement": top, "top1_se": math.sqrt(top * (1 - top) / (len(nll) - 1)) if len(nll) > 1 else 0.0,
        "rms_dp": rms, "rms_dp_se": 0.5 / rms * mse_se if rms > 0 else 0.0,
    }


@dataclass(frozen=True)
class Precision:
    """`evaluation.precision`: score until the mean KLD is known within ±relative at this confidence."""

    relative: float  # 0.03 for ±3%
    confidence: float  # 0.95

    @property
    def z(self) -> float:
        """Two-sided normal quantile of the confidence (1.96 at 95%)."""
        from statistics import NormalDist

        return NormalDist().inv_cdf(0.5 + self.confidence / 2)

    def reached(self, kld: np.ndarray) -> bool:
        if kld is None or len(kld) < MIN_PRECISION_COUNT:
            return False
        mean, se = mean_and_se(kld)
        return self.z * se <= max(self.relative * mean, KLD_RESOLUTION)

    def windows_needed(self, mean: float, se: float, windows: int) -> int:
        """Windows for the target at this spread: the standard error falls as one over the root of the count
        (10% more, so that most artifacts finish in the next round)."""
        if se <= 0:
            return windows + 1
        return math.ceil(1.1 * windows * (self.z * se / max(self.relative * mean, KLD_RESOLUTION)) ** 2)

    def describe(self) -> str:
        return f"KLD ±{100 * self.relative:g}% at {100 * self.confidence:g}%"


_PRECISION = re.compile(r"^\s*KLD\s*(?:±|\+/?-)\s*([0-9.]+)\s*%\s*at\s*([0-9.]+)\s*%\s*$", re.IGNORECASE)


def parse_precision(text: str) -> Precision | None:
    """'KLD ±3% at 95%' (or '+-3%'); '' means no target (score every window up to max_tokens)."""
    if not text:
        return None
    m = _PRECISION.match(text)
    try:
        p = Precision(float(m.group(1)) / 100, float(m.group(2)) / 100) if m else None
    except ValueError:
        p = None
    if p is None or not (0 < p.relative < 1 and 0.5 <= p.confidence < 1):
        raise ProfileError(f"evaluation.precision {text!r} is not a precision target",
                           "write it as 'KLD ±3% at 95%': a relative error above 0% and a confidence from 50% to 99.9%")
    return p
