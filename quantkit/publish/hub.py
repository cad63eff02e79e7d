"""Push a build to the Hub: plan the commits, then make only the ones that change something.

The Hub makes a commit atomic: large files are uploaded first (LFS/Xet), then one commit names
them all, so a failure anywhere before the commit leaves the repo at its previous head. Every
attempt re-reads the remote state first, which makes retries safe: if a commit went through but
its answer was lost, the next attempt finds nothing to change and makes no commit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import network
from ..errors import QuantkitError
from ..results import Judged, Report, models
from ..fsutil import folder_digest, human_size, sha256_file, write_text_atomic
from ..profiles import PublishOptions
from ..progress import Reporter
from .. import formats
from .card import PLOT, model_card
from .plot import size_vs_kld


class PublishError(QuantkitError):
    exit_code = 8


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    local_path: Path
    size: int
    sha256: str


@dataclass
class RepoCommit:
    repo_id: str
    branch: str
    private: bool
    files: list[UploadFile]
    message: str

    def render(self) -> str:
        lines = [f"repo {self.repo_id} (branch {self.branch}{', private' if self.private else ''}): {self.message}"]
        lines += [f"  {f.path_in_repo:52} {human_size(f.size):>10}  sha256 {f.sha256[:16]}" for f in self.files]
        lines.append(f"  total {human_size(sum(f.size for f in self.files))} in {len(self.files)} files")
        return "\n".join(lines)


@dataclass
class PublishResult:
    repo_id: str
    branch: str
    commit: str | None  # the new head; None when the repo was already up to date
    head: str
    changed: list[str] = field(default_factory=list)


def hub_token() -> str | None:
    """HF_TOKEN, else the token stored by `hf auth login`. Never printed or written anywhere."""
    from huggingface_hub import get_token

    return get_token()


def folder_files(folder: Path, prefix: str = "") -> list[UploadFile]:
    """Every file under `folder` (a variant's folder for a branch), with sizes and hashes."""
    return [UploadFile(prefix + p.relative_to(folder).as_posix(), p, p.stat().st_size, sha256_file(p))
            for p in sorted(folder.rglob("*")) if p.is_file()]


def _fetch_stored(build_dir: Path) -> None:
    """A build whose artifacts are in its artifact store (a --store build): fetched here first; publishing needs
    the bytes, and checks them as it checks any file."""
    from ..manifest import Manifest
    from ..progress import Reporter

    manifest = Manifest(build_dir)
    if manifest.stored:
        manifest.fetch_stored(Reporter().info)


def plan_publish(build_dir: Path, *, owner: str | None = None, token: str | None = None,
                 offline: bool = False, allow_failed: bool = False) -> list[RepoCommit]:
    """Write each repo's card and plot into BUILD/publish/ and list the commits, as each format lays out its
    repos (Card.layout): GGUF files on main; GPTQ/AWQ/EXL2 variants on a branch each, with the card on main. No network unless the
    owner must be asked of the Hub. A build with failed checks is refused unless `allow_failed`; the
    card then marks the files that failed. Before any of that, every name the report gives must be a plain file
    name, and every file must have the report's size and sha256 and lie inside the build folder."""
    build_dir = build_dir.absolute()
    report_path = build_dir / "report.json"
    if not report_path.is_file():
        raise PublishError(f"{build_dir} has no report.json", "run quantkit build first, and pass its build folder")
    report = Report.read(report_path)  # BuildFolderError: written by a newer quantkit, or damaged
    _fetch_stored(build_dir)
    _check_names(report)
    if not report.evaluation.reference_result:
        raise PublishError(f"{build_dir.name} was built with evaluation off, so none of its files was measured",
                           "quantkit publishes only measured files: build it again with evaluation on, on a machine "
                           "large enough for the reference (quantkit plan shows what each step needs)")
    if (failed := report.failed) and not allow_failed:
        raise PublishError(f"{len(failed)} file(s) of {build_dir.name} failed their checks: "
                           + "; ".join(f"{a.filename}: {a.failures[0]}" for a in failed),
                           "fix the build (see report.md, Failed checks), or pass --allow-failed to publish them "
                           "marked as failed in the card")
    # Every file checked against the report before anything else (the owner's lookup included): the card states
    # these hashes, and only these bytes may go up.
    verified = {a.filename: _artifact_files(build_dir, a) for a in report.artifacts}
    opts = report.publish
    owner = owner or opts.owner
    if not owner:
        if offline:
            raise PublishError("--dry-run needs to know the owner without asking the Hub", "pass --owner NAME")
        owner = _whoami(token)
    quantized_by = opts.quantized_by or owner
    commits = []
    for name in dict.fromkeys(a.backend for a in report.artifacts):
        fmt = formats.get(name)
        arts = [a for a in report.artifacts if a.backend == name]
        pattern = fmt.card.repo if fmt.card.repo and opts.repo == PublishOptions().repo else opts.repo
        message = f"quantkit: {report.model} {fmt.card.display}"
        if fmt.card.layout == "repos":  # a repo per variant, its folder on main (mlx-community's way)
            if "{variant}" not in pattern:
                pattern += "-{variant}"
            for a in models(arts):
                repo_id = _repo_id(pattern, owner, report, fmt, a.variant)
                card = _stage(build_dir, f"{name}-{a.variant}", replace(report, artifacts=[a]), repo_id, fmt,
                              quantized_by)
                commits.append(RepoCommit(repo_id, "main", opts.private, card + verified[a.filename],
                                          f"{message} {a.variant}"))
            continue
        repo_id = _repo_id(pattern, owner, report, fmt)
        card = _stage(build_dir, name, replace(report, artifacts=arts), repo_id, fmt, quantized_by)
        if fmt.card.layout == "files":
            files = list(card)
            for a in arts:  # a file, or a folder of shards that keeps its name in the repo
                files += _named(build_dir, a, verified[a.filename])
            commits.append(RepoCommit(repo_id, "main", opts.private, files, message))
        else:  # main: the card and auxiliary files (exl2's measurement); a branch per variant
            aux = [f for a in arts if not a.is_model for f in _named(build_dir, a, verified[a.filename])]
            commits.append(RepoCommit(repo_id, "main", opts.private, card + aux, message + " (card)"))
            commits += [RepoCommit(repo_id, a.variant, opts.private, verified[a.filename],
                                   f"{message} {a.variant}") for a in models(arts)]
    return commits


def _repo_id(pattern: str, owner: str, report: Report, fmt, variant: str = "") -> str:
    repo_id = pattern.format(owner=owner, model=report.model, format=fmt.card.display, variant=variant)
    _check_repo_id(repo_id)
    return repo_id


# Where report.json names a file, a folder, a branch or a repo: each must be one plain name, since the report may sit
# on shared storage, and "../../.ssh/id_rsa" there would otherwise be read and uploaded.
_NAMED = ("filename", "variant", "backend")


def _check_names(report: Report) -> None:
    for i, a in enumerate(report.artifacts):
        for key in _NAMED:
            value = getattr(a, key)
            if not _plain_name(value):
                raise PublishError(f"report.json's artifacts[{i}].{key} is {str(value)[:120]!r}, which is not a plain "
                                   "file name in the build folder",
                                   "report.json was edited or damaged: re-run the same quantkit build command, which "
                                   "writes it anew, then publish")


def _plain_name(name: object) -> bool:
    """One path component: not empty, not "." or "..", no separator of any platform, no control character (NUL and
    newlines included: the names also go into the card's text and commands)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\")
            and not any(ord(c) < 32 or ord(c) == 127 for c in name))


def _artifact_files(build_dir: Path, a: Judged) -> list[UploadFile]:
    """The files of one artifact (names relative to a folder artifact), each hashed once here, checked against the
    report; publish hands these hashes to huggingface_hub, which therefore does not read the files again to hash
    them."""
    path = build_dir / a.filename
    stale = "re-run the same quantkit build command: it remakes what changed and writes the report anew"
    if not path.exists():
        raise PublishError(f"{a.filename} is missing since the report was written", stale)
    _inside(build_dir, path, a.filename)
    if path.is_file() and path.stat().st_size != a.size_bytes:
        raise PublishError(f"{a.filename} changed since the report was written: its size is {path.stat().st_size}, "
                           f"the report's {a.size_bytes}", stale)
    if path.is_dir():
        files = folder_files(path)
        for f in files:
            _inside(build_dir, f.local_path, f"{a.filename}/{f.path_in_repo}")
        # A folder has no single file hash: the report's sha256 of it is the build's hash of its files' relative
        # names and sha256s (fsutil.HashCache.sha256), remade here from the hashes just taken. It checks every file's
        # bytes, and that no file was added, removed or renamed.
        digest = folder_digest((f.path_in_repo, f.sha256) for f in files)  # in folder_files's order, as HashCache
    else:
        digest = sha256_file(path)
        files = [UploadFile(a.filename, path, path.stat().st_size, digest)]
    if digest != a.sha256:
        raise PublishError(f"{a.filename} changed since the report was written: its sha256 is {digest[:16]}…, "
                           f"the report's {str(a.sha256)[:16]}…", stale)
    return files


def _inside(build_dir: Path, path: Path, name: str) -> None:
    """A link in the build folder must not make publish read (or the card overwrite) a file outside it."""
    if not path.resolve().is_relative_to(build_dir.resolve()):
        raise PublishError(f"{name} in {build_dir.name} is a link to a file outside the build folder",
                           "replace the link by the file itself, or re-run the same quantkit build command")


def _named(build_dir: Path, a: Judged, files: list[UploadFile]) -> list[UploadFile]:
    """An artifact's files as they go into a repo beside other artifacts: a folder keeps its name there."""
    if [f.local_path for f in files] == [build_dir / a.filename]:  # a file
        return files
    return [replace(f, path_in_repo=f"{a.filename}/{f.path_in_repo}") for f in files]


def _stage(build_dir: Path, name: str, report: Report, repo_id: str, fmt, quantized_by: str) -> list[UploadFile]:
    """The card and plot of one repo, written into BUILD/publish/<name>/: only those two files are uploaded, never
    anything else found there."""
    stage = build_dir / "publish" / name
    _inside(build_dir, stage, f"publish/{name}")
    stage.mkdir(parents=True, exist_ok=True)
    card, plot = stage / "README.md", stage / PLOT
    write_text_atomic(card, str(model_card(report, repo_id, fmt, quantized_by)))
    plot.unlink(missing_ok=True)  # the plot is written in place: never through a link left there
    size_vs_kld(report, plot)
    return [UploadFile(p.name, p, p.stat().st_size, sha256_file(p)) for p in (card, plot)]


def publish(commits: list[RepoCommit], *, token: str | None = None, reporter: Reporter | None = None,
            attempts: int = 5, backoff_s: float | None = None, api=None) -> list[PublishResult]:
    """`api`: an HfApi to use (its endpoint and token); by default one from HF_ENDPOINT and the token."""
    reporter = reporter or Reporter()
    token = token or hub_token()
    if not token:
        raise PublishError("no Hub token", "set HF_TOKEN, or run `hf auth login`")
    if network.offline_mode():
        raise PublishError("publishing needs the Hub, and HF_HUB_OFFLINE is set",
                           "unset HF_HUB_OFFLINE (quantkit publish --dry-run shows the plan offline)")
    backoff_s = network.backoff_s() if backoff_s is None else backoff_s
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    results = []
    for c in commits:
        reporter.info(f"publishing {c.repo_id} ({human_size(sum(f.size for f in c.files))})")
        _retrying(lambda: api.create_repo(c.repo_id, private=c.private, exist_ok=True), attempts, backoff_s, reporter)
        if c.branch != "main":
            # A branch per variant (GPTQ, AWQ, EXL2), made from main, which holds the card.
            _retrying(lambda: api.create_branch(c.repo_id, branch=c.branch, exist_ok=True), attempts, backoff_s, reporter)
        results.append(_retrying(lambda: _commit(api, c, reporter), attempts, backoff_s, reporter))
    return results


def _commit(api, c: RepoCommit, reporter: Reporter) -> PublishResult:
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.hf_api import RepoFile

    head = api.model_info(c.repo_id, revision=c.branch).sha
    remote = {e.path: e for e in api.list_repo_tree(c.repo_id, revision=c.branch, recursive=True) if isinstance(e, RepoFile)}
    changed = [f for f in c.files if not _same(remote.get(f.path_in_repo), f)]
    if not changed:
        reporter.info(f"✓ {c.repo_id}@{c.branch} is up to date ({head[:12]}); no commit")
        return PublishResult(c.repo_id, c.branch, None, head)
    ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local_path)) for f in changed]
    for op, f in zip(ops, changed):
        # The hash plan_publish checked against the report, so that huggingface_hub does not read every file a
        # second time to make its own.
        op.upload_info.sha256 = bytes.fromhex(f.sha256)
    # parent_commit: if someone else pushed since we looked, the Hub refuses instead of mixing the two.
    info = api.create_commit(c.repo_id, operations=ops, commit_message=c.message, revision=c.branch, parent_commit=head)
    reporter.info(f"✓ {c.repo_id}@{c.branch}: {len(changed)} file(s) in commit {info.oid[:12]}")
    return PublishResult(c.repo_id, c.branch, info.oid, info.oid, [f.path_in_repo for f in changed])


