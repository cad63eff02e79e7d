"""The runner protocol: what quantkit asks of an evaluation runner, and what it takes back.

A format's runner is a module run as `python -m RUNNER evaluate TARGET SPEC.json OUT.json` (Format.evaluation.runner).
quantkit writes SPEC (an EvalSpec), the runner scores TARGET against the reference and writes OUT (an
EvalOutput). A runner built on quantkit holds only its runtime, a `Runtime` (score a window, answer chat turns),
and hands it to the one loop every runner shares (`run`: the windows, the accumulated statistics, the precision
target, the state between rounds, the reference rows, the smoke test and the probes):

    def evaluate(target: str, spec: EvalSpec) -> EvalOutput:
        return run(MyRuntime(target, spec), spec)

    if __name__ == "__main__":
        sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate}))

runner_main adds the process's memory peaks and time. docs/evaluation.md, "The runner protocol", says it all for
a format's author.

Compatibility. Both JSON documents are read with `from_json`, which refuses a document that lacks a required key
and keeps every key it does not know in `extra`, written back by `to_json`: a runner of this quantkit reads a spec
written by a newer one, and a runner may report facts of its own (the manifest keeps them). Keys are only ever
added, each with the meaning the runners had before it when it is absent, and never renamed: the key of every
evaluation in a build's manifest is made of the spec's JSON (`EvalSpec.key_json`). Both classes also read as
read-only mappings of their JSON keys, so a runner written against the plain dicts (spec["ctx"],
spec.get("bos"), {**output, "note": ...}) keeps working.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, TypedDict, runtime_checkable

import numpy as np

from ..cpus import usable_cpus
from ..errors import QuantkitError
from ..memwatch import MemoryWatch
from . import causality
from .chat import chat_turns
from .metrics import Accumulator, ReferenceRows, Windows, log_softmax, scored_range
from .stats import Precision

# A key with this metadata is written even at its default value: the JSON has always had it, and the
# evaluations' keys in existing manifests are made of that JSON.
ALWAYS = {"always": True}
# Keys of the spec that no score depends on: the tokens are keyed by content (in the reference's key), never by
# their path, so a build folder moved elsewhere keeps its evaluations; the thread count changes no number.
UNKEYED = ("tokens", "threads")
NO_TEMPLATE = "the artifact has no chat template"


class Smoke(TypedDict):
    """The smoke test a spec asks for (the profile's `smoke`, without allow_failures: the build's call)."""

    system: str
    question: str
    expect: str  # the reply must contain it (case-insensitive)
    max_tokens: int  # and end its turn within this many tokens


class SmokeVerdict(TypedDict, total=False):
    """A runner's smoke test (evaluate/chat.py: smoke_verdict)."""

    passed: bool
    reply: str
    end_token: str | None  # the end-of-turn token that ended the reply; None: the cap did
    reason: str
    prompt: str  # the prompt as the artifact's template rendered it


class _JSONMapping(Mapping):
    """A read-only mapping of the JSON keys; `extra` holds the keys this quantkit does not know. A field's JSON key
    is its name, or its metadata's "key" where the Python name changed and the JSON key may not."""

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.metadata.get("always") or _required(f) or value != _default(f):
                out[_key(f)] = asdict(value) if is_dataclass(value) else value
        return out | self.extra

    @classmethod
    def _parse(cls, data: Mapping, what: str) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            raise ValueError(f"{what} must be a JSON object, not {type(data).__name__}")
        names = {_key(f): f.name for f in fields(cls) if f.name != "extra"}
        missing = [_key(f) for f in fields(cls) if _required(f) and _key(f) not in data]
        if missing:
            raise ValueError(f"{what} lacks {', '.join(missing)}")
        return ({names[k]: v for k, v in data.items() if k in names}
                | {"extra": {k: v for k, v in data.items() if k not in names}})

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self):
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def _key(f) -> str:
    return f.metadata.get("key", f.name)


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _check(what: str, value: Any, kinds: tuple[type, ...], positive: bool = False) -> None:
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or positive and value <= 0:
        raise ValueError(f"{what} is {value!r}, not {'a positive ' if positive else 'a '}{'/'.join(k.__name__ for k in kinds)}")


