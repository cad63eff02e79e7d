"""Large files of a Hub snapshot, fetched so that a download cut off in one run resumes in the next.

huggingface_hub 2.x resumes a cut transfer only within the call that started it: on failure it deletes its
partial file (huggingface_hub#4228), so a 14 GB shard cut at 13 GB is fetched again from its first byte by the
next run. quantkit fetches the large LFS files itself first, with HTTP ranges, keeping the part it has in
blobs/<sha256>.quantkit-partial (under a lock), and moves each into the cache as the blob huggingface_hub names by
its sha256 once the hash matches. snapshot_download then finds the blobs and only links them. Files stored on Xet
are left to huggingface_hub, when hf_xet is there to fetch them: Xet keeps the chunks it has in its own cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import network
from .errors import SourceError
from .fsutil import sha256_file

LARGE = 16 << 20  # smaller files are cheap to fetch again
_SHA256 = re.compile(r"[0-9a-f]{64}")


def prefetch(repo_id: str, commit: str, patterns: list[str], blobs: Path) -> None:
    """Fetch into `blobs` the large files of `commit` that match `patterns` and are not there yet."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    xet = not constants.HF_HUB_DISABLE_XET and _has_hf_xet()
    entries = [e for e in HfApi().list_repo_tree(repo_id, revision=commit, recursive=True)
               if isinstance(e, RepoFile) and e.lfs is not None and e.size >= LARGE and not (xet and e.xet_hash)]
    for e in filter_repo_objects(entries, allow_patterns=patterns, key=lambda e: e.path):
        check_blob_name(repo_id, e.path, e.lfs.sha256)
        if not (blobs / e.lfs.sha256).exists():
            _fetch(repo_id, commit, e.path, e.size, e.lfs.sha256, blobs)


def check_blob_name(repo_id: str, path: str, sha256: object) -> str:
    """The Hub's sha256 of a file, which names its blob (and part) in the cache: refused unless it is one, since a
    name such as "../../x" from a tampered listing would make the download write outside the cache."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise SourceError(f"the Hub's listing of {repo_id} gives {path[:200]!r} the LFS sha256 {str(sha256)[:80]!r}, which "
                          "is not a sha256 (64 lowercase hex digits)",
                          "check HF_ENDPOINT: the server there does not answer as the Hub does")
    return sha256


def _has_hf_xet() -> bool:
    import importlib.util

    return importlib.util.find_spec("hf_xet") is not None


def _fetch(repo_id: str, commit: str, path: str, size: int, sha256: str, blobs: Path) -> None:
    from filelock import FileLock
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, tqdm

    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / f"{sha256}.quantkit-partial"
    with FileLock(str(partial) + ".lock"):  # two builds of one model must not append to one file
        have = partial.stat().st_size if partial.exists() else 0
        if have < size:
            headers = build_hf_headers()
            if have:
                headers["Range"] = f"bytes={have}-"
            with get_session().stream("GET", hf_hub_url(repo_id, path, revision=commit), headers=headers,
                                      timeout=network.timeout_s(), follow_redirects=True) as r:
                hf_raise_for_status(r)
                if have and r.status_code != 206:  # the server ignored the range: start over
                    have = 0
                with open(partial, "ab" if have else "wb") as f, \
                        tqdm(total=size, initial=have, unit="B", unit_scale=True, desc=path,
                             name="huggingface_hub.http_get") as bar:
                    for chunk in r.iter_bytes():  # as it arrives: a cut loses nothing already received
                        f.write(chunk)
                        bar.update(len(chunk))
        # The whole file against the Hub's sha256: parts from two runs are joined here, so prove the join.
        if partial.stat().st_size != size or sha256_file(partial) != sha256:
            partial.unlink()
            raise SourceError(f"{repo_id}/{path} arrived corrupt (its sha256 is not the Hub's)",
                              "run the same command again: the file is fetched anew", retryable=True)
        partial.replace(blobs / sha256)
