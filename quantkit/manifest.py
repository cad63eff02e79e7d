"""The build folder's memory: which steps finished, from which inputs, with which outputs.

A step is done when its key (a hash of everything it was made from) matches and its output
file still has the recorded sha256. Anything else is redone, so editing or deleting a file in
the build folder is always safe.

Keys are made of content (hashes, versions, settings), never of paths, and files inside the build
folder are cached by their path relative to it: a folder moved or mounted elsewhere resumes as it was.
The file carries a schema version. A folder written by an older quantkit is read as it is: steps whose
keys this one makes differently are redone, the rest is kept. One written by a newer quantkit is refused,
rather than overwritten with what this one understands of it.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from .errors import BuildFolderError, QuantkitError
from .fsutil import HashCache, write_json_atomic

STATE_DIR = ".quantkit"
# 1: keys held the evaluation tokens' path and llama-cpp-python's version for every format; hashes were cached by
#    absolute path. 2: content-only keys with each format's own tools and inputs; hashes cached relative to the folder.
SCHEMA = 2


class Manifest:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.state_dir = out_dir / STATE_DIR
        self.path = self.state_dir / "manifest.json"
        try:
            data = json.loads(self.path.read_text()) if self.path.exists() else {"version": SCHEMA}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BuildFolderError(f"{self.path} is not a quantkit manifest ({e})",
                                f"delete {self.state_dir} to rebuild the folder from scratch, or use another --out") from e
        # A manifest from before versions were written is schema 1.
        self.schema = data.get("version", 1) if isinstance(data, dict) else 0
        if not isinstance(self.schema, int) or self.schema < 1:
            raise BuildFolderError(f"{self.path} is not a quantkit manifest", f"delete {self.state_dir}, or use another --out")
        if self.schema > SCHEMA:
            raise BuildFolderError(f"{out_dir} was built by a newer quantkit (manifest schema {self.schema}; this one "
                                f"reads up to {SCHEMA})", "upgrade quantkit, or build into another --out")
        self.steps: dict[str, dict[str, Any]] = data.get("steps", {})
        # sha256 of a file whose metadata `quantkit retemplate` rewrote -> the sha256 it was made with (its tensors,
        # which is what anything quantized from it depends on, are unchanged).
        self.retemplated: dict[str, str] = data.get("retemplated", {})
        # Schema 1 cached hashes by absolute path: none of its entries can match, so none are kept.
        self.hashes = HashCache(data.get("hashes") if self.schema == SCHEMA else None, root=out_dir)
        self._lock = None

    @property
    def upgraded(self) -> bool:
        """Written by an older quantkit: what it keyed differently is redone by this build."""
        return self.schema < SCHEMA

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

    def made_sha256(self, path: Path) -> str:
        """The hash a file had when it was made: its own, or for a file retemplate rewrote, the one before (what
        was quantized from it stays current)."""
        sha = self.sha256(path)
        return self.retemplated.get(sha, sha)

    def rewrote(self, step: str, path: Path, before: str) -> None:
        """Record that `step`'s output at `path` (sha256 `before`) got new metadata, with its tensors as they were:
        the step stays done with the new hash, and made_sha256 maps the new hash back."""
        after = self.sha256(path)
        self.retemplated[after] = self.retemplated.get(before, before)
        if step in self.steps:
            self.steps[step]["sha256"] = after
        self.save()

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"version": SCHEMA, "steps": self.steps, "hashes": self.hashes.entries,
                                      **({"retemplated": self.retemplated} if self.retemplated else {})})
