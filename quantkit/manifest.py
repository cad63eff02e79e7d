"""The build folder's memory: which steps finished, from which inputs, with which outputs.

A step is done when its key (a hash of everything it was made from) matches and its output
file still has the recorded sha256. Anything else is redone, so editing or deleting a file in
the build folder is always safe.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from .errors import QuantkitError
from .fsutil import HashCache, write_json_atomic

STATE_DIR = ".quantkit"


class Manifest:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.state_dir = out_dir / STATE_DIR
        self.path = self.state_dir / "manifest.json"
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.steps: dict[str, dict[str, Any]] = data.get("steps", {})
        self.hashes = HashCache(data.get("hashes"))
        self._lock = None

    def lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.state_dir / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantkitError(f"another quantkit build is running in {self.out_dir}",
                                "wait for it to finish, or use another --out") from None

    def done(self, step: str, key: str, output: Path | None = None) -> dict[str, Any] | None:
        rec = self.steps.get(step)
        if not rec or rec.get("key") != key:
            return None
        if output is not None:
            if not output.exists() or self.hashes.sha256(output) != rec.get("sha256"):
                return None
        return rec

    def record(self, step: str, key: str, output: Path | None = None, **extra: Any) -> dict[str, Any]:
        rec = {"key": key, **extra}
        if output is not None:
            rec["sha256"] = self.hashes.sha256(output)
        self.steps[step] = rec
        self.save()
        return rec

    def sha256(self, path: Path) -> str:
        return self.hashes.sha256(path)

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"version": 1, "steps": self.steps, "hashes": self.hashes.entries})
