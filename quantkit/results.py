"""An artifact's result, in the order a build learns it: planned → built → measured → judged.

- Planned: its ArtifactPlan (plan.py), made by Format.plan.
- Format.describe reads the finished artifact into a Description: the format's facts of the file, nothing else.
- Built.make joins the plan, that description, the artifact's content hash and what the build step measured (its
  memory, its seconds, the tools that made it). The manifest keeps it: a resumed build never describes again.
- Measured (Built.measured) adds the chat-integrity mismatches, the evaluation (None: not evaluated) and the
  runtime engine's verdict on its chat setup (None: not checked; GGUF: llama-server).
- Judged (Measured.judged) adds what failed (gates.bound_failures): what report.json lists, and what the report, the
  card and publish read.

Each stage is frozen and made from the one before, so what a field holds is known from the type alone. to_dict()
and from_dict() are the JSON forms (report.json, the manifest): from_dict reads what an older quantkit wrote
(fields added since take their defaults, fields it no longer has are dropped).

A Report is the build's whole result as report.json holds it: the Judged artifacts with where the model came
from, how they were measured and what the profile asked. report.py writes it (JSON and markdown), publish reads it
back (Report.read: a report written by a newer quantkit is refused, REPORT_SCHEMA) for the cards and the uploads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import BuildFolderError
from .evaluate.integrity import EngineVerdict
from .evaluate.parity import Parity
from .plan import MODEL_ROLES, ArtifactPlan, EvalResult, from_record
from .profiles import ChatChecks, PublishOptions, SmokeOptions

# report.json's "schema": 2 is the first report that writes it (older reports, without it, read as 1); 3 names the
# evaluation's window length "window" (2 and older: "ctx").
REPORT_SCHEMA = 3

_T = TypeVar("_T")
_B = TypeVar("_B", bound="Built")


def check_report_schema(report: dict, where: str) -> None:
    """Refuse a report.json written by a newer quantkit: its fields may mean what this one cannot know."""
    schema = report.get("schema", 1)
    if not isinstance(schema, int) or schema > REPORT_SCHEMA:
        raise BuildFolderError(f"{where} was written by a newer quantkit (report schema {schema}; this one reads up "
                               f"to {REPORT_SCHEMA})", "upgrade quantkit")


@dataclass(frozen=True)
class Description:
    """What Format.describe reads from a finished artifact."""

    size_bytes: int
    bits_per_weight: float = 0.0  # the file's weight bytes × 8 over the model's parameters (embeddings and head included)
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> count (dtype -> count for folders)
    fallbacks: list[dict[str, str]] = field(default_factory=list)  # tensors the quantizer stored in another type than asked
    stated_bits: float = 0.0  # the rate the quantizer states for the layers it quantized (0: none, as GGUF mixes types)
    details: dict[str, Any] = field(default_factory=dict)  # what else the format reports (an importance matrix: its chunks)


@dataclass(frozen=True)
class Built:
    """A finished artifact: its plan, the format's description, its hash and its build step."""

    backend: str  # the format's name
    variant: str
    filename: str
    size_bytes: int
    sha256: str  # of the file; of a folder, the manifest's hash of its files
    bits_per_weight: float
    tensor_types: dict[str, int]
    fallbacks: list[dict[str, str]]
    role: str = "model"  # as in ArtifactPlan: reports and cards list models, and name auxiliary artifacts apart
    uses: list[str] = field(default_factory=list)  # as in ArtifactPlan
    made_from: str = ""  # ArtifactPlan.depends_on: the file it was quantized from ("": the source itself)
    details: dict[str, Any] = field(default_factory=dict)
    stated_bits: float = 0.0
    predicted_bytes: int = 0
    predicted_peak_bytes: int = 0  # the plan's estimate of peak_rss_bytes
    peak_rss_bytes: int = 0  # measured peak memory of the process that built it (0: not measured)
    peak_anon_bytes: int = 0  # of which its peak anonymous memory, sampled (memwatch; 0: not measured)
    peak_file_bytes: int = 0  # and its peak of memory-mapped file pages, which the kernel can reclaim
    seconds: float = 0.0  # wall time of the build step (0: not built in a timed run)
    tools: dict[str, str] = field(default_factory=dict)  # Format.tools: what made it, name -> version

    @classmethod
    def make(cls, item: ArtifactPlan, described: Description, sha256: str, facts: dict[str, Any],
             tools: dict[str, str]) -> "Built":
        """`facts`: what Format.build returned (its peak_* memory and seconds are the step's own)."""
        return cls(backend=item.backend, variant=item.variant, filename=item.filename, sha256=sha256,
                   role=item.role, uses=list(item.uses), made_from=item.depends_on or "",
                   predicted_bytes=item.predicted_bytes, predicted_peak_bytes=item.predicted_peak_bytes, tools=dict(tools),
                   peak_rss_bytes=int(facts.get("peak_rss_bytes", 0)), peak_anon_bytes=int(facts.get("peak_anon_bytes", 0)),
                   peak_file_bytes=int(facts.get("peak_file_bytes", 0)), seconds=float(facts.get("seconds", 0.0)),
                   **asdict(described))

    def planned_as(self, item: ArtifactPlan) -> "Built":
        """This result with the current plan's facts (a resumed artifact keeps its build, takes the new plan's
        prediction and role)."""
        return replace(self, role=item.role, uses=list(item.uses), made_from=item.depends_on or "",
                       predicted_bytes=item.predicted_bytes, predicted_peak_bytes=item.predicted_peak_bytes)

    @property
    def is_model(self) -> bool:
        return self.role in MODEL_ROLES

    def measured(self, integrity: list[str], evaluation: EvalResult | None,
                 engine: EngineVerdict | None = None) -> "Measured":
        return Measured(**_own(self), integrity=list(integrity), evaluation=evaluation, engine=engine)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_T], data: dict) -> _T | None:
        values = dict(data)
        if isinstance(values.get("evaluation"), dict):
            values["evaluation"] = from_record(EvalResult, values["evaluation"])
        if isinstance(values.get("engine"), dict):
            values["engine"] = from_record(EngineVerdict, values["engine"])
        return from_record(cls, values)


