"""What a format is: everything quantkit knows of one kind of quantized model, asked through one class.

A format is a subclass of Format that names itself with a class keyword, which registers it (a second class of
the same name is refused):

    class TinyFormat(Format, name="tiny"):
        Options = TinyOptions            # a frozen dataclass: the profile's `tiny:` mapping, read strictly
        evaluation = Evaluation("quantkit_tinyformat.runner")
        card = Card(display="TINY")
        def plan(self, source, options, converter=None): ...
        def build(self, item, context): ...
        def describe(self, item, path, facts): ...   # optional: by default the size (and bits per parameter)

Lifecycle, in order, and which process runs each member:
  1. Plan (the quantkit process, no heavy work). read_options() reads the profile's mapping into `Options`
     (unknown keys and wrong types are errors naming the key) and calls validate(), for every format in the
     profile, before any of them is checked against this machine: a typo is reported even where the format
     cannot run. requirements()/require() refuse a format this machine lacks (or skip it: if_unavailable).
     plan() lists the ArtifactPlans, with sizes and peak memory; evaluation_peak/_mapped/_scratch size the
     evaluation steps.
  2. Build (one step per artifact, each as soon as its inputs are recorded: in this process, or as a Ray task on
     another machine).
     tools() and inputs() go into the artifact's resume key; build() writes the artifact atomically, running
     the format's tools in child processes of its own, and returns facts only it saw (a format that
     `builds_together` gets its steps that are ready together at once, in build_many: EXL2's ladder in one exllamav2 process);
     describe() reads the finished file back into a results.Description (in the build process).
  3. Evaluate (a child process per artifact: `python -m EVALUATION.runner evaluate TARGET SPEC OUT`, the
     protocol of evaluate/protocol.py). chat_facts() reads the template and stop tokens as the runtime does.
  4. Report and publish (the quantkit process): `card` (a Card, or a subclass of it) says everything a table,
     a report or a model card prints of the format's artifacts; parity() finds this runtime's own check on the
     unquantized model.
The core (build, evaluate, report, publish) asks the format and knows no format by name.
"""

from __future__ import annotations

import importlib.util
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from shlex import quote
from typing import Any, ClassVar, Literal

from ..errors import ProfileError
from ..fsutil import atomic_path, tree_size, write_text_atomic
from ..options import load_options
from ..evaluate.integrity import ChatFacts, EngineVerdict, folder_facts
from ..evaluate.parity import Parity
from ..evaluate.protocol import EvalSpec
from ..plan import ArtifactPlan
from ..results import Built, Description, Judged, Measured, ReportSource
from ..progress import Reporter
from ..source import Source
from ..memory import scored_logits

# A GPTQ/AWQ-like folder through transformers (the reference runner): torch, transformers and the kernels
# (measured at 38M and 0.52B parameters).
HF_EVAL_FIXED = 1_300_000_000
# The module that scores a folder transformers can load (and the fp16 source itself).
HF_RUNNER = "quantkit.evaluate.hf_runner"

# Where a format's files go on the Hub: "files" (one repo, every artifact a file on main), "branches" (one
# repo, a branch per variant, the card on main) or "repos" (a repo per variant, the folder on main).
Layout = Literal["files", "branches", "repos"]


