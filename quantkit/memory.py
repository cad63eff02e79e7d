"""Peak memory of each step of a build, predicted before anything runs, and the limit the steps must fit.

Each estimate is a formula in what a plan knows without loading weights (parameter count, bytes of
weights, the largest tensor or MoE layer, the vocabulary, the evaluation window) with constants
fitted to the peak resident memory measured at 135M, 3B and 7B parameters and on a 0.52B MoE
(docs/benchmarks.md, "Scale"). A step that would not fit is refused before the build starts, naming the step
and the bytes it needs, instead of being killed by the kernel halfway through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import NotEnoughMemory, QuantkitError
from .fsutil import human_size, parse_bytes

MEMORY_ENV = "QUANTKIT_MEMORY"
REFERENCE = "reference"  # the target name of the reference step

# Fitted to peak RSS measured at 135M, 3B and 7B parameters (docs/benchmarks.md, "Scale").
# The fp16 reference (transformers, weights kept as stored, float32 compute): torch and transformers
# themselves and one window's activations (which grow a little with the model), the weights, a float32
# copy of the module running now, and the scored rows' logits. Measured 1.48, 7.83 and 16.97 GB. The
# weights are memory-mapped from the safetensors files (transformers keeps them as stored). A MoE's experts
# stay so where defuser knows the model (evaluate/experts.py); elsewhere transformers copies them into fused
# tensors on load, and they count twice (3.10 GB for the 0.52B MoE).
REFERENCE_FIXED = 1_000_000_000
REFERENCE_PER_PARAM = 0.04


# Sequential reads from this kind of machine's disk: a plain read of the Mixtral-shaped checkpoints' files, cold,
# 0.41 GB/s (scripts/bench_mixtral.py's baseline). What re-reading a memory-mapped file is estimated at;
# $QUANTKIT_DISK_READ (bytes per second: 2G) says it for another disk.
DISK_READ_ENV = "QUANTKIT_DISK_READ"
DISK_READ_BYTES_PER_S = 400_000_000


@dataclass(frozen=True)
class StepMemory:
    """A step's predicted peak, split as the kernel splits it: anonymous memory (heap, torch's tensors,
    llama.cpp's buffers), which must fit, and pages of memory-mapped files (the weights as stored), which the
    kernel drops under pressure and reads again when they are touched. A step is refused only when its
    anonymous memory does not fit; when the whole does not, it runs, reading its files again on every pass."""

    step: str  # what plan and errors print: "reference (fp16 source, transformers)", "evaluate X.gguf"
    target: str  # the artifact's file name, or "reference"
    peak_bytes: int  # anonymous + memory-mapped
    mapped_bytes: int = 0  # of which memory-mapped file pages
    passes: int = 1  # how many times the step goes through its mapped files (decodes of windows, imatrix chunks)

    @property
    def anonymous_bytes(self) -> int:
        return self.peak_bytes - self.mapped_bytes

    def re_read_bytes(self, limit: int) -> int:
        """Bytes read from disk again when only `limit` fits: at least the mapped part that cannot stay resident,
        on every pass after the first (the first reads it all in any case)."""
        if not limit or self.peak_bytes <= limit:
            return 0
        missing = self.mapped_bytes - max(0, limit - self.anonymous_bytes)
        return max(0, missing) * max(0, self.passes - 1)


def disk_read_rate() -> int:
    value = os.environ.get(DISK_READ_ENV)
    if not value:
        return DISK_READ_BYTES_PER_S
    rate = parse_bytes(value)
    if not rate:
        raise QuantkitError(f"{DISK_READ_ENV}={value!r} is not a rate", "write the bytes per second like 2G or 500M")
    return rate


def machine_memory() -> int:
    """The memory steps may use: $QUANTKIT_MEMORY (e.g. 16G, to plan for a smaller machine), else all of it."""
    if os.environ.get(MEMORY_ENV):
        value = parse_bytes(os.environ[MEMORY_ENV])
        if value is None:
            raise QuantkitError(f"{MEMORY_ENV}={os.environ[MEMORY_ENV]!r} is not a size", "write it like 16G or 512M")
        return value
    return total_memory(sys.platform, _memory_report(sys.platform)) or _sysconf_memory()


def total_memory(platform: str, report: str) -> int:
    """The machine's memory in bytes from what `platform` (sys.platform) reports of it: /proc/meminfo's text on
    Linux, the output of `sysctl -n hw.memsize` on macOS; 0 when the report says nothing usable. Pure, so every
    platform's parsing is tested on any machine."""
    if platform.startswith("linux"):
        for line in report.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "MemTotal:" and fields[1].isdigit():
                return int(fields[1]) * 1024  # the kernel's "kB" are KiB
        return 0
    if platform == "darwin":
        value = report.strip()
        return int(value) if value.isdigit() else 0
    return 0


