"""The dashboard's rows and pages, typed: made from the queue's Jobs and a build folder's report.json, holding only
what a page shows (public strings, numbers, no local paths). The templates and the JSON API read these, nothing
else."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BuildFolderError, QuantkitError
from ..fsutil import human_size
from ..jobs.queue import Job, JobQueue
from ..report import COLUMNS
from ..results import Judged, Report
from .public import public_text

LOG_TAIL_BYTES = 16_384  # of a running job's log, for its last line


@dataclass(frozen=True)
class JobRow:
    """A job as the jobs page shows it (and /api/jobs sends it)."""

    id: int
    model: str
    revision: str
    profile: str  # a profile's name, or the file name of one given as a file
    kind: str
    state: str
    attempts: str  # "1/3"
    worker: str | None
    next_attempt: str | None  # a queued job that waits: "in 42 s"
    error: str | None
    fix: str | None
    progress: str | None  # a running job: the last line of its log
    updated: str
    build: str | None  # the name of its build page, when the dashboard has that build's report

    @classmethod
    def of(cls, job: Job, now: float, progress: str | None, builds: set[str]) -> "JobRow":
        wait = job.not_before - now if job.state == "queued" and job.not_before else 0
        model = job.repo_id.split("/")[-1]
        return cls(
            id=job.id, model=public_text(job.repo_id), revision=job.revision[:12],
            profile=public_text(Path(job.profile).name if job.profile_text is not None else job.profile),
            kind=job.kind, state=job.state, attempts=f"{job.attempts}/{job.max_attempts}",
            worker=public_text(job.worker) if job.worker and job.state == "running" else None,
            next_attempt=f"in {_duration(wait)}" if wait > 0 else None,
            error=public_text(job.error) if job.error and job.state != "done" else None,
            fix=public_text(job.fix) if job.fix and job.state != "done" else None,
            progress=public_text(progress) if progress else None,
            updated=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.updated)),
            build=model if model in builds else None)


@dataclass(frozen=True)
class JobsView:
    """The jobs page's data: what /api/jobs returns, and what the page starts from."""

    queue: str  # the queue's name, without a password
    counts: dict[str, int]
    jobs: list[JobRow]
    problem: str | None = None  # the queue could not be read: why, and the fix

    def to_json(self) -> dict:
        return asdict(self)


def jobs_view(queue: JobQueue | None, queue_error: QuantkitError | None, builds: "BuildIndex") -> JobsView:
    if queue is None:
        return JobsView("—", {}, [], problem=_problem(queue_error))
    try:
        jobs, now, names = queue.list(), queue.now(), set(builds.reports())
        rows = [JobRow.of(j, now, _last_line(queue, j) if j.state == "running" else None, names) for j in jobs]
    except QuantkitError as e:  # the server went away while the dashboard runs: said on the page, retried
        return JobsView(public_text(queue.where), {}, [], problem=_problem(e))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    return JobsView(public_text(queue.where), counts, list(reversed(rows)))


def _problem(e: QuantkitError | None) -> str:
    return public_text(f"{e}; fix: {e.hint}" if e and e.hint else str(e))


def _last_line(queue: JobQueue, job: Job) -> str | None:
    text = queue.log_text(job.id)
    lines = [line.strip() for line in (text or "")[-LOG_TAIL_BYTES:].replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:200] if lines else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