@dataclass(frozen=True)
class Card:
    """Everything tables, reports, model cards and repos say of a format's artifacts. A format with more to say
    subclasses it and overrides the methods (formats/gguf/card.py: GGUFCard). `artifact` arguments are the
    artifacts' typed results (results.Judged), as a Report lists them."""

    display: str  # the format as repo names, titles and table labels write it: "GGUF", "GPTQ", "exl2"
    made_with: str = ""  # "GPTQModel": the card says "made with quantkit using ..."
    loads_in: str = ""  # "They load in transformers and vLLM."
    layout: Layout = "branches"
    tags: tuple[str, ...] = ()  # besides the format's name, "quantized" and "quantkit"
    library_name: str | None = None
    featured: tuple[str, ...] = ()  # variants the usage snippet shows first, when built
    # The format's own repo names, where the profile keeps publish.repo's default ("{owner}/{model}-{format}"), in
    # its fields ({owner}, {model}, {format}, {variant}); "": that default. compressed-tensors: {model}-FP8-Dynamic.
    repo: str = ""
    # The shell command that runs a downloaded variant, for the card's "Run" section: {repo_id}, {local_dir},
    # {filename} and {variant} are filled in, shell-quoted. Empty: a transformers snippet (usage()).
    command: str = ""

    def label(self, variant: str) -> str:
        """How tables name a variant: "GPTQ 4bit-g32"."""
        return f"{self.display.upper()} {variant}"

    def made_by(self, tools: dict[str, str]) -> str:
        """What the card says made the files, given the format's tools (name -> version) as the report has them."""
        return self.made_with or self.display

    def use_hint(self, variant: str, bits_per_weight: float) -> str:
        """The card's "Use case" cell."""
        return "low-bit; check the KL-divergence before use" if 0 < bits_per_weight < 4 else ""

    def file_note(self, artifact: Judged) -> str:
        """What the card's "Use case" cell adds about how this file loads ("" by default)."""
        return ""

    def notes(self, artifacts: list[Judged]) -> dict[str, list[str]]:
        """Sections (title -> paragraphs) the report and the card add about this format's artifacts (GGUF: the
        importance matrix, the tensors that fell back to other types)."""
        return {}

    def fallback_summary(self, artifact: Built) -> str:
        """One line on the tensors the quantizer stored in another type than asked ("" when none did)."""
        moves = Counter(f"{f['wanted']}→{f['used']}" for f in artifact.fallbacks)
        return f"{sum(moves.values())} tensors: " + ", ".join(f"{k} ×{v}" for k, v in moves.most_common()) if moves else ""

    def explain_inversion(self, big: Measured, small: Measured, source: ReportSource) -> str:
        """What the format knows of why `big` measures worse than the smaller `small` of the same format, from
        where the model came. "" when it knows nothing more than the tensor types."""
        return ""

    def usage(self, repo_id: str, local_dir: str, artifact: Judged) -> list[str]:
        """The card's "Run" section (markdown lines) for one published variant; `local_dir`: where the Download
        section put it. By default: `command`, or else transformers, from the variant's branch."""
        if self.command:
            names = {"repo_id": repo_id, "local_dir": local_dir, "filename": artifact.filename, "variant": artifact.variant}
            return ["```bash", self.command.format(**{k: quote(v) for k, v in names.items()}), "```"]
        revision = f', revision="{artifact.variant}"' if self.layout == "branches" else ""
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{revision})',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{revision})', "```"]


@dataclass(frozen=True)
class Evaluation:
    """How a format's artifacts are scored against the reference."""

    # The module run as `python -m RUNNER evaluate TARGET SPEC OUT` (evaluate/protocol.py).
    runner: str
    # The runner's own memory besides the artifact it holds and the scored logits (evaluation_peak).
    fixed_bytes: int = HF_EVAL_FIXED
    gpus: int = 0  # GPUs one evaluation needs: Ray places it on a GPU node, a job worker without one leaves it
    # Windows the runner scores in one pass over the weights (the plan's re-read estimate counts passes).
    windows_per_pass: int = 1
    # Environment variables the runner process gets (exl2: EXLLAMA_NO_SDPA, for causal attention); they are part of
    # each evaluation's key, so changing them scores the artifacts again.
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """The options of a format that takes none: any key under its name in a profile is refused."""


# Every Format subclass that named itself (class X(Format, name="x")), by name.
REGISTERED: dict[str, type["Format"]] = {}


@dataclass(frozen=True)
class BuildContext:
    source: Source
    out_dir: Path
    reporter: Reporter
    threads: int
    converter: str | None = None  # a checkout of its own converter the user gave (GGUF: a llama.cpp tree), if any
    evaluation_text: str = "builtin:botchan"  # calibration must not contain it
    # The evaluation's token ids and window, for checks a format runs against the reference before it builds (EXL2's
    # parity preflight: a runner's spec, evaluate/protocol.py); None with evaluation off.
    evaluation: EvalSpec | None = None


@dataclass(frozen=True)
class Requirement:
    """Something a format needs on this machine, checked before any work starts."""

    what: str  # "package gptqmodel", "a CUDA GPU"
    available: bool
    hint: str = ""  # how to get it
    gpu: bool = False  # a GPU on this machine: a Ray cluster with GPU nodes meets it instead