def _memory_report(platform: str) -> str:
    try:
        if platform.startswith("linux"):
            return Path("/proc/meminfo").read_text()
        if platform == "darwin":
            # macOS has no /proc; hw.memsize is the installed memory in bytes (MLX's unified memory included).
            # Its full path: a PATH without /usr/sbin would silently turn the memory refusals off again.
            return subprocess.run(["/usr/sbin/sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                  timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    return ""


def _sysconf_memory() -> int:
    """Physical pages times page size, where the platform's own report failed (POSIX systems without /proc)."""
    try:
        return max(0, os.sysconf("SC_PHYS_PAGES")) * max(0, os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def scored_logits(vocab: int, window: int) -> int:
    """float32 logits and log-probabilities of the scored half of one window, and the float16 reference rows."""
    return (window // 2) * vocab * (4 + 4 + 2)


def reference_peak(params: int, weight_bytes: int, largest_module: int, vocab: int, window: int,
                   expert_bytes: int = 0) -> int:
    return int(REFERENCE_FIXED + REFERENCE_PER_PARAM * params + weight_bytes + expert_bytes + 4 * largest_module
               + scored_logits(vocab, window))


# The streamed reference (evaluate/streamed.py): torch and transformers and the tensors outside the decoder
# layers (as stored), the windows' hidden states, and the larger of two phases: a layer running (the largest
# layer as stored, its largest tensor in float32, one group of windows' activations) or the head scoring (the
# largest tensor, the head, in float32, and the scored rows' logits). Fitted to Mixtral-8x7B-shaped checkpoints
# of 2 and 4 layers (docs/benchmarks.md, "Mixtral at its real dimensions"): measured 4.62 and 4.66 GB, predicted
# 4.98 GB for both (the activation term counts every routed token in every expert, an upper bound).
STREAMED_FIXED = 400_000_000


def streamed_reference_peak(stats, config: dict, vocab: int, window: int, n_windows: int) -> int:
    """`stats`: source.TensorStats of the checkpoint."""
    from .evaluate.streamed import GROUP_BYTES, window_activation_bytes

    h = int(config.get("hidden_size") or 4096)
    n_layers = int(config.get("num_hidden_layers") or 1)
    act = window_activation_bytes(config, window)
    group = max(1, min(n_windows, GROUP_BYTES // act))
    outside = max(0, stats.weight_bytes - n_layers * stats.largest_layer)  # embeddings, head, final norm
    layer_phase = stats.largest_layer + 4 * stats.largest_in_layer + group * act
    head_phase = 4 * stats.largest + scored_logits(vocab, window)
    return int(STREAMED_FIXED + outside + 4 * n_windows * window * h + max(layer_phase, head_phase))


def streamed_reference_mapped(stats, config: dict) -> int:
    """The streamed reference's memory-mapped part: the tensors outside the layers and the layer being read
    (measured 3.65 GB of 4.62-4.66 at Mixtral's dimensions; each is read once a round)."""
    n_layers = int(config.get("num_hidden_layers") or 1)
    return max(0, stats.weight_bytes - n_layers * stats.largest_layer) + stats.largest_layer


def chat_kv_bytes(config: dict) -> int:
    """llama.cpp's float16 KV cache for the chat turns' context (CHAT_CTX tokens), from the model's config."""
    from .evaluate.chat import CHAT_CTX

    layers = int(config.get("num_hidden_layers") or 32)
    heads = int(config.get("num_attention_heads") or 32)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or 4096) // heads)
    return 2 * layers * CHAT_CTX * int(config.get("num_key_value_heads") or heads) * head_dim * 2


def job_peak(profile, params: int, chosen: list) -> int:
    """The heaviest step of a build of `profile` for a model of `params` parameters when nothing else is known
    (a job queued from a Hub listing): 16-bit weights, a vocabulary of 152k, the largest module 5% of the model."""
    vocab, ev = 152_064, profile.evaluation
    steps = [f.step_peak(params) for f in chosen]
    if ev.enabled:
        steps.append(reference_peak(params, 2 * params, params // 20, vocab, ev.window))
        steps += [f.evaluation_peak(2 * params, vocab, ev.window, None) for f in chosen if f.evaluation]
    return max(steps, default=0)


def too_large(steps: list[StepMemory], limit: int, where: str = "this machine") -> None:
    """Refuse when any step needs more than `limit` bytes of anonymous memory (0: no limit known). Its
    memory-mapped pages need not fit: they are read again instead (re_reads says how much and how long)."""
    over = [s for s in steps if limit and s.anonymous_bytes > limit]
    if not over:
        return
    worst = max(over, key=lambda s: s.anonymous_bytes)
    others = f" ({len(over) - 1} other step(s) too: {', '.join(s.step for s in over if s is not worst)})" if len(over) > 1 else ""
    mapped = f" besides {human_size(worst.mapped_bytes)} of memory-mapped files" if worst.mapped_bytes else ""
    raise NotEnoughMemory(
        f"{worst.step} needs about {human_size(worst.anonymous_bytes)} of memory{mapped} and {where} has "
        f"{human_size(limit)}{others}",
        f"build on a machine with at least {human_size(worst.anonymous_bytes)} (or pass --ray with a node that large), "
        "or leave the step out of the profile (a backend, or evaluation.enabled: false for the reference and evaluations)")


def re_reads(steps: list[StepMemory], limit: int) -> list[str]:
    """One line for each step that fits only by reading its memory-mapped files again, with the time that adds
    (a step that goes through them once reads them once either way)."""
    lines = []
    rate = disk_read_rate()
    for s in steps:
        extra = s.re_read_bytes(limit)
        if extra and s.anonymous_bytes <= limit:
            seconds = extra / rate
            took = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.1f} s"
            lines.append(f"{s.step}: {human_size(s.mapped_bytes)} of memory-mapped files do not stay resident beside "
                         f"{human_size(s.anonymous_bytes)} of its own memory; it runs, re-reading from disk (about "
                         f"{human_size(extra)} over {s.passes} passes: at least {took} more at {human_size(rate)}/s)")
    return lines
