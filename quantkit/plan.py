"""Typed build plans, and the evaluation's result (an artifact's stages are results.py's)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from .evaluate.reference_time import ReferenceTime
from .fsutil import human_size
from .memory import StepMemory, re_reads, too_large
from .profiles import Profile
from .source import Source


# Artifacts that are models: "model", and "intermediate" (a model the others are made from). Any other role a
# format gives (its calibration statistics, a measurement pass) is auxiliary: never evaluated, listed apart in
# reports and cards, published next to the models.
MODEL_ROLES = frozenset({"model", "intermediate"})

_T = TypeVar("_T")


def from_record(cls: type[_T], data: dict) -> _T | None:
    """A result dataclass from what a manifest or report holds, written by this quantkit or an older one: fields
    it no longer has are dropped, fields added since take their defaults; None when a field it needs is missing
    (the step is then redone rather than trusted)."""
    known = {f.name: f for f in fields(cls)}
    values = {k: v for k, v in data.items() if k in known}
    if any(f.default is MISSING and f.default_factory is MISSING and f.name not in values for f in known.values()):
        return None
    return cls(**values)


@dataclass(frozen=True)
class ArtifactPlan:
    """One file (or folder) a backend will produce."""

    backend: str
    variant: str  # "Q4_K_M", "F16", "4bit-g128", ...
    filename: str  # relative to the build folder
    predicted_bytes: int
    role: str = "model"  # model | intermediate (a model the others are made from) | an auxiliary role of the format's
    depends_on: str | None = None  # filename of the artifact this one is made from
    uses: tuple[str, ...] = ()  # other artifacts it needs (the importance matrix)
    options: dict[str, Any] = field(default_factory=dict)
    predicted_peak_bytes: int = 0  # the backend's estimate of the build step's peak memory (0: no estimate)
    predicted_mapped_bytes: int = 0  # of which memory-mapped input (memory.StepMemory: it need not fit)
    passes: int = 1  # how many times the step goes through that input (llama-imatrix: its chunks)
    runtime_bytes: int = 0  # what a runtime holds when it loads the artifact, if more than its size (copies it makes)
    note: str = ""  # what the plan should say of it: "3 shards", "180 tensors fall back"

    @property
    def is_model(self) -> bool:
        return self.role in MODEL_ROLES


@dataclass(frozen=True)
class BuildPlan:
    source: Source
    profile: Profile
    out_dir: Path
    artifacts: list[ArtifactPlan]
    eval_scratch_bytes: int  # reference log-probabilities kept for KL-divergence
    skipped: list[str] = field(default_factory=list)  # backends left out (if_unavailable: skip), and why
    evaluations: list[StepMemory] = field(default_factory=list)  # the reference first, then each artifact's
    memory_limit: int = 0  # what one step may use: this machine's memory, or the largest Ray node's (0: unknown)
    memory_where: str = "this machine"
    reference_streamed: bool = False  # the reference runs layer by layer (evaluate/streamed.py): it does not generate
    gpu_memory: int = 0  # planned for a machine with a CUDA GPU of this size (plan --gpu; 0: this machine's means)
    eval_temp_bytes: int = 0  # of eval_scratch_bytes: what runners write and remove after (MLX's checkpoints)
    reference_time: ReferenceTime | None = None  # the reference's scoring and chat turns, timed (None: no evaluation)

    def memory_steps(self) -> list[StepMemory]:
        """Every step that runs in a process of its own, with its predicted peak memory."""
        built = [StepMemory(f"{'convert to' if a.role == 'intermediate' else 'make'} {a.filename}", a.filename,
                            a.predicted_peak_bytes, a.predicted_mapped_bytes, a.passes)
                 for a in self.artifacts if a.predicted_peak_bytes]
        return built + self.evaluations

    def check_memory(self) -> None:
        """Refuse (exit 5) when a step cannot fit: before any work, never an OOM kill halfway through."""
        too_large(self.memory_steps(), self.memory_limit, self.memory_where)

    def gpu_steps(self) -> list[str]:
        """The artifacts whose build steps and evaluations need a GPU (Format.gpus)."""
        from . import formats

        return [a.filename for a in self.artifacts if formats.get(a.backend).gpus]

    def re_reads(self) -> list[str]:
        """The steps that fit only by reading their memory-mapped files again, and what that costs."""
        return re_reads(self.memory_steps(), self.memory_limit)

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
            mem = f"  peak memory ~{_split(a.predicted_peak_bytes, a.predicted_mapped_bytes)}" if a.predicted_peak_bytes else ""
            lines.append(f"  {a.backend:5} {a.variant:14} {a.filename:48} {human_size(a.predicted_bytes):>9}{mem}  {note}")
        ev = self.profile.evaluation
        if ev.enabled:
            lines.append(
                f"evaluation: perplexity, KL-divergence and top-1 vs the fp16 source (transformers) on {ev.text} "
                f"(windows of {ev.window}{', max ' + str(ev.max_tokens) + ' tokens' if ev.max_tokens else ''}); "
                f"smoke test: {self.profile.smoke.question!r} -> must contain {self.profile.smoke.expect!r}"
            )
            if ev.precision:
                lines.append(f"  each file scored until {ev.precision} (at most {ev.max_tokens or 'all'} tokens)")
            if self.profile.chat_checks.enabled:
                lines.append("  chat checks: template and stop tokens vs the source; tool-call and JSON-mode replies vs the fp16 source's")
            lines += [f"  {e.step:70} peak memory ~{_split(e.peak_bytes, e.mapped_bytes)}" for e in self.evaluations]
            if self.reference_time:
                lines += [f"  {line}" for line in self.reference_time.render()]
            lines += [f"  bound  {b.describe()}" for b in self.profile.bounds]
        else:
            lines.append("evaluation: off (evaluation.enabled: false): files are built and described, not measured")
        if steps := self.memory_steps():
            worst = max(steps, key=lambda s: (s.anonymous_bytes, s.peak_bytes))
            limit = f"{self.memory_where} has {human_size(self.memory_limit)}" if self.memory_limit else "limit unknown"
            verdict = " (TOO LARGE)" if self.memory_limit and worst.anonymous_bytes > self.memory_limit else ""
            lines.append(f"memory: the largest step is {worst.step}, ~{_split(worst.peak_bytes, worst.mapped_bytes)}; "
                         f"{limit}{verdict}")
            lines += [f"  re-reads {line}" for line in self.re_reads()]
        if on_gpu := self.gpu_steps():
            size = f"a GPU of {human_size(self.gpu_memory)}" if self.gpu_memory else "a CUDA GPU"
            lines.append(f"gpu: {len(on_gpu)} step(s) run on {size}: {', '.join(on_gpu)}; their GPU memory is not "
                         "predicted (the figures above are host memory)")
        lines += [f"skipped  {line}" for line in self.skipped]
        lines.append(f"disk needed: ~{human_size(self.predicted_bytes)} (artifacts + {human_size(self.eval_scratch_bytes)} evaluation scratch)")
        return "\n".join(lines)


def _split(peak: int, mapped: int) -> str:
    """'14.4 GB (12.4 GB of it memory-mapped files)'"""
    return human_size(peak) + (f" ({human_size(mapped)} of it memory-mapped files)" if mapped else "")


# llama-perplexity's statistics (evaluate/stats.py), as EvalResult keeps them.
STAT_KEYS = ("perplexity_se", "ln_ppl_ratio", "ln_ppl_ratio_se", "kld_mean", "kld_se", "kld_median", "kld_p90",
             "kld_p95", "kld_p99", "kld_p999", "kld_max", "top1_agreement", "top1_se", "rms_dp", "rms_dp_se")


@dataclass
class EvalResult:
    perplexity: float
    ppl_delta_pct: float | None  # vs the reference, in percent
    kld_mean: float | None
    kld_p99: float | None
    top1_agreement: float | None  # fraction of scored positions whose argmax equals the reference's ("same top p")
    tokens_scored: int
    smoke_passed: bool
    smoke_reply: str
    smoke_reason: str
    peak_rss_bytes: int = 0  # measured peak resident memory of the evaluating process
    peak_anon_bytes: int = 0  # its peak anonymous memory and peak of memory-mapped file pages, sampled (memwatch)
    peak_file_bytes: int = 0
    peak_gpu_bytes: int = 0  # measured peak GPU memory (torch runners on CUDA)
    predicted_peak_bytes: int = 0  # the plan's estimate of peak_rss_bytes
    seconds: float = 0.0  # wall time of the evaluation (model load and smoke test included)
    note: str = ""  # what the report must say about how it was measured (another loader, ...)
    # The rest of llama-perplexity's statistics; each *_se is one standard error (None: not measured).
    perplexity_se: float | None = None
    ln_ppl_ratio: float | None = None  # mean ln(PPL(artifact)/PPL(reference))
    ln_ppl_ratio_se: float | None = None
    kld_se: float | None = None
    kld_median: float | None = None
    kld_p90: float | None = None
    kld_p95: float | None = None
    kld_p999: float | None = None
    kld_max: float | None = None
    top1_se: float | None = None
    rms_dp: float | None = None  # root mean square of p(artifact) - p(reference) for the right token
    rms_dp_se: float | None = None
    windows: int = 0  # windows scored (fewer than the text has when evaluation.precision stopped early)
    probes: dict[str, dict] = field(default_factory=dict)  # tool_call / json_mode -> evaluate.probes.ProbeResult