@dataclass(frozen=True, eq=True)
class EvalSpec(_JSONMapping):
    """What a runner is asked: SPEC.json. Written by evaluate/evaluator.py (Evaluator); each key says who sets it.

    The build's keys, the same for every run of a build (Evaluator._keys), all but tokens and threads in the key:"""

    tokens: str  # path of a .npy of int32 token ids: the evaluation text, tokenized once by the source's tokenizer
    # Tokens a window: windows of that many tokens, positions window/2 .. window-2 scored (metrics.scored_range). Its
    # JSON key is "ctx", the name it had when the evaluations' keys in existing manifests were made.
    window: int = field(metadata={"key": "ctx"})
    bos: int | None = field(default=None, metadata=ALWAYS)  # each window's first token is replaced by it (None: kept)
    threads: int = field(default_factory=usable_cpus, metadata=ALWAYS)  # CPU threads the runner may use
    smoke: Smoke | None = field(default=None, metadata=ALWAYS)  # the smoke test to run; None: none
    # How the reference decodes its chat replies (hf_runner): "stored" (prompt in float32, decode in the stored 16-bit
    # dtype, batched) or "float32" (every token in float32, a prompt at a time). Keyed: every probe is judged
    # against the reference's replies. Other runners ignore it.
    generate: str = field(default="stored", metadata=ALWAYS)
    probes: dict[str, str] | None = None  # name -> prompt, rendered from the source's template (evaluate/probes.py)
    probe_tokens: int | None = None  # the probes' reply cap (set with probes)
    precision: Precision | None = None  # stop once the mean KLD is this precise ({relative, confidence}); None: all windows
    streamed: bool = False  # the reference runs layer by layer (evaluate/streamed.py): it scores and does not generate
    # Per run, never keyed (Evaluator.reference / evaluate):
    reference: bool = False  # TARGET is the fp16 source: the reference (hf_runner: weights as stored, float32 compute)
    ref_write: str | None = None  # write the log-probabilities here (float16 .npy: metrics.ReferenceRows): the reference
    ref_read: str | None = None  # compare with the reference's log-probabilities there: every artifact
    windows: int | None = None  # score at most this many windows (None: all of the text)
    state: str | None = None  # keep the per-position values here (.npz); a later run with more windows goes on from it
    chat: bool = True  # False: no smoke test and no probes (a later round; the first one's replies stand)
    # Probe the runtime's causality first (causality.py): the parity runs ask it, the reference and an unquantized
    # intermediate (llama.cpp's F16), whose runtimes then score every other file.
    causality: bool = False
    # A folder of this evaluation's own (Evaluator: the build's state folder, named by the evaluation's key, so by the
    # artifact's content), for what a runner prepares from the artifact once and keeps between rounds (MLX: the
    # dequantized checkpoint). quantkit removes it after the evaluation's last round. None: keep nothing.
    scratch: str | None = None
    # Options of one runner, for tests and benchmarks; the build never sets them:
    weights: str | None = None  # hf_runner, reference: "float32" loads a float32 copy (the old reference)
    experts: str | None = None  # transformers runners: "fused" loads a MoE's experts fused (evaluate/experts.py)
    stream_group: int | None = None  # streamed: windows per group (default: as many as about 1 GB of activations)
    windows_per_decode: int | None = None  # gguf: windows per llama.cpp decode (default WINDOWS_PER_DECODE)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this quantkit does not know (from a newer one)

    @classmethod
    def from_json(cls, data: Mapping) -> "EvalSpec":
        values = cls._parse(data, "an evaluation spec")
        _check("tokens", values["tokens"], (str,))
        _check("ctx", values["window"], (int,), positive=True)
        for key in ("bos", "windows", "probe_tokens", "threads", "stream_group", "windows_per_decode"):
            if values.get(key) is not None:
                _check(key, values[key], (int,))
        if isinstance(values.get("precision"), Mapping):
            values["precision"] = Precision(**values["precision"])
        return cls(**values)

    @classmethod
    def of(cls, spec: "EvalSpec | Mapping") -> "EvalSpec":
        """`spec` itself, or the mapping a runner written before this class passes on, read as a spec."""
        return spec if isinstance(spec, EvalSpec) else cls.from_json(spec)

    def key_json(self) -> str:
        """What the evaluations' keys are made of (Evaluator._keys, on the build's keys before any per-run key)."""
        return json.dumps({k: v for k, v in self.to_json().items() if k not in UNKEYED}, sort_keys=True)

    def window_ids(self) -> Windows:
        """The text's windows as every runner scores them (with BOS)."""
        return Windows(np.load(self.tokens), self.window, self.bos)


