"""How a command ends when it fails: one line of cause and one of fix on stderr, the exit code, a status file
for the worker that ran it, and for an unexpected exception a log file with its traceback."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from .paths import state_dir

# A worker points this at a file of its own; the build child writes how it ended there (see jobs/worker.py).
STATUS_ENV = "QUANTKIT_STATUS_FILE"


@dataclass(frozen=True)
class Status:
    exit_code: int
    error: str
    hint: str = ""
    retryable: bool = False  # the same command may succeed later unchanged: the network failed


def fail(status: Status) -> None:
    print(f"error: {status.error}", file=sys.stderr)
    if status.hint:
        print(f"  fix: {status.hint}", file=sys.stderr)
    if path := os.environ.get(STATUS_ENV):
        try:
            Path(path).write_text(json.dumps(asdict(status)))
        except OSError:
            pass  # the worker falls back to the log's "error:" line
    sys.exit(status.exit_code)


def read_status(path: Path) -> Status | None:
    try:
        return Status(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def crash_log(exc: BaseException) -> Path:
    """Write the traceback of an unexpected exception to a file of its own and return its path (in the state
    folder, else the temporary folder when that cannot be written)."""
    text = (f"quantkit {' '.join(sys.argv[1:])}\n{time.strftime('%Y-%m-%d %H:%M:%S')}, Python {sys.version.split()[0]}\n\n"
            + "".join(traceback.format_exception(exc)))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (state_dir() / "crashes", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    raise exc  # nowhere to write: the traceback goes to stderr after all
