"""A build's artifact store: where its artifacts, and the large files of its evaluation, live when the nodes of a Ray
cluster share no filesystem (`quantkit build --ray ADDRESS --store URL`). Any fsspec URL: `file:///mnt/store`,
`s3://bucket/prefix`, `gs://...` (s3fs, gcsfs: installed for the URL, fsspec finds them); quantkit writes no
storage client of its own. fsspec comes with huggingface_hub, a dependency of quantkit.

Under the URL:
  objects/SHA256          one file's bytes, named by their sha256
  trees/DIGEST.json       an artifact, a file or a folder: {"name", "files": [{"path", "sha256", "size"}]}, named by
                          the digest a build folder's manifest records for it (fsutil.HashCache: a file's sha256, a
                          folder's folder_digest of its files)
  builds/NAME/PATH        a build's manifest and reports, mirrored after each change, so that another coordinator
                          can resume the build from the store alone

Nothing half-written is ever seen under a final name: every object is uploaded under a name of its own and then
moved to its final one (a rename on a POSIX store; on an object store, an object appears whole when its upload
completes), and a tree is written after all its objects, so a tree that exists names only complete objects.
Objects are never rewritten: the same name always holds the same bytes.

NodeCache is the other end: a node's local, content-addressed copy of what its tasks fetched, shared by them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import QuantkitError, ToolError
from .fsutil import HashCache, atomic_path, folder_digest, sha256_file
from .paths import cache_dir


@dataclass(frozen=True)
class Ref:
    """An artifact (or state file) in the store: its digest, its size in bytes and its name in a build folder."""

    digest: str
    size: int
    name: str


class ArtifactStore:
    def __init__(self, url: str) -> None:
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing (s3fs for s3://)
            raise QuantkitError(f"cannot use the store {url}: {e}",
                                "pass an fsspec URL (file:///path, s3://bucket/prefix) and install its package") from e
        self.url = url
        self.root = self.root.rstrip("/")

    def _at(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _upload(self, local: Path, final: str) -> None:
        tmp = f"{final}.{secrets.token_hex(6)}.partial"
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, final)

    def _write(self, final: str, data: bytes) -> None:
        tmp = f"{final}.{secrets.token_hex(6)}.partial"
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    def has(self, digest: str) -> bool:
        return self.fs.exists(self._at("trees", f"{digest}.json"))

    def put(self, local: Path, hashes: HashCache | None = None) -> Ref:
        """Upload a file or a folder (each of its files an object, unless the store has it already). `hashes`: the
        build's hash cache, so that a file it hashed (a local source of 93 GB, for its key) is not read again."""
        if local.is_dir():
            files = sorted((p.relative_to(local).as_posix(), p) for p in local.rglob("*") if p.is_file())
        else:
            files = [("", local)]
        entries = []
        for rel, path in files:
            sha, size = hashes.sha256(path) if hashes else sha256_file(path), path.stat().st_size
            if not self.fs.exists(self._at("objects", sha)):
                self._upload(path, self._at("objects", sha))
            entries.append({"path": rel, "sha256": sha, "size": size})
        digest = folder_digest((e["path"], e["sha256"]) for e in entries) if local.is_dir() else entries[0]["sha256"]
        if not self.has(digest):
            self._write(self._at("trees", f"{digest}.json"), json.dumps({"name": local.name, "files": entries}).encode())
        return Ref(digest, sum(e["size"] for e in entries), local.name)

    def tree(self, digest: str) -> dict:
        try:
            return json.loads(self.fs.cat_file(self._at("trees", f"{digest}.json")))
        except FileNotFoundError:
            raise ToolError(f"the store {self.url} has no artifact {digest[:16]}",
                            "it was deleted from the store: build again to make it") from None

    def fetch(self, digest: str, dest: Path, cache: "NodeCache") -> Path:
        """The artifact `digest` at `dest` (a file, or a folder), its files hard links into `cache` (copies where
        the cache is on another filesystem). Readers only: a step must not change what it reads."""
        tree = self.tree(digest)
        folder = not (len(tree["files"]) == 1 and tree["files"][0]["path"] == "")
        for entry in tree["files"]:
            blob = cache.blob(entry["sha256"], entry["size"],
                              lambda tmp, sha=entry["sha256"]: self.fs.get_file(self._at("objects", sha), str(tmp)))
            target = dest / entry["path"] if folder else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(blob, target)
            except OSError:
                shutil.copyfile(blob, target)
        if folder:
            dest.mkdir(parents=True, exist_ok=True)  # an empty folder is an artifact too
        return dest

    # A build's own files (manifest, reports): mutable names, mirrored for another coordinator.
    def put_state(self, build: str, rel: str, local: Path) -> None:
        self._upload(local, self._at("builds", build, rel))

    def get_state(self, build: str, rel: str, local: Path) -> bool:
        """Copy builds/BUILD/REL to `local` (atomically); False when the store has none."""
        source = self._at("builds", build, rel)
        if not self.fs.exists(source):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local) as tmp:
            self.fs.get_file(source, str(tmp))
        return True


class NodeCache:
    """A node's content-addressed cache (QUANTKIT_NODE_CACHE, else QUANTKIT_CACHE/node): blobs/SHA256, each fetched
    once, under a lock, checked and moved into place whole, shared by every task on the node; and the tasks'
    work folders, each unique and removed when its task ends."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(os.environ.get("QUANTKIT_NODE_CACHE") or cache_dir() / "node")

    def blob(self, sha256: str, size: int, fetch: Callable[[Path], None]) -> Path:
        from filelock import FileLock

        final = self.root / "blobs" / sha256
        if final.is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if not final.is_file():
                with atomic_path(final) as tmp:
                    fetch(tmp)
                    if tmp.stat().st_size != size or sha256_file(tmp) != sha256:
                        raise ToolError(f"the store's object {sha256[:16]} does not have the bytes its name says",
                                        "the store is damaged: delete that object and build again")
        return final

    def work_folder(self) -> Path:
        path = self.root / "work" / f"{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir(parents=True)
        return path