@dataclass(frozen=True)
class Measured(Built):
    integrity: list[str] = field(default_factory=list)  # chat template / stop-token mismatches with the source
    evaluation: EvalResult | None = None
    engine: EngineVerdict | None = None  # its chat setup in its runtime's own engine (None: not checked)

    def judged(self, failures: list[str]) -> "Judged":
        return Judged(**_own(self), failures=list(failures))


@dataclass(frozen=True)
class Judged(Measured):
    failures: list[str] = field(default_factory=list)  # integrity and quality bounds that failed (gates.bound_failures)


def _own(result: Built) -> dict[str, Any]:
    """The fields of `result` as they are (not deep-copied, as asdict would)."""
    return {f.name: getattr(result, f.name) for f in fields(result)}

# What a report lists for each artifact (the name of the first API).
ArtifactResult = Judged


def models(artifacts: list[_B]) -> list[_B]:
    """The artifacts that are models (tables, plots); auxiliary ones (calibration statistics, a measurement pass)
    are named apart."""
    return [a for a in artifacts if a.is_model]


@dataclass(frozen=True)
class ReportSource:
    """Where the model came from. Never an absolute local path: reports get published."""

    architecture: str
    dtype: str
    repo_id: str | None = None  # None: a local folder
    revision: str | None = None
    local: bool = False
    from_cache: str | None = None  # the Hugging Face cache it was found in, when it was not downloaded
    sample: bool = False  # quantkit's bundled sample model
    license: str | None = None
    base_model: str | None = None
    model_type: str | None = None
    converted: str | None = None  # how quantkit converted the weights first (--allow-pickle), if it did