def _same(remote, f: UploadFile) -> bool:
    if remote is None or remote.size != f.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == f.sha256
    return remote.blob_id == _git_blob_sha1(f.local_path)


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()  # only small, regular (non-LFS) files get here
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _retrying(fn: Callable, attempts: int, backoff_s: float, reporter: Reporter):
    try:
        return network.retrying(fn, what="the Hub", attempts=attempts, backoff=backoff_s, log=reporter.warn)
    except network.GaveUp as e:
        raise PublishError(f"the Hub kept failing after {attempts} attempts: {network.short(e.last)}",
                           "the repo is unchanged; run the same command again later", retryable=True) from e
    except Exception as e:
        if (err := _explain(e)) is e:
            raise
        raise err from e


def _explain(e: Exception) -> Exception:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status == 401:
        return PublishError("the Hub rejected the token (401)", "set HF_TOKEN to a valid token with write access")
    if isinstance(e, HfHubHTTPError) and status == 403:
        return PublishError(f"the token may not write there (403): {network.short(e)}",
                            "use a token with write access to that user or organisation, or change --owner")
    if isinstance(e, HfHubHTTPError) and status == 412:
        return PublishError("the repo changed while publishing (412)", "run the same command again")
    return e


def _whoami(token: str | None) -> str:
    token = token or hub_token()
    if not token:
        raise PublishError("cannot tell the repo owner: no --owner and no Hub token",
                           "pass --owner NAME (and set HF_TOKEN to upload)")
    if network.offline_mode():
        raise PublishError("cannot ask the Hub who owns the token: HF_HUB_OFFLINE is set",
                           "pass --owner NAME, or unset HF_HUB_OFFLINE")
    from huggingface_hub import HfApi

    return _retrying(lambda: HfApi(token=token).whoami()["name"], 5, network.backoff_s(), Reporter())


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f"invalid repo name {repo_id!r}", "check publish.repo in the profile and --owner") from e
    if repo_id.count("/") != 1:
        raise PublishError(f"invalid repo name {repo_id!r}: it must be OWNER/NAME", "check publish.repo and --owner")