def weight_facts(path: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """size_bytes (every file of the artifact) and bits_per_weight (a folder's .safetensors bytes × 8 over the
    source's parameters: facts["source_params"], which build() returns; 0 without it) of a Description."""
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else 0
    params = facts.get("source_params") or 0
    return {"size_bytes": tree_size(path), "bits_per_weight": round(weights * 8 / params, 3) if params else 0.0}


def versions(*dists: str) -> dict[str, str]:
    """The installed versions of these distributions ("" for one that is missing): what Format.tools returns."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def package(dist: str, module: str, hint: str) -> Requirement:
    """A Python package, found without importing it (heavy imports stay lazy)."""
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return Requirement(f"package {dist}", False, hint)
    return Requirement(f"package {dist} {version}", importlib.util.find_spec(module) is not None, hint)


class Format(ABC):
    name: ClassVar[str] = ""  # set by the class keyword
    # The profile's mapping under the format's name, as a frozen dataclass (options.load_options reads it).
    Options: ClassVar[type] = NoOptions
    # How artifacts are scored; None: they are reported without evaluation.
    evaluation: ClassVar[Evaluation | None] = None
    # GPUs one build step needs: a job worker without one does not take the job, Ray places the step on a GPU node.
    gpus: ClassVar[int] = 0
    # Whether the executor hands all of this format's steps ready together to one build_many (one Ray task), rather
    # than each step to a run of its own.
    builds_together: ClassVar[bool] = False
    card: ClassVar[Card] = Card(display="")

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return  # a base for formats of its own (GPTQModelFormat), or a plugin written before the keyword
        old = REGISTERED.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"two formats are named {name!r}: {old.__module__}.{old.__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__}")
        cls.name = name
        REGISTERED[name] = cls

    def read_options(self, raw: dict[str, Any] | None) -> Any:
        """The profile's options for this format as `Options`, checked without the source or this machine's means
        (validate), so a mistake in them is reported even where the format cannot run."""
        options = load_options(self.Options, raw, self.name)
        self.validate(options)
        return options

    def requirements(self) -> list[Requirement]:
        """What this format needs; `quantkit formats` lists it, and a plan refuses a format that lacks any."""
        return []

    def vocabulary(self) -> set[str]:
        """Words that name this format's own things (its name, its tools, its types, its kinds of file): only its
        folder uses them. tests/test_formats_registry.py reads the core's code for them, and for imports of it."""
        packages = {r.what.split()[1] for r in self.requirements() if r.what.startswith("package ")}
        return {self.name, self.card.display, *self.card.tags, *packages} - {""}

    def validate(self, options: Any) -> None:
        """Checks of `options` (an Options) beyond their types that need neither the source nor this machine
        (plan() checks what needs the source)."""

    def require(self, remote_gpus: bool = False) -> None:
        """Refuse if this machine lacks a requirement (`remote_gpus`: the steps run where GPUs are, on Ray)."""
        missing = [r for r in self.requirements() if not r.available and not (r.gpu and remote_gpus)]
        if missing:
            raise ProfileError(f"format {self.name} needs {', '.join(r.what for r in missing)}",
                               "; ".join(r.hint for r in missing if r.hint) or "install what it needs")

    def step_peak(self, params: int) -> int:
        """Peak memory of this format's heaviest build step for a model of `params` 16-bit parameters, when only
        the count is known (a job queued from a Hub listing); plan() gives each step's exact estimate."""
        return 0

    @abstractmethod
    def plan(self, source: Source, options: Any, converter: str | None = None) -> list[ArtifactPlan]:
        """List the artifacts for `options` (what read_options returned); no heavy work here."""

    @abstractmethod
    def build(self, item: ArtifactPlan, context: BuildContext) -> dict[str, Any]:
        """Write `item.filename` under context.out_dir (atomically); return facts only the build saw."""

    def build_many(self, items: list[ArtifactPlan], context: BuildContext) -> Iterator[tuple[ArtifactPlan, dict[str, Any]]]:
        """Build `items` (this format's steps ready together, when `builds_together`), yielding each with its facts as
        it is finished, so the build records each even when a later one fails. By default one build() after
        another; a format whose steps share a costly start (EXL2: exllamav2's extension, loaded once for the whole
        ladder) runs them in one process. Facts may give each item's own "seconds"."""
        for item in items:
            yield item, self.build(item, context)

    def reads_source(self, item: ArtifactPlan) -> bool:
        """Whether building `item` reads the source checkpoint (on a Ray node without the source's folder, the
        step fetches it first; a step that does not read it never downloads it). By default: a step made from
        the source, not from another artifact."""
        return item.depends_on is None

    def describe(self, item: ArtifactPlan, path: Path, facts: dict[str, Any]) -> Description:
        """What the format reads from a built artifact (size, types, bits per weight), given build()'s facts; the
        build adds its plan, its hash and the step's memory (results.Built.make). By default its size, and for a
        folder of safetensors its bits per parameter when build() gave the source's parameter count
        (weight_facts)."""
        return Description(**weight_facts(path, facts))

    # What makes an artifact's bytes besides its plan (options, inputs, the source): both go into its resume key,
    # so a new tool version or an edited calibration text remakes it, and only it and what is made from it.
    def tools(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        """Name -> version of each program that makes `item` (the report and the card print them). Only this
        format's own tools: an upgrade of another format's tools must not remake this one's files."""
        return {}

    def inputs(self, item: ArtifactPlan, context: BuildContext) -> dict[str, str]:
        """Digests of what `item` is made from that its options only name: a calibration text's sha256 and a
        Hub dataset's commit (evaluate.text.calibration_identity)."""
        return {}

    # Evaluation
    def evaluation_peak(self, artifact_bytes: int, vocab: int, window: int, config: dict[str, Any] | None,
                        item: ArtifactPlan | None = None) -> int:
        """Peak memory of scoring one artifact of `artifact_bytes` (its runtime size) for a model of `config`
        (None: only the parameter count is known); `item`, the artifact's plan where there is one."""
        return (self.evaluation.fixed_bytes if self.evaluation else 0) + artifact_bytes + scored_logits(vocab, window)

    def evaluation_mapped(self, item: ArtifactPlan) -> int:
        """How much of evaluation_peak is memory-mapped files (pages the kernel can drop and read again) when
        scoring `item`. 0: the runner copies the weights (all anonymous)."""
        return 0

    def evaluation_scratch(self, item: ArtifactPlan) -> int:
        """Disk the runner writes while scoring `item` and removes after (0: none)."""
        return 0

    def chat_facts(self, path: Path) -> ChatFacts:
        """The chat template, special tokens and stop tokens as the artifact's runtime reads them."""
        return folder_facts(path)

    def engine_identity(self) -> str:
        """The runtime engine engine_check asks (its version; part of the check's resume key). "": none."""
        return ""

    def engine_check(self, path: Path, source: ChatFacts, call: dict | None, threads: int,
                     template_file: Path | None = None) -> EngineVerdict:
        """The artifact's chat setup in its runtime's own engine: the integrity conversations rendered there and
        compared with the source's, and `call` (the source's tool call, None: it made none) parsed back by the
        engine's own tool-call parser. `template_file`: run that template instead of the artifact's own. Only
        asked when engine_identity() names an engine."""
        raise NotImplementedError

    def retemplate(self, path: Path, template_file: Path, token_ids: dict[str, int],
                   tokenizer_files: dict[str, bytes]) -> None:
        """Give the artifact a new chat template without touching its weights, each file replaced whole
        (quantkit retemplate): `token_ids`, the special tokens whose ids change ({"eos": 2}); `tokenizer_files`, a
        source revision's tokenizer files (empty: only the template changes). By default a Hugging Face folder's
        tokenizer files: the revision's files where the folder has them (and its chat_template.jinja), or the new
        template as chat_template.jinja (and in tokenizer_config.json's chat_template, if it keeps one there)."""
        template = template_file.read_text(encoding="utf-8")
        if tokenizer_files:
            for name, data in tokenizer_files.items():
                if (path / name).is_file() or name == "chat_template.jinja":
                    with atomic_path(path / name) as tmp:
                        tmp.write_bytes(data)
            return
        write_text_atomic(path / "chat_template.jinja", template)
        config = path / "tokenizer_config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            if "chat_template" in data:
                write_text_atomic(config, json.dumps({**data, "chat_template": template}, indent=2, ensure_ascii=False) + "\n")

    # Reports and cards: everything else they say is the Card's.
    def parity(self, artifact: Measured) -> Parity | None:
        """This runtime's run of the unquantized model against the reference, if `artifact` carries one: by
        default a preflight the build kept in its details (exl2's, with its measurement)."""
        found = artifact.details.get("parity")
        return Parity.from_dict(found) if found else None


# Third-party packages written against the first API name their class Backend.
Backend = Format
