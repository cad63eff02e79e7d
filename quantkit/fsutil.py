"""File helpers: hashing with a stat cache, atomic writes, disk space."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from .errors import DiskSpaceError

PARTIAL_SUFFIX = ".partial"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def folder_digest(files) -> str:
    """A folder's hash: of its files' (relative name, sha256) pairs, in name order."""
    return sha256_text(*(f"{name}:{sha}" for name, sha in files))


class HashCache:
    """sha256 of files, re-read only when size or mtime changed (re-runs hash GBs otherwise). Files under `root`
    (the build folder) are cached by their path relative to it, so the folder can move; others by a hash of
    their absolute path, since the cache lives in the build folder, which must not name local paths."""

    def __init__(self, entries: dict | None = None, root: Path | None = None) -> None:
        self.entries: dict[str, list] = dict(entries or {})
        self.root = root.resolve() if root else None

    def sha256(self, path: Path) -> str:
        """A file's sha256; for a folder (GPTQ/AWQ variants), a hash of its files' names and hashes."""
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return folder_digest((p.relative_to(path).as_posix(), self.sha256(p)) for p in files)
        st = path.stat()
        key = self._key(path)
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def _key(self, path: Path) -> str:
        full = path.resolve()
        if self.root is not None and full.is_relative_to(self.root):
            return "./" + full.relative_to(self.root).as_posix()
        return hashlib.sha256(str(full).encode()).hexdigest()[:32]


def file_identity(path: Path, small: int = 16 << 20) -> str:
    """A cheap stand-in for a file's content, for caches outside the build folder: a file of the Hugging Face
    cache is named by its hash (the blob its snapshot links to), a small file is hashed, and a large local one
    is known by size and mtime. A fresh download of the same model therefore has the same identity."""
    target = path.resolve()
    st = target.stat()
    if target.parent.name == "blobs" and path.is_symlink():
        return f"{path.name}:{st.st_size}:blob {target.name}"
    if st.st_size <= small:
        return f"{path.name}:{st.st_size}:sha256 {sha256_file(target)}"
    return f"{path.name}:{st.st_size}:mtime {st.st_mtime_ns}"


def partial_path(final: Path) -> Path:
    """A name `final` is written under until it is complete, unique to this attempt (host, process and a random
    part): two attempts at one step (a Ray retry that overlaps its lost predecessor, still writing on a node that
    was only cut off) never write one file. remove_partials deletes what a killed run left."""
    attempt = f"{socket.gethostname().split('.')[0]}-{os.getpid()}-{secrets.token_hex(3)}"
    return final.with_name(f"{final.name}.{attempt}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Like atomic_path, for a folder: it appears under its final name only when complete."""
    tmp = partial_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def remove_partials(folder: Path) -> list[Path]:
    """Delete leftovers of an interrupted run (a kill -9 skips the cleanup in atomic_path)."""
    removed = []
    if folder.exists():
        for p in folder.rglob("*" + PARTIAL_SUFFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def drop_local_paths(path: Path) -> None:
    """Remove every value that is an absolute local path from a JSON file that gets published (tools
    record their temporary folders and calibration files in configs); a missing file is left alone."""
    if not path.exists():
        return

    def scrub(node):
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if not (isinstance(v, str) and re.match(r"^(/|[A-Za-z]:\\)", v))}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    write_text_atomic(path, json.dumps(scrub(json.loads(path.read_text())), indent=2) + "\n")


def check_free_space(folder: Path, needed: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk space in {folder}: {what} needs {human_size(needed)}, {human_size(free)} free",
            "free some space, or pass --out to a folder on a larger disk",
        )


def parse_scaled(value: object, units: str) -> int | None:
    """A number with an optional decimal suffix from `units` (each 1000 times the one before it):
    parse_scaled("1.5G", "KMGT") == 1_500_000_000. None if `value` is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(rf"\s*(\d+(?:\.\d+)?)\s*([{units}]?)\s*", str(value).upper())
    return int(float(m.group(1)) * 1000 ** (units.index(m.group(2)) + 1 if m.group(2) else 0)) if m else None


def parse_bytes(value: object) -> int | None:
    """'48G', '100M', '1.5GB' (decimal units) or a byte count; None if it is none of these."""
    return parse_scaled(str(value).upper().removesuffix("B") if not isinstance(value, int) else value, "KMGT")


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
