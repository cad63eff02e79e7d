"""Parity: does a runtime reproduce the fp16 source before it is trusted with a quantized file?

A runtime that misreads a model (a config key it does not know, a tied head it does not tie) makes
every file it runs look bad, or worse, makes a bad file look like quantization noise. So the
unquantized model goes through the runtime first and is compared with the reference: exllamav2 on
the fp16 source before any EXL2 is made (a refusal when it disagrees), and llama.cpp on the F16/BF16
GGUF, which every build evaluates anyway (reported, and warned about). MLX's runner holds mlx-lm to the
same bounds against transformers on the same (dequantized) weights, and stops when it fails them.

Every check is this one type, with one formula (metrics.kl_per_position, the scores' own KL-divergence) and one
set of bounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

# An unquantized model run by a correct runtime agrees with the reference to float rounding: the
# sample's F16 GGUF scores KLD 4e-5 and top-1 100%. A misread config gives KLD in the tenths.
MAX_KLD = 0.01
MIN_TOP1 = 0.97


@dataclass(frozen=True)
class Parity:
    runtime: str  # "llama.cpp, F16 GGUF", "exllamav2, fp16 source"
    kld_mean: float
    top1_agreement: float
    tokens_scored: int

    @property
    def passed(self) -> bool:
        return self.kld_mean <= MAX_KLD and self.top1_agreement >= MIN_TOP1

    def problems(self) -> str:
        """What disagrees: 'KLD 0.2300 > 0.01; top-1 61.0% < 97%' ('' when it passes)."""
        out = []
        if self.kld_mean > MAX_KLD:
            out.append(f"KLD {self.kld_mean:.4f} > {MAX_KLD}")
        if self.top1_agreement < MIN_TOP1:
            out.append(f"top-1 {100 * self.top1_agreement:.1f}% < {100 * MIN_TOP1:.0f}%")
        return "; ".join(out)

    @classmethod
    def measure(cls, runtime: str, reference: Iterable, logprobs: Iterable) -> "Parity":
        """The runtime's log-probabilities against the reference's, position by position: `reference` and
        `logprobs` give arrays of rows in the same order (windows, or one array), taken a pair at a time."""
        import numpy as np

        from .metrics import kl_per_position

        kld, same = [], []
        for ref, lp in zip(reference, logprobs, strict=True):
            ref, lp = np.asarray(ref, dtype=np.float32), np.asarray(lp, dtype=np.float32)
            kld.append(kl_per_position(ref, lp))
            same.append(ref.argmax(axis=-1) == lp.argmax(axis=-1))
        kld, same = np.concatenate(kld), np.concatenate(same)
        return cls(runtime, float(kld.mean()), float(same.mean()), len(kld))

    @classmethod
    def of(cls, runtime: str, stats: Mapping) -> "Parity":
        """From statistics of the scores against the reference (an evaluation's, stats.statistics)."""
        return cls(runtime, stats["kld_mean"], stats["top1_agreement"], stats["tokens_scored"])

    @classmethod
    def from_dict(cls, d: dict) -> "Parity":
        """From to_dict()'s output (report.json, an artifact's details)."""
        return cls(d["runtime"], d["kld_mean"], d["top1_agreement"], d["tokens_scored"])

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed, "max_kld": MAX_KLD, "min_top1": MIN_TOP1}

    def render(self) -> str:
        verdict = "agrees" if self.passed else f"DISAGREES ({self.problems()})"
        return (f"{self.runtime}: KLD {self.kld_mean:.5f}, top-1 {100 * self.top1_agreement:.1f}% over "
                f"{self.tokens_scored} tokens: {verdict} (bounds: KLD <= {MAX_KLD}, top-1 >= {100 * MIN_TOP1:.0f}%)")