@dataclass(frozen=True, eq=True)
class EvalOutput(_JSONMapping):
    """What a runner writes: OUT.json. The statistics come from the loop (`run`), the chat turns from the Runtime's
    replies, the memory and time from runner_main. evaluate/evaluator.py reads it (Evaluator._result) and keeps it in the
    manifest as the evaluation's raw record; stats.statistics defines every number."""

    perplexity: float
    tokens_scored: int
    windows: int  # windows scored, in all the rounds so far
    perplexity_se: float | None = None
    # Against the reference rows (None when the run wrote them: the reference itself):
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_se: float | None = None
    kld_mean: float | None = None
    kld_se: float | None = None
    kld_median: float | None = None
    kld_p90: float | None = None
    kld_p95: float | None = None
    kld_p99: float | None = None
    kld_p999: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    top1_se: float | None = None
    rms_dp: float | None = None
    rms_dp_se: float | None = None
    precise: bool = field(default=False, metadata=ALWAYS)  # the precision target was reached
    smoke: SmokeVerdict | None = None  # None: the chat turns did not run (chat: false), or no smoke test was asked
    probes: dict[str, str] | None = None  # name -> the artifact's raw reply (the build judges them: evaluate/probes.py)
    note: str = ""  # what the report must say of how it was measured (another loader, another runtime)
    streamed: bool = False  # the streamed reference ran
    parity: dict[str, Any] | None = None  # a runtime check the runner made (parity.Parity.to_dict(): MLX's)
    causality: dict[str, Any] | None = None  # the causality probe of the first round (causality.Causality.to_dict())
    score_seconds: float | None = None  # the scoring's wall time
    chat_stats: dict[str, Any] | None = None  # prompt and generated tokens and their seconds (transformers runners)
    peak_gpu_bytes: int = 0  # torch on CUDA
    # runner_main: the process's peaks (resident, anonymous, memory-mapped files) and its wall time.
    peak_rss_bytes: int = field(default=0, metadata=ALWAYS)
    peak_anon_bytes: int = field(default=0, metadata=ALWAYS)
    peak_file_bytes: int = field(default=0, metadata=ALWAYS)
    seconds: float = field(default=0.0, metadata=ALWAYS)
    extra: dict[str, Any] = field(default_factory=dict)  # a runner's own facts, kept as they are

    @classmethod
    def from_json(cls, data: Mapping) -> "EvalOutput":
        values = cls._parse(data, "an evaluation's output")
        _check("perplexity", values["perplexity"], (int, float))
        _check("tokens_scored", values["tokens_scored"], (int,))
        _check("windows", values["windows"], (int,))
        return cls(**values)

    @classmethod
    def of(cls, result: "EvalOutput | Mapping") -> "EvalOutput":
        """`result` itself, or a runner's dict validated into one."""
        return result if isinstance(result, EvalOutput) else cls.from_json(result)


Turn = tuple[str, int, bool]  # (prompt, most tokens to generate, keep special tokens in the reply)
Reply = tuple[str, "str | None"]  # (reply, the end-of-turn token that ended it; None: the cap did)


@runtime_checkable
class Runtime(Protocol):
    """An artifact as one runtime runs it: all a runner has of its own.

    Optional, found by name when a runtime has them:
      prepare(windows): called once before scoring with every window this run may score, in order (a runtime that
        computes several at once: llama.cpp's groups of windows, the streamed reference's layers);
      scored(): the scoring is done, free what only it needed before the chat turns;
      no_template: the smoke test's reason when `render` is None (default NO_TEMPLATE);
      name: how errors name the runtime ("llama.cpp"; default: its class name);
      facts(out): entries to add to the output, or replace in it, given the output so far (scores and chat turns):
        note, peak_gpu_bytes, chat_stats, a smoke verdict's reason only the runtime can give;
      close(): the end."""

    vocab_size: int  # the width of a row of logits (the reference rows' width)
    # The artifact's own chat template, as its runtime renders it: messages -> prompt (a generation prompt added).
    # None: it has none, and the smoke test fails saying so.
    render: Callable[[list[dict]], str] | None

    def forward(self, window: np.ndarray) -> np.ndarray:
        """The logits of one window's scored positions (scored_range(window): window/2 .. window-2), [window/2 - 1,
        vocab_size]. The window is spec.window token ids from position 0 (an empty cache), its first one already BOS
        where it has one."""

    def generate(self, turns: list[Turn]) -> list[Reply]:
        """Greedy replies to every turn, in order, each stopping at the runtime's end-of-turn tokens or its cap."""


