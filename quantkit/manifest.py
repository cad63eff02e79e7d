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
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import BuildFolderError, QuantkitError
from .fsutil import HashCache, partial_path, write_json_atomic

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
        # A build whose nodes share no filesystem (--store): its artifacts and the large files of its evaluation live
        # in the store at `store_url`, not here. `stored`: such a file's path relative to the folder -> its digest.
        self.store_url: str | None = data.get("store")
        self.stored: dict[str, str] = data.get("stored", {})
        self.store = None  # the ArtifactStore of store_url, once a command opens it (open_store)
        self.mirror: Callable[[Path], None] | None = None  # called with the manifest's path after each save
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
            if not self.present(output) or self.sha256(output) != rec.get("sha256"):
                return None
        return rec

    # Files in the store (a --store build)
    def open_store(self, url: str | None = None):
        """The build's ArtifactStore (`url`, or the one the folder was built with); None for a folder built
        without one. A folder built with one store is not carried on with another."""
        from .store import ArtifactStore

        url = url or self.store_url
        if self.store_url and url != self.store_url:
            raise BuildFolderError(f"{self.out_dir} keeps its artifacts in {self.store_url}, not {url}",
                                   f"pass --store {self.store_url}, or build into another --out")
        if url and self.store is None:
            self.store, self.store_url = ArtifactStore(url), url
        return self.store

    def _rel(self, path: Path) -> str | None:
        try:
            return path.absolute().relative_to(self.out_dir.absolute()).as_posix()
        except ValueError:
            return None

    def present(self, path: Path) -> bool:
        """Whether the build has `path`: here, or in its store."""
        if path.exists():
            return True
        digest = self.stored.get(self._rel(path) or "")
        return digest is not None and self.open_store() is not None and self.store.has(digest)

    def keep_stored(self, path: Path, digest: str) -> None:
        """`path` of the build folder is in the store, as `digest` (recorded with the next save)."""
        self.stored[self._rel(path)] = digest

    def stored_digest(self, path: Path) -> str | None:
        """The digest of `path` in the store, when the build has it there and not here."""
        return None if path.exists() else self.stored.get(self._rel(path) or "")

    def discard(self, path: Path) -> None:
        """Remove `path` (a file) from the build: here, and from what the build keeps in its store."""
        path.unlink(missing_ok=True)
        if self.stored.pop(self._rel(path) or "", None):
            self.save()

    def fetch_stored(self, log: Callable[[str], None]) -> list[Path]:
        """Copy every artifact the build keeps in its store into the folder (publish and retemplate need the bytes)."""
        from .store import NodeCache

        fetched = []
        for rel, digest in sorted(self.stored.items()):
            path = self.out_dir / rel
            if path.exists() or rel.startswith(STATE_DIR + "/"):
                continue
            log(f"fetching {rel} from {self.store_url}")
            tmp = partial_path(path)
            try:
                self.open_store().fetch(digest, tmp, NodeCache())
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            fetched.append(path)
        return fetched

    def record(self, step: str, key: str, output: Path | None = None, **extra: Any) -> dict[str, Any]:
        rec = {"key": key, **extra}
        if output is not None:
            rec["sha256"] = self.sha256(output)
        self.steps[step] = rec
        self.save()
        return rec

    def sha256(self, path: Path) -> str:
        return self.stored_digest(path) or self.hashes.sha256(path)

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
                                      **({"retemplated": self.retemplated} if self.retemplated else {}),
                                      **({"store": self.store_url, "stored": self.stored} if self.store_url else {})})
        if self.mirror:
            self.mirror(self.path)