# ---------------------------------------------------------------------------------------------------- builds
class BuildIndex:
    """The builds --builds names, by build folder name: a folder of builds (`build --out`), one build folder, or an
    artifact store (an fsspec URL; its builds/ holds each build's reports, store.py). Read through fsspec, so a
    store on S3 is read like a local folder. A page is found by its name in this index; a name from a URL never
    becomes a path."""

    _LAYOUTS = ("report.json", "*/report.json", "builds/*/report.json")

    def __init__(self, where: str | Path) -> None:
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(str(where))
        except (ImportError, ValueError) as e:
            raise QuantkitError(f"cannot read the builds at {where}: {e}",
                                "pass --builds a folder, or an fsspec URL whose package is installed") from e
        self.root = root.rstrip("/")

    def reports(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for layout in self._LAYOUTS:
            for path in sorted(self.fs.glob(f"{self.root}/{layout}")):
                found.setdefault(path.rsplit("/", 2)[-2], path)
        return found

    def read(self, name: str, reports: dict[str, str] | None = None) -> Report | None:
        """The build's report; None when there is no build of that name. `reports`: a listing already made."""
        path = (self.reports() if reports is None else reports).get(name)
        if path is None:
            return None
        try:
            data = json.loads(self.fs.cat_file(path))
        except (OSError, ValueError) as e:
            raise BuildFolderError(f"the report of {name} cannot be read as JSON ({e})",
                                   "re-run its quantkit build, which writes the report again") from e
        if not isinstance(data, dict):
            raise BuildFolderError(f"the report of {name} is not a report as quantkit writes it",
                                   "re-run its quantkit build, which writes the report again")
        return Report.from_dict(data, f"the report of {name}")


@dataclass(frozen=True)
class Cell:
    text: str
    value: float | int | str | None = None  # the number as report.json has it (a page's data-value)
    bad: bool = False  # a verdict that failed (shown in red)


# The file table: (column key, raw number in report.json). Text from report.COLUMNS, the report's and the card's
# own definition of each cell, so the three agree.
TABLE = [("file", None), ("type", None), ("size", lambda a, e: a.size_bytes),
         ("bpw", lambda a, e: a.bits_per_weight or None), ("kld", lambda a, e: e and e.kld_mean),
         ("top1", lambda a, e: e and e.top1_agreement), ("ppl", lambda a, e: e and e.perplexity),
         ("smoke", None), ("integrity", None), ("tool", None), ("json", None), ("checks", None)]
HEADERS = {"integrity": "Integrity", "top1": "Top-1", "kld": "KLD ± error", "ppl": "PPL ± error"}


def _integrity(a: Judged) -> str:
    return "ok" if not a.integrity else f"{len(a.integrity)} mismatch" + ("es" if len(a.integrity) > 1 else "")


@dataclass(frozen=True)
class ArtifactRow:
    filename: str
    cells: list[Cell]
    failures: list[str]  # the bounds and checks it failed (its row is highlighted)
    integrity: list[str]
    smoke_reply: str | None
    smoke_reason: str | None


@dataclass(frozen=True)
class BuildView:
    name: str  # the page's name: the build folder's
    model: str
    source: str
    provenance: list[tuple[str, str]]
    headers: list[str]
    rows: list[ArtifactRow]
    others: list[str]  # artifacts that are not models (an importance matrix): name and size
    inversions: list[str]
    bounds: list[str]
    parity: list[str]
    changelog: list[str]
    plotted: bool  # whether any artifact has a KLD to plot

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r.failures)


def build_view(name: str, report: Report) -> BuildView:
    rows = []
    for a in report.models:
        e = a.evaluation
        cells = []
        for key, raw in TABLE:
            text = _integrity(a) if key == "integrity" else COLUMNS[key][2](a, e)
            bad = text in ("FAIL", "FAILED") or (key == "integrity" and bool(a.integrity))
            cells.append(Cell(public_text(text), raw(a, e) if raw else None, bad))
        rows.append(ArtifactRow(public_text(a.filename), cells, [public_text(f) for f in a.failures],
                                [public_text(m) for m in a.integrity],
                                public_text(e.smoke_reply) if e else None, public_text(e.smoke_reason) if e else None))
    s = report.source
    source = (f"{s.repo_id}@{(s.revision or '')[:12]}" if s.repo_id else "quantkit's bundled sample" if s.sample
              else "a local folder")
    ev = report.evaluation
    provenance = [("source", source), ("architecture", s.architecture), ("source dtype", s.dtype)]
    provenance += [(k, v) for k, v in (("licence", s.license), ("base model", s.base_model),
                                      ("converted first", s.converted)) if v]
    provenance += [("profile", report.profile), ("quantkit", report.quantkit_version or "—"),
                   ("evaluation", f"{ev.text}, {ev.tokens or '—'} tokens in windows of {ev.window}, {ev.method}"),
                   ("reference", ev.reference)]
    provenance += [(f"{fmt} tools", ", ".join(f"{t} {v}" for t, v in sorted(tools.items())))
                   for fmt, tools in sorted(report.tools.items())]
    return BuildView(
        name=name, model=public_text(report.model), source=public_text(source),
        provenance=[(k, public_text(str(v))) for k, v in provenance],
        headers=[HEADERS.get(k, COLUMNS.get(k, (k,))[0]) for k, _ in TABLE], rows=rows,
        others=[public_text(f"{a.filename} ({human_size(a.size_bytes)})") for a in report.artifacts
                if a not in report.models],
        inversions=[public_text(i) for i in report.inversions], bounds=[public_text(b) for b in report.bounds],
        parity=[public_text(f"{p.runtime}: " + ("agrees with the reference" if p.passed else p.problems()))
                for p in report.parity],
        changelog=[public_text(c) for c in report.changelog],
        plotted=any(a.evaluation and a.evaluation.kld_mean is not None for a in report.models))