def score(runtime: Runtime, spec: EvalSpec) -> dict[str, Any]:
    """Score the text's windows through `runtime` and accumulate: write the log-probabilities to spec.ref_write, or
    compare with spec.ref_read. At most spec.windows windows; spec.state keeps the per-position values between
    runs, so a later run with a higher cap goes on from where this one stopped; spec.precision stops as soon as the
    mean KLD is that precise."""
    text = spec.window_ids()
    first, last = scored_range(spec.window)
    per_window = last - first
    stop = min(spec.windows or len(text), len(text))
    precision = spec.precision
    state = Path(spec.state) if spec.state else None
    acc = Accumulator.load(state) if state and state.exists() else Accumulator()
    start = acc.windows(per_window)
    ref = None
    if spec.ref_write:
        ref = ReferenceRows(spec.ref_write, "a" if start else "w", (len(text) * per_window, runtime.vocab_size))
    elif spec.ref_read:
        ref = ReferenceRows(spec.ref_read, "r")
    done = precision is not None and precision.reached(acc.values("kld"))
    # A parity run's first round first scores the first window's changed twin (causality.py): the loop's own run of
    # that window is the probe's other half, so the probe costs one window.
    probe = (causality.probe_windows(text[0], first, last, runtime.vocab_size)
             if spec.causality and start == 0 < stop and not done else None)
    if (prepare := getattr(runtime, "prepare", None)) is not None and not done:
        prepare(([probe[1]] if probe else []) + [text[i] for i in range(start, stop)])
    twin = np.array(runtime.forward(probe[1])[:probe[2] - first]) if probe else None  # only the rows it compares
    found = None
    for i in range(start, stop):
        if done:
            break
        ids = text[i]
        logits = runtime.forward(ids)
        if i == 0 and probe:
            found = causality.compare(getattr(runtime, "name", type(runtime).__name__), logits, twin, first,
                                      probe[2]).check()
            twin = None
        lp = log_softmax(logits)
        del logits  # a window's logits beside its log-probabilities would raise every run's peak by one window
        if spec.ref_write:
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
    return acc.summary() | {"windows": acc.windows(per_window), "precise": done} | (
        {"causality": found.to_dict()} if found else {})


def run(runtime: Runtime, spec: EvalSpec) -> EvalOutput:
    """The loop every runner shares: the scoring, then the chat turns (the smoke test and the probes, unless
    spec.chat is false), then the runtime's own facts."""
    spec = EvalSpec.of(spec)
    start = time.monotonic()
    out = score(runtime, spec)
    out["score_seconds"] = round(time.monotonic() - start, 2)
    if (scored := getattr(runtime, "scored", None)) is not None:
        scored()
    out |= chat_turns(None, runtime.render, spec, getattr(runtime, "no_template", NO_TEMPLATE), runtime.generate)
    if (facts := getattr(runtime, "facts", None)) is not None:
        out |= facts(out)
    if (close := getattr(runtime, "close", None)) is not None:
        close()
    return EvalOutput.from_json(out)


def runner_main(argv: list[str], commands: dict[str, Callable]) -> int:
    """The command line of a runner: `evaluate TARGET SPEC.json OUT.json`, plus its own commands (run with their
    arguments as given). commands["evaluate"](target, spec: EvalSpec) returns an EvalOutput, or a dict that is one."""
    try:
        if argv and argv[0] == "evaluate" and len(argv) == 4:
            return _evaluate(commands["evaluate"], *argv[1:])
        if argv and argv[0] in commands and argv[0] != "evaluate":
            commands[argv[0]](*argv[1:])
            return 0
    except QuantkitError as e:  # a verdict on the runtime (causality), for the build to show as it is
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"usage: evaluate TARGET SPEC.json OUT.json | {' | '.join(c for c in commands if c != 'evaluate')}",
          file=sys.stderr)
    return 2


def _evaluate(evaluate: Callable, target: str, spec_file: str, out_file: str) -> int:
    start = time.monotonic()
    try:
        spec = EvalSpec.from_json(json.loads(Path(spec_file).read_text()))
    except ValueError as e:
        print(f"error: {spec_file}: {e}", file=sys.stderr)
        return 2
    with MemoryWatch() as watch:
        result = EvalOutput.of(evaluate(target, spec))
    # Measured here rather than by the parent, so they travel with the result from a Ray task too.
    result = replace(result, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                     **watch.facts(), seconds=round(time.monotonic() - start, 2))
    Path(out_file).write_text(json.dumps(result.to_json(), indent=1))
    return 0
