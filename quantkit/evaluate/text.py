"""The evaluation text: bundled, a local file, or a Hub dataset."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .. import network
from ..errors import ProfileError, SourceError
from ..paths import DATA_DIR

BUILTIN = {"botchan": DATA_DIR / "botchan-eval.txt"}
# Kept apart from evaluation: calibration (imatrix, GPTQ, AWQ) must never see the evaluation text.
CALIBRATION = {"botchan": DATA_DIR / "botchan-calibration.txt"}


@dataclass(frozen=True)
class Text:
    """A text as it was read: its content, and for a Hub dataset the commit it was read at."""

    content: str
    revision: str = ""  # hf: texts only

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()

    def identity(self) -> dict[str, str]:
        """What a resume key needs of it: the content's hash, and the dataset commit it came from."""
        return {"sha256": self.sha256, **({"revision": self.revision} if self.revision else {})}


def load_text(spec: str) -> str:
    """`builtin:NAME`, a path to a UTF-8 text file, or `hf:ORG/DATASET[:split[:column]]`."""
    return read_text(spec).content


def read_text(spec: str) -> Text:
    """load_text, with the Hub dataset's commit."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ProfileError(f"unknown built-in evaluation text {name!r}", f"use one of: {', '.join(BUILTIN)}")
        return Text(BUILTIN[name].read_text(encoding="utf-8"))
    if spec.startswith("hf:"):
        return _hub_text(spec[3:])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ProfileError(f"evaluation text {spec!r} not found", "give builtin:botchan, a text file, or hf:ORG/DATASET")
    try:
        return Text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path} is not UTF-8 text", "convert it to UTF-8") from e


def calibration_text(spec: str, evaluation_spec: str) -> str:
    """The calibration text (imatrix, GPTQ, AWQ): `builtin:NAME` is the calibration half of a bundled
    text, anything else loads as load_text does. Refused when it contains the evaluation text, which
    would make the evaluation measure what calibration was tuned on."""
    return read_calibration(spec, evaluation_spec).content


def calibration_identity(spec: str, evaluation_spec: str) -> dict[str, str]:
    """The calibration text as an artifact's resume key sees it: {"calibration_sha256", "calibration_revision"}.
    Editing the file, or a new commit of the dataset, remakes what was calibrated on it."""
    return {f"calibration_{k}": v for k, v in read_calibration(spec, evaluation_spec).identity().items()}


def read_calibration(spec: str, evaluation_spec: str) -> Text:
    """calibration_text, with the Hub dataset's commit."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in CALIBRATION:
            raise ProfileError(f"unknown built-in calibration text {name!r}", f"use one of: {', '.join(CALIBRATION)}")
        read = Text(CALIBRATION[name].read_text(encoding="utf-8"))
    else:
        read = read_text(spec)
    text = read.content
    evaluation = load_text(evaluation_spec)
    # 40 passages of 200 characters spread over the evaluation text: any of them verbatim means overlap.
    step = max(1, (len(evaluation) - 200) // 40)
    probes = [evaluation[i:i + 200] for i in range(0, max(1, len(evaluation) - 200), step)][:40]
    if any(len(p) == 200 and p in text for p in probes):
        raise ProfileError(f"the calibration text {spec} contains parts of the evaluation text {evaluation_spec}",
                           "calibrate on other text than you evaluate on (the built-in texts are disjoint halves)")
    return read


def _hub_text(spec: str) -> Text:
    """Text, JSON-lines or parquet files of a dataset repo, joined; `column` picks the field (default: text)."""
    from huggingface_hub import snapshot_download

    repo, split, column = (spec.split(":") + [None, None])[:3]
    column = column or "text"
    try:
        # A cached copy is used when the Hub cannot be reached (huggingface_hub's own fallback).
        folder = Path(network.retrying(lambda: snapshot_download(repo, repo_type="dataset",
                                                                 allow_patterns=["*.txt", "*.jsonl", "*.parquet"]),
                                       what=f"downloading dataset {repo}"))
    except network.GaveUp as e:
        raise SourceError(f"cannot download dataset {repo}: {network.outage(e)}",
                          "run the same command again later, or use a local text file", retryable=True) from e
    except Exception as e:  # huggingface_hub raises many types; all mean "not available"
        raise SourceError(f"cannot download dataset {repo}: {network.short(e)}", "check the name and HF_TOKEN") from e
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (not split or split in p.as_posix()))
    parts: list[str] = []
    for p in files:
        if p.suffix == ".txt":
            parts.append(p.read_text(encoding="utf-8"))
        elif p.suffix == ".jsonl":
            parts += [json.loads(l).get(column, "") for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
        elif p.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise SourceError(f"dataset {repo} is parquet", "pip install pyarrow, or use a text file") from e
            parts += [str(v) for v in pq.read_table(p, columns=[column]).column(column).to_pylist() if v]
    text = "\n\n".join(t for t in parts if t)
    if not text:
        raise SourceError(f"dataset {repo} has no {column!r} text in .txt/.jsonl/.parquet files", "pick another column or split")
    # huggingface_hub names each snapshot folder of its cache after the commit it holds.
    return Text(text, revision=folder.name)