@dataclass(frozen=True)
class ReportEvaluation:
    """How every artifact was measured (the same text, windows and reference for all of them)."""

    text: str  # the text's public name: builtin:NAME, hf:REPO, or file:NAME (never a local path)
    tokens: int | None  # of the text, tokenized
    window: int  # tokens a window (evaluation.window)
    method: str
    reference: str
    reference_result: EvalResult | None = None  # None: evaluation was off
    precision: str | None = None  # evaluation.precision, described; None: the whole text is scored


@dataclass(frozen=True)
class Report:
    """report.json, typed. to_dict() is the JSON it writes; Report.read and from_dict read it back."""

    model: str
    source: ReportSource
    profile: str
    evaluation: ReportEvaluation
    artifacts: list[Judged]
    quantkit_version: str = ""
    prompt_format: str | None = None  # the chat template rendered with placeholders
    tools: dict[str, dict[str, str]] = field(default_factory=dict)  # format -> tool -> version
    chat_checks: ChatChecks = ChatChecks()
    bounds: list[str] = field(default_factory=list)  # the profile's quality bounds, described
    smoke: SmokeOptions = SmokeOptions()
    publish: PublishOptions = PublishOptions()
    parity: list[Parity] = field(default_factory=list)  # each runtime's run of the unquantized model
    inversions: list[str] = field(default_factory=list)
    changelog: list[str] = field(default_factory=list)  # what changed since the build (quantkit retemplate), dated
    schema: int = REPORT_SCHEMA

    @property
    def models(self) -> list[Judged]:
        return models(self.artifacts)

    @property
    def failed(self) -> list[Judged]:
        return [a for a in self.artifacts if a.failures]

    def to_dict(self) -> dict:
        data = {"schema": self.schema, "quantkit_version": self.quantkit_version}  # first, for people reading it
        data |= {f.name: getattr(self, f.name) for f in fields(self) if f.name not in data}
        data["artifacts"] = [a.to_dict() for a in self.artifacts]
        data["parity"] = [p.to_dict() for p in self.parity]
        for key in ("source", "evaluation", "chat_checks", "smoke", "publish"):
            data[key] = asdict(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "report.json") -> "Report":
        """Read a report this quantkit or an older one wrote; a report it cannot read raises BuildFolderError."""
        check_report_schema(data, where)
        damaged = BuildFolderError(f"{where} is not a report as quantkit writes it",
                                   "re-run the same quantkit build command, which writes the report again")
        try:
            values = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
            evaluation = dict(data["evaluation"])
            evaluation.setdefault("window", evaluation.get("ctx"))  # schema 2 and older
            if isinstance(evaluation.get("reference_result"), dict):
                evaluation["reference_result"] = from_record(EvalResult, evaluation["reference_result"])
            values["source"] = from_record(ReportSource, data["source"])
            values["evaluation"] = from_record(ReportEvaluation, evaluation)
            values["artifacts"] = [Judged.from_dict(a) for a in data["artifacts"]]
            values["parity"] = [Parity.from_dict(p) for p in data.get("parity") or []]
            for key, kind in (("chat_checks", ChatChecks), ("smoke", SmokeOptions), ("publish", PublishOptions)):
                if key in data:
                    values[key] = from_record(kind, data[key])
            report = cls(**values)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise damaged from e
        if None in (report.source, report.evaluation, *report.artifacts):
            raise damaged
        return report

    @classmethod
    def read(cls, path: Path) -> "Report":
        """A build folder's report.json."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BuildFolderError(f"{path} cannot be read as JSON ({e})", "re-run the same quantkit build command, "
                                   "which writes the report again") from e
        if not isinstance(data, dict):
            raise BuildFolderError(f"{path} is not a report as quantkit writes it", "re-run the same quantkit build "
                                   "command, which writes the report again")
        return cls.from_dict(data, str(path))
