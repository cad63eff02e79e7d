"""Where quantkit keeps what it reuses across builds."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data"


def cache_dir() -> Path:
    """QUANTKIT_CACHE, else ~/.cache/quantkit: models, llama.cpp trees, environments."""
    return Path(os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit")


def state_dir() -> Path:
    """$XDG_STATE_HOME/quantkit (default ~/.local/state/quantkit): the job queue, job logs, crash logs. State to
    keep, not a cache to wipe."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "quantkit"
