"""Typed build plans and results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import human_size
from .profiles import Profile
from .source import Source


# Artifacts that are not models: evaluated never, listed apart in reports and cards, published
# next to the models (the importance matrix with the GGUF files, exl2's measurement on main).
AUX_ROLES = frozenset({"imatrix", "measurement"})


@dataclass(frozen=True)
class ArtifactPlan:
    """One file (or folder) a backend will produce."""

    backend: str
    variant: str  # "Q4_K_M", "F16", "4bit-g128", ...
    filename: str  # relative to the build folder
    predicted_bytes: int
    role: str = "model"  # model | intermediate (a model the others are made from) | imatrix | measurement
    depends_on: str | None = None  # filename of the artifact this one is made from
    uses: tuple[str, ...] = ()  # other artifacts it needs (the importance matrix)
    options: dict[str, Any] = field(default_factory=dict)
    predicted_peak_bytes: int = 0  # the backend's estimate of the build step's peak memory (0: no estimate)
    note: str = ""  # what the plan should say of it: "3 shards", "180 tensors fall back"

    @property
    def is_model(self) -> bool:
        return self.role not in AUX_ROLES


@dataclass(frozen=True)
class BuildPlan:
    source: Source
    profile: Profile
    out_dir: Path
    artifacts: list[ArtifactPlan]
    eval_scratch_bytes: int  # reference log-probabilities kept for KL-divergence
    skipped: list[str] = field(default_factory=list)  # backends left out (if_unavailable: skip), and why

    @property
    def predicted_bytes(self) -> int:
        return sum(a.predicted_bytes for a in self.artifacts) + self.eval_scratch_bytes

    def render(self) -> str:
        lines = [
            f"source   {self.source.describe()}  ({self.source.architecture}, {self.source.dtype})",
            f"profile  {self.profile.name}  ({self.profile.source_file})",
            f"output   {self.out_dir}",
            "artifacts:",
        ]
        for a in self.artifacts:
            note = "intermediate" if a.role == "intermediate" else f"from {a.depends_on}" if a.depends_on else ""
            note += "".join(f" + {u}" for u in a.uses) + (f"; {a.note}" if a.note else "")
            mem = f"  peak memory ~{human_size(a.predicted_peak_bytes)}" if a.predicted_peak_bytes else ""
            lines.append(f"  {a.backend:5} {a.variant:14} {a.filename:48} {human_size(a.predicted_bytes):>9}{mem}  {note}")
        ev = self.profile.evaluation
        lines.append(
            f"evaluation: perplexity, KL-divergence and top-1 vs the fp16 source (transformers) on {ev.text} "
            f"(ctx {ev.ctx}{', max ' + str(ev.max_tokens) + ' tokens' if ev.max_tokens else ''}); "
            f"smoke test: {self.profile.smoke.question!r} -> must contain {self.profile.smoke.expect!r}"
        )
        lines += [f"skipped  {line}" for line in self.skipped]
        lines.append(f"disk needed: ~{human_size(self.predicted_bytes)} (artifacts + {human_size(self.eval_scratch_bytes)} evaluation scratch)")
        return "\n".join(lines)


@dataclass
class EvalResult:
    perplexity: float
    ppl_delta_pct: float | None  # vs the reference, in percent
    kld_mean: float | None
    kld_p99: float | None
    top1_agreement: float | None  # fraction of scored positions whose argmax equals the reference's
    tokens_scored: int
    smoke_passed: bool
    smoke_reply: str
    smoke_reason: str


@dataclass
class ArtifactResult:
    backend: str
    variant: str
    filename: str
    size_bytes: int
    sha256: str  # filled in by the build from the manifest's hash
    bits_per_weight: float
    tensor_types: dict[str, int]  # ggml type name -> tensor count (dtype -> count for folder formats)
    fallbacks: list[dict[str, str]]  # tensors the quantizer stored in another type than asked
    evaluation: EvalResult | None = None
    role: str = "model"  # as in ArtifactPlan: reports and cards list models, and name the imatrix apart
    uses: list[str] = field(default_factory=list)  # as in ArtifactPlan
    details: dict[str, Any] = field(default_factory=dict)  # what else the backend reports (imatrix: chunks, text)
    predicted_bytes: int = 0
    peak_rss_bytes: int = 0  # measured peak memory of the process that built it (0: not measured)

    def to_dict(self) -> dict:
        return asdict(self)
