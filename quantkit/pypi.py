"""Fetch one distribution file from the package index with pip (the only network quantkit needs offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .procs import child_env


def pip_download(requirement: str, dest: Path, *, sdist: bool = False) -> Path | None:
    """Download `requirement` (no dependencies) into `dest`; return the file, or None if pip could not."""
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(dest)]
    if sdist:
        args[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(args, capture_output=True, text=True, env=child_env())  # pip needs no Hub token
    files = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz"))
    return files[0] if proc.returncode == 0 and files else None
