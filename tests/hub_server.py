"""A small, real HTTP stand-in for the Hugging Face Hub, for tests that drive the real `huggingface_hub` client.

Standard library only. It speaks the subset of the Hub HTTP API that `huggingface_hub` 2.4 uses to create repos and
branches, commit (regular files inline, large/binary files through plain git-LFS "basic" PUT uploads), list and
download. Repos live on disk under `root`; every commit is an immutable JSON file naming its parent and the full
file map; file contents are content-addressed by sha256.

Xet: the 2.4 client decides Xet vs LFS *by itself* for uploads: when `hf_xet` is importable and HF_HUB_DISABLE_XET is
unset, `create_commit`/`upload_folder` go straight to Xet (`/api/{type}s/{repo}/xet-write-token/{rev}`) without asking
the server. So clients of this server must run with HF_HUB_DISABLE_XET=1 (see `client_env` / `isolate_client`).
For downloads the client only uses Xet when a response carries `X-Xet-Hash` (or a tree entry has `xetHash`); this
server never sends those. The xet token endpoints answer 400 with a clear message so a misconfigured client fails
fast instead of retrying.

Usage (see tests/test_hub_server.py for a full fixture):

    server = HubServer(tmp_path / "hub", {"tok-alice": {"alice"}, "tok-admin": None, "tok-read": set()})
    endpoint = server.start()          # http://127.0.0.1:PORT
    HfApi(endpoint=endpoint, token="tok-alice").create_repo("alice/m")
    server.fail_next("POST", r"/commit/", status=500)
    server.drop_next("PUT", r"^/_lfs/")
    server.hold_next("PUT", r"^/_lfs/", seconds=60)   # a stalled upload; returns an Event set when it stalls
    server.cut_next("GET", r"/resolve/", after_bytes=4096)  # a download cut off mid-file
    server.rewrite_next("GET", r"/tree/", b"old", b"new")   # a tampered answer
    server.requests                    # [Logged(method, path, status, sent, range), ...]; status 0 = connection dropped
    server.stop()

Request bodies and served files are held in memory: fine for test files of tens of MB, not for real checkpoints.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote

# The Hub's preupload rule: a file goes through LFS when it is big, binary, or matched by an LFS pattern of the
# repo's .gitattributes. 10 MiB is the Hub's documented limit for regular (inline, base64) files.
LFS_THRESHOLD = 10 * 1024 * 1024

# A new Hub repo starts with an "initial commit" holding a .gitattributes like this one (abridged).
DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in ("*.7z", "*.bin", "*.ckpt", "*.gguf", "*.gz", "*.h5", "*.model", "*.msgpack", "*.npy", "*.npz",
              "*.onnx", "*.parquet", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar", "*.zip",
              "*.zst", "*tfevents*")
)

_API = r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_GIT = r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects"
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


class Logged(NamedTuple):
    method: str
    path: str  # without the query string, still percent-encoded as sent
    status: int  # 0 when the connection was dropped without an answer
    sent: int = 0  # bytes of body sent (less than promised when cut off)
    range: str = ""  # the Range header the client sent: how a resumed download asks for the rest


class HubError(Exception):
    """An error answered the way the Hub does: status, `X-Error-Code`, `X-Error-Message` and {"error": ...}."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_sha1(data: bytes) -> str:
    """git's object id for a blob: the client compares it with its local file to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _product(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _front_matter(card: str) -> dict:
    """The YAML header of a model card, for the flat keys and lists that model cards use (stdlib only)."""
    if not card.startswith("---\n") or "\n---" not in card[3:]:
        return {}
    data: dict = {}
    key = None
    for line in card[4:card.index("\n---", 3)].splitlines():
        if line.startswith("- ") and key:
            data.setdefault(key, []).append(line[2:].strip().strip("'\""))
        elif ":" in line and not line.startswith(" "):
            key, value = (part.strip() for part in line.split(":", 1))
            if value:
                data[key] = value.strip("'\"")
    return data


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _json(obj, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


class _Fault:
    def __init__(self, kind, method, pattern, count, status=500, after=False, skip=0):
        self.kind, self.method, self.regex, self.count = kind, method.upper(), re.compile(pattern), count
        self.status, self.after, self.skip = status, after, skip


class HubServer:
    def __init__(self, root: Path, tokens: dict[str, set[str] | None], names: dict[str, str] | None = None):
        """`tokens`: token -> namespaces it may write (None = every namespace, empty set = read-only token).
        `names`: token -> user name reported by whoami and used for `create_repo("name")` without a namespace;
        defaults to the token's first namespace (sorted), or "user-<hash>"."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens = {t: (None if ns is None else set(ns)) for t, ns in tokens.items()}
        self.names = {t: (names or {}).get(t) or (sorted(ns)[0] if ns else f"user-{hashlib.sha1(t.encode()).hexdigest()[:8]}")
                      for t, ns in self.tokens.items()}
        self.requests: list[Logged] = []
        self.endpoint = ""
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()  # one lock for refs, faults and the log: commits are atomic w.r.t. each other
        self._secret = secrets.token_bytes(16)  # signs LFS upload URLs (the client PUTs them without auth, like S3)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle and test controls
    def start(self) -> str:
        """Serve on a free port; after stop(), on the same port again (the clients' endpoint stays valid)."""
        hub = self

        class Handler(_Handler):
            server_hub = hub

        port = int(self.endpoint.rsplit(":", 1)[1]) if self.endpoint else 0
        self._httpd = _Server(("127.0.0.1", port), Handler)
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)  # short poll: stop() returns at once
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def reset(self, keep: tuple[str, ...] = ()) -> None:
        """Back to a fresh server for the next test, without a restart: no pending faults, an empty request log,
        no repo but the `keep` models, and those with the branches and settings they had at the first reset
        (seeded once for a whole session; a test's commits to them are forgotten)."""
        import shutil

        with self._lock:
            self._faults.clear()
            self.requests.clear()
            for rtype in ("models", "datasets", "spaces"):
                for repo in sorted((self.root / rtype).glob("*/*")):
                    if rtype != "models" or f"{repo.parent.name}/{repo.name}" not in keep:
                        shutil.rmtree(repo)
            if not hasattr(self, "_kept"):
                self._kept = {r: {n: (self._dir("models", r) / n).read_bytes() for n in ("refs.json", "repo.json")}
                              for r in keep}
            for repo, files in self._kept.items():
                for name, data in files.items():
                    self._atomic_write(self._dir("models", repo) / name, data)

    def fail_next(self, method: str, path_regex: str, status: int = 500, count: int = 1) -> None:
        """Answer the next `count` matching requests with `status` instead of handling them."""
        with self._lock:
            self._faults.append(_Fault("fail", method, path_regex, count, status=status))

    def drop_next(self, method: str, path_regex: str, count: int = 1, after_handling: bool = False) -> None:
        """Read the next `count` matching requests, then close the connection without answering. With
        `after_handling`, the request takes effect first (e.g. a commit is created) and only the answer is lost."""
        with self._lock:
            self._faults.append(_Fault("drop", method, path_regex, count, after=after_handling))

    def hold_next(self, method: str, path_regex: str, seconds: float, count: int = 1, skip: int = 0) -> threading.Event:
        """Read the next `count` matching requests, then wait `seconds` before handling them (a stalled upload:
        time for a test to kill the client mid-request), after letting `skip` of them through unharmed. The
        returned event is set when a hold begins."""
        fault = _Fault("hold", method, path_regex, count, skip=skip)
        fault.seconds, fault.started = seconds, threading.Event()
        with self._lock:
            self._faults.append(fault)
        return fault.started

    def cut_next(self, method: str, path_regex: str, after_bytes: int, count: int = 1) -> None:
        """Answer the next `count` matching requests with their full headers (Content-Length included), send only
        the first `after_bytes` of the body, then close the connection: a download cut off mid-file."""
        fault = _Fault("cut", method, path_regex, count)
        fault.after_bytes = after_bytes
        with self._lock:
            self._faults.append(fault)

    def rewrite_next(self, method: str, path_regex: str, old: bytes, new: bytes, count: int = 1) -> None:
        """Handle the next `count` matching requests, then answer with every `old` in the body replaced by `new`: a
        tampered answer, as from a server that is not the Hub."""
        fault = _Fault("rewrite", method, path_regex, count)
        fault.old, fault.new = old, new
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.count > 0 and f.method == method and f.regex.search(path):
                    if f.skip > 0:
                        f.skip -= 1
                        return None
                    f.count -= 1
                    return f
        return None

    # ------------------------------------------------------------------ dispatch
    def _routes(self):
        # (method, regex on the raw path, handler); first match wins, so specific routes come first.
        return [
            ("GET", r"^/api/whoami-v2$", self.h_whoami),
            ("GET", r"^/api/models$", self.h_list_models),
            ("POST", r"^/api/repos/create$", self.h_create_repo),
            ("POST", r"^/api/validate-yaml$", self.h_validate_yaml),
            ("PUT", _API + r"/settings$", self.h_settings),
            ("GET", _API + r"/refs$", self.h_refs),
            ("POST", _API + r"/branch/(?P<branch>[^/]+)$", self.h_create_branch),
            ("DELETE", _API + r"/branch/(?P<branch>[^/]+)$", self.h_delete_branch),
            ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", self.h_tree),
            ("POST", _API + r"/paths-info/(?P<rev>[^/]+)$", self.h_paths_info),
            ("GET", _API + r"/commits/(?P<rev>[^/]+)$", self.h_commits),
            ("POST", _API + r"/preupload/(?P<rev>[^/]+)$", self.h_preupload),
            ("POST", _API + r"/commit/(?P<rev>[^/]+)$", self.h_commit),
            ("GET", _API + r"/xet-(?:read|write)-token(?:/.*)?$", self.h_xet),
            ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?$", self.h_repo_info),
            ("POST", _GIT + r"/batch$", self.h_lfs_batch),
            ("POST", _GIT + r"/verify$", self.h_lfs_verify),
            ("PUT", r"^/_lfs/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$", self.h_lfs_put),
            ("GET", r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self.h_resolve),
        ]

    def _handle(self, method: str, path: str, query: dict, headers, body: bytes):
        lookup = "GET" if method == "HEAD" else method
        for m, pattern, handler in self._routes():
            match = re.match(pattern, path) if m == lookup else None
            if match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if "prefix" in match.re.groupindex:  # git and resolve URLs: "datasets/ns/name", or "ns/name" for models
                    args["type"] = args.pop("prefix", "models")
                req = _Request(method, path, query, headers, body, self._token(headers))
                return handler(req, **args)
        raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} {path}).")

    # ------------------------------------------------------------------ auth
    def _token(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if token not in self.tokens:
            # Exactly the Hub's message: the client then raises a plain 401 instead of "repo not found".
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _can_write(self, token: str | None, namespace: str) -> bool:
        return token is not None and (self.tokens[token] is None or namespace in self.tokens[token])

    def _require_write(self, token: str | None, namespace: str) -> None:
        if token is None:
            raise HubError(401, "You must be authenticated to write to the Hub (Authorization: Bearer <token>)")
        if not self._can_write(token, namespace):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace!r}")

    # ------------------------------------------------------------------ storage
    def _dir(self, rtype: str, repo: str) -> Path:
        if not all(_NAME.match(part) for part in repo.split("/")):  # also keeps "%2E%2E" out of the file system
            raise HubError(404, f"Invalid repo id {repo!r}", "RepoNotFound")
        return self.root / rtype / repo

    def _meta(self, req, rtype: str, repo: str, write: bool = False) -> dict:
        """The repo's settings; private repos are invisible (404) to anyone who may not write to them."""
        if write and req.token is None:
            self._require_write(None, repo.split("/")[0])
        path = self._dir(rtype, repo) / "repo.json"
        meta = json.loads(path.read_text()) if path.is_file() else None
        if meta is None or (meta["private"] and not self._can_write(req.token, repo.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._require_write(req.token, repo.split("/")[0])
        return meta

    def _refs(self, rtype: str, repo: str) -> dict[str, str]:
        return json.loads((self._dir(rtype, repo) / "refs.json").read_text())

    def _set_ref(self, rtype: str, repo: str, branch: str, sha: str | None) -> None:
        refs = self._refs(rtype, repo)
        if sha is None:
            del refs[branch]
        else:
            refs[branch] = sha
        self._atomic_write(self._dir(rtype, repo) / "refs.json", json.dumps(refs, indent=1).encode())

    def _commit_obj(self, rtype: str, repo: str, sha: str) -> dict:
        return json.loads((self._dir(rtype, repo) / "commits" / f"{sha}.json").read_text())

    def _resolve(self, rtype: str, repo: str, rev: str) -> str:
        """A branch name or a full commit id -> commit id, else 404 RevisionNotFound."""
        refs = self._refs(rtype, repo)
        if rev in refs:
            return refs[rev]
        if rev.startswith("refs/heads/") and rev[11:] in refs:
            return refs[rev[11:]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and (self._dir(rtype, repo) / "commits" / f"{rev}.json").is_file():
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _blob(self, rtype: str, repo: str, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
            raise HubError(400, f"Invalid LFS oid {sha256!r} (expected a sha256)")
        return self._dir(rtype, repo) / "blobs" / sha256

    def _store_blob(self, rtype: str, repo: str, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self._blob(rtype, repo, sha256).is_file():
            self._atomic_write(self._blob(rtype, repo, sha256), data)
        return sha256

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _new_commit(self, rtype, repo, parent, files, title, message="", author="system") -> str:
        commit = {"parent": parent, "title": title, "message": message, "author": author, "date": _now(), "files": files}
        sha = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        self._atomic_write(self._dir(rtype, repo) / "commits" / f"{sha}.json", json.dumps({"id": sha, **commit}).encode())
        return sha

    def _file_entry(self, rtype, repo, data: bytes, lfs: bool) -> dict:
        sha256 = self._store_blob(rtype, repo, data)
        oid = git_blob_sha1(lfs_pointer(sha256, len(data)) if lfs else data)
        return {"sha256": sha256, "oid": oid, "size": len(data), "lfs": lfs}

    # ------------------------------------------------------------------ account and repos
    def h_whoami(self, req):
        if req.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        ns = self.tokens[req.token]
        name = self.names[req.token]
        role = "write" if ns is None or ns else "read"
        return _json({"type": "user", "name": name, "fullname": name,
                      "orgs": [{"type": "org", "name": n} for n in sorted(ns or ()) if n != name],
                      "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})

    def h_create_repo(self, req):
        payload = json.loads(req.body or b"{}")
        rtype = f"{payload.get('type') or 'model'}s"
        if rtype not in ("models", "datasets", "spaces"):
            raise HubError(400, f"Invalid repo type {payload.get('type')!r}")
        if req.token is None:
            self._require_write(None, "")
        namespace = payload.get("organization") or self.names[req.token]
        name = payload.get("name") or ""
        if not (_NAME.match(namespace) and _NAME.match(name)):
            raise HubError(400, f"Invalid repo name {namespace}/{name}")
        self._require_write(req.token, namespace)
        repo = f"{namespace}/{name}"
        url = self.endpoint + ("" if rtype == "models" else f"/{rtype}") + f"/{repo}"
        with self._lock:
            if (self._dir(rtype, repo) / "repo.json").is_file():
                return _json({"error": "You already created this repo", "url": url}, 409)
            # Like the Hub: a new repo has a "main" branch with one system commit holding .gitattributes.
            files = {".gitattributes": self._file_entry(rtype, repo, DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
            sha = self._new_commit(rtype, repo, None, files, "initial commit")
            self._atomic_write(self._dir(rtype, repo) / "refs.json", json.dumps({"main": sha}).encode())
            meta = {"private": payload.get("visibility") == "private", "gated": False, "createdAt": _now()}
            self._atomic_write(self._dir(rtype, repo) / "repo.json", json.dumps(meta).encode())
        return _json({"url": url, "name": repo, "id": repo})

    def h_validate_yaml(self, req):
        """Called by the client before committing a README.md. Checks only that a front-matter block is closed
        (no YAML parser in the standard library); the Hub also checks the metadata schema."""
        content = json.loads(req.body).get("content", "")
        if content.startswith("---\n") and "\n---" not in content[3:]:
            return _json({"errors": [{"message": "the metadata block (---) is not closed"}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def h_settings(self, req, type, repo):
        payload = json.loads(req.body or b"{}")
        with self._lock:
            meta = self._meta(req, type, repo, write=True)
            if "gated" in payload:
                meta["gated"] = payload["gated"]
            if "visibility" in payload:
                meta["private"] = payload["visibility"] == "private"
            self._atomic_write(self._dir(type, repo) / "repo.json", json.dumps(meta).encode())
        return _json({})

    def h_repo_info(self, req, type, repo, rev="main"):
        meta = self._meta(req, type, repo)
        sha = self._resolve(type, repo, rev)
        commit = self._commit_obj(type, repo, sha)
        siblings = [{"rfilename": p, "size": f["size"], "blobId": f["oid"],
                     **({"lfs": {"sha256": f["sha256"], "size": f["size"], "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}}
                        if f["lfs"] else {})}
                    for p, f in sorted(commit["files"].items())]
        return _json({"id": repo, "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "author": repo.split("/")[0],
                      "sha": sha, "private": meta["private"], "gated": meta["gated"], "disabled": False,
                      "lastModified": commit["date"], "createdAt": meta["createdAt"], "tags": [], "downloads": 0,
                      "likes": 0, "siblings": siblings})

    def h_list_models(self, req):
        """GET /api/models?author=NS: one namespace's models (in one page: test hubs are small), each with what
        `expand` can ask for: the main commit, config.json, safetensors parameter counts (read from the files'
        headers, as the Hub does) and the card's metadata."""
        author = req.query.get("author", ["*"])[0]
        if not _NAME.match(author) and author != "*":
            raise HubError(400, f"Invalid author {author!r}")
        listed = []
        for d in sorted((self.root / "models").glob(f"{author}/*")):
            repo = f"{d.parent.name}/{d.name}"
            try:
                meta = self._meta(req, "models", repo)
            except HubError:  # private, and not this caller's
                continue
            sha = self._resolve("models", repo, "main")
            commit = self._commit_obj("models", repo, sha)
            files = commit["files"]
            blob = lambda path: self._blob("models", repo, files[path]["sha256"])  # noqa: E731
            item = {"id": repo, "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "author": d.parent.name, "sha": sha,
                    "private": meta["private"], "gated": meta["gated"], "lastModified": commit["date"],
                    "createdAt": meta["createdAt"], "tags": []}
            if "config.json" in files:
                item["config"] = json.loads(blob("config.json").read_bytes())
            params: dict[str, int] = {}
            for path in (p for p in files if p.endswith(".safetensors")):
                with open(blob(path), "rb") as f:
                    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                for name, t in header.items():
                    if name != "__metadata__":
                        params[t["dtype"]] = params.get(t["dtype"], 0) + _product(t["shape"])
            if params:
                item["safetensors"] = {"parameters": params, "total": sum(params.values())}
            if "README.md" in files:
                card = _front_matter(blob("README.md").read_text())
                item["cardData"] = card
                item["tags"] = list(card.get("tags", [])) + ([f"license:{card['license']}"] if card.get("license") else [])
            listed.append(item)
        return _json(listed)

    # ------------------------------------------------------------------ branches and history
    def h_refs(self, req, type, repo):
        self._meta(req, type, repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in sorted(self._refs(type, repo).items())]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def h_create_branch(self, req, type, repo, branch):
        payload = json.loads(req.body or b"{}")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", branch) or ".." in branch or branch.startswith("refs/"):
            raise HubError(400, f"Invalid branch name {branch!r}")
        with self._lock:
            self._meta(req, type, repo, write=True)
            start = self._resolve(type, repo, payload.get("startingPoint") or "main")
            if branch in self._refs(type, repo):
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            self._set_ref(type, repo, branch, start)
        return _json({})

    def h_delete_branch(self, req, type, repo, branch):
        with self._lock:
            self._meta(req, type, repo, write=True)
            if branch == "main" or branch not in self._refs(type, repo):
                raise HubError(400 if branch == "main" else 404, f"Cannot delete branch {branch!r}")
            self._set_ref(type, repo, branch, None)
        return _json({})

    def h_commits(self, req, type, repo, rev):
        """History of `rev`, newest first, in one page (no `Link: next` header)."""
        self._meta(req, type, repo)
        sha, out = self._resolve(type, repo, rev), []
        while sha:
            c = self._commit_obj(type, repo, sha)
            out.append({"id": sha, "title": c["title"], "message": c["message"], "date": c["date"],
                        "authors": [{"user": c["author"]}]})
            sha = c["parent"]
        return _json(out)

    # ------------------------------------------------------------------ listing
    def _entry(self, path: str, f: dict) -> dict:
        e = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"]}
        if f["lfs"]:  # never "xetHash": that would send the client to Xet for the download
            e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
        return e

    def h_tree(self, req, type, repo, rev, path=""):
        self._meta(req, type, repo)
        sha = self._resolve(type, repo, rev)
        files = self._commit_obj(type, repo, sha)["files"]
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = path.strip("/")
        prefix = f"{base}/" if base else ""
        under = {p: f for p, f in files.items() if p.startswith(prefix)}
        if base and not under:
            raise HubError(404, f"{base} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        out, dirs = [], set()
        for p, f in sorted(under.items()):
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                out.append(self._entry(p, f))
        for d in sorted(dirs):
            tree = json.dumps(sorted((p, f["oid"]) for p, f in files.items() if p.startswith(d + "/")))
            out.append({"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(tree.encode()).hexdigest()})
        return _json(sorted(out, key=lambda e: e["path"]))

    def h_paths_info(self, req, type, repo, rev):
        self._meta(req, type, repo)
        files = self._commit_obj(type, repo, self._resolve(type, repo, rev))["files"]
        form = parse_qs(req.body.decode())
        out = []
        for p in form.get("paths", []):
            p = p.strip("/")
            if p in files:
                out.append(self._entry(p, files[p]))
            elif any(q.startswith(p + "/") for q in files):
                out.append({"type": "directory", "path": p, "size": 0, "oid": hashlib.sha1(p.encode()).hexdigest()})
        return _json(out)

    # ------------------------------------------------------------------ upload: preupload, LFS, commit
    def _lfs_patterns(self, type, repo, files) -> list[str]:
        f = files.get(".gitattributes")
        if not f:
            return []
        text = self._blob(type, repo, f["sha256"]).read_text(errors="replace")
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.split()]

    def h_preupload(self, req, type, repo, rev):
        """Tell the client, per file, "regular" (inline in the commit) or "lfs", plus the oid of the file already
        at that path: the client skips files whose oid it can reproduce (git sha1, or sha256 for LFS)."""
        self._meta(req, type, repo, write=True)
        sha = self._resolve(type, repo, rev)
        files = self._commit_obj(type, repo, sha)["files"]
        patterns = self._lfs_patterns(type, repo, files)
        out = []
        for item in json.loads(req.body)["files"]:
            path, size, sample = item["path"], item["size"], base64.b64decode(item.get("sample", ""))
            name = path.rsplit("/", 1)[-1]
            lfs = (size >= LFS_THRESHOLD or b"\0" in sample
                   or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns))
            entry = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in files:
                f = files[path]
                entry["oid"] = f["sha256"] if f["lfs"] else f["oid"]
            out.append(entry)
        return _json({"files": out, "commitOid": sha})

    def _sign(self, type, repo, oid, size) -> str:
        return hmac.new(self._secret, f"{type}/{repo}/{oid}/{size}".encode(), "sha256").hexdigest()

    def h_lfs_batch(self, req, type, repo):
        """git-lfs batch API. Answers transfer "basic": one PUT per object to a signed URL on this server, plus a
        verify action. Objects already stored get no actions (the client then skips their upload)."""
        self._meta(req, type, repo, write=True)
        payload = json.loads(req.body)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "Only the basic transfer is supported")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid oid"}})
            elif self._blob(type, repo, oid).is_file():
                objects.append({"oid": oid, "size": size})
            else:
                href = f"{self.endpoint}/_lfs/{type}/{repo}/{oid}?size={size}&sig={self._sign(type, repo, oid, size)}"
                prefix = "" if type == "models" else f"/{type}"
                verify = f"{self.endpoint}{prefix}/{repo}.git/info/lfs/objects/verify"
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"upload": {"href": href, "expires_in": 3600}, "verify": {"href": verify}}})
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                     headers={"Content-Type": "application/vnd.git-lfs+json"})

    def h_lfs_put(self, req, type, repo, oid):
        """The "storage" side of LFS: no auth header, the signed URL is the credential. Refuses content whose
        sha256 or size differs from what the batch call announced."""
        size = req.query.get("size", [""])[0]
        if not hmac.compare_digest(req.query.get("sig", [""])[0], self._sign(type, repo, oid, size)):
            raise HubError(403, "Invalid or missing upload signature")
        if hashlib.sha256(req.body).hexdigest() != oid or str(len(req.body)) != size:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self._store_blob(type, repo, req.body)
        return 200, {"ETag": f'"{oid}"'}, b""

    def h_lfs_verify(self, req, type, repo):
        self._meta(req, type, repo, write=True)
        obj = json.loads(req.body)
        blob = self._blob(type, repo, obj.get("oid", ""))
        if not blob.is_file() or blob.stat().st_size != obj.get("size"):
            raise HubError(404, f"LFS object {obj.get('oid')} was not uploaded")
        return _json({"oid": obj["oid"], "size": obj["size"]})

    def h_xet(self, req, type, repo):
        raise HubError(400, "This test Hub does not speak Xet: run the client with HF_HUB_DISABLE_XET=1")

    def h_commit(self, req, type, repo, rev):
        """NDJSON: a header line, then file / lfsFile / deletedFile / deletedFolder lines. All or nothing: the
        branch moves only once every operation checked out, and only if it still points at parentCommit."""
        if req.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test Hub")
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        with self._lock:
            self._meta(req, type, repo, write=True)
            if rev not in self._refs(type, repo):
                raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
            head = self._refs(type, repo)[rev]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}: {rev} is now at {head}")
            files = dict(self._commit_obj(type, repo, head)["files"])
            for line in lines[1:]:
                key, op = line.get("key"), line.get("value", {})
                path = str(op.get("path", "")).strip("/") if key != "deletedFolder" else str(op.get("path", "")).rstrip("/")
                if not path or any(part in ("", ".", "..", ".git") for part in path.split("/")):
                    raise HubError(400, f"Invalid path {op.get('path')!r}")
                if key == "file":
                    data = base64.b64decode(op["content"]) if op.get("encoding") == "base64" else op["content"].encode()
                    if len(data) >= LFS_THRESHOLD or b"\0" in data[:512]:  # same rule as preupload
                        raise HubError(400, f"{path}: binary or large files must be uploaded through LFS")
                    files[path] = self._file_entry(type, repo, data, lfs=False)
                elif key == "lfsFile":
                    blob = self._blob(type, repo, op.get("oid", ""))
                    if not blob.is_file() or ("size" in op and blob.stat().st_size != op["size"]):
                        raise HubError(400, f"{path}: LFS object {op.get('oid')} was never uploaded to this repo")
                    size = blob.stat().st_size
                    files[path] = {"sha256": op["oid"], "oid": git_blob_sha1(lfs_pointer(op["oid"], size)),
                                   "size": size, "lfs": True}
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            author = self.names[req.token]
            sha = self._new_commit(type, repo, head, files, header.get("summary") or "", header.get("description") or "", author)
            self._set_ref(type, repo, rev, sha)
        prefix = "" if type == "models" else f"/{type}"
        return _json({"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}{prefix}/{repo}/commit/{sha}",
                      "hookOutput": ""})

    # ------------------------------------------------------------------ download
    def h_resolve(self, req, type, repo, rev, path):
        """HEAD/GET a file. Answers 200 directly (the Hub redirects LFS files to a CDN); ETag is the git sha1,
        or for LFS files X-Linked-Etag is the sha256 that the client names the cached blob after."""
        meta = self._meta(req, type, repo)
        if meta["gated"] and req.token is None:
            raise HubError(401, f"Access to {repo} is restricted. You must be authenticated to access it.", "GatedRepo")
        sha = self._resolve(type, repo, rev)
        f = self._commit_obj(type, repo, sha)["files"].get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        data = self._blob(type, repo, f["sha256"]).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f["oid"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(f["size"])})
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", ""))
        if rng:  # the client sends Range only to resume an interrupted download
            start, end = int(rng[1]), int(rng[2]) if rng[2] else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            return 206, headers, data[start:end + 1]
        return 200, headers, data


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that gave up (a timeout, a killed process) is what fault tests make: not worth a traceback.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Request(NamedTuple):
    method: str
    path: str
    query: dict
    headers: object
    body: bytes
    token: str | None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    timeout = 30  # idle keep-alive connections must not keep threads alive forever
    disable_nagle_algorithm = True  # headers and body are two writes: without this, each answer stalls ~40 ms
    server_hub: HubServer

    def log_message(self, *args):  # quiet: the test reads `server.requests` instead
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self):
        hub = self.server_hub
        path, _, qs = self.path.partition("?")
        body = self._read_body()  # read first, so that a dropped request was fully sent, as on a real network
        fault = hub._take_fault(self.command, path)
        if fault and fault.kind == "drop" and not fault.after:
            return self._drop(path)
        if fault and fault.kind == "hold":
            fault.started.set()
            time.sleep(fault.seconds)
        try:
            if fault and fault.kind == "fail":
                raise HubError(fault.status, f"Injected failure ({fault.status})")
            status, headers, payload = hub._handle(self.command, path, parse_qs(qs), self.headers, body)
        except HubError as e:
            headers = {"Content-Type": "application/json", "X-Error-Message": e.message.encode("ascii", "replace").decode(),
                       **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            status, payload = e.status, json.dumps({"error": e.message}).encode()
        except (ValueError, KeyError) as e:  # unparsable JSON / NDJSON / base64, or a missing field
            status, headers, payload = 400, {"Content-Type": "application/json"}, json.dumps({"error": f"Malformed request: {e!r}"}).encode()
        except Exception as e:  # a bug in this server: answer 500 with the reason rather than hang the client
            status, headers, payload = 500, {"Content-Type": "application/json"}, json.dumps({"error": repr(e)}).encode()
        if fault and fault.kind == "drop":
            return self._drop(path)
        if fault and fault.kind == "rewrite":
            payload = payload.replace(fault.old, fault.new)
        body = payload if self.command != "HEAD" else b""
        if fault and fault.kind == "cut":
            body = body[:fault.after_bytes]
            self.close_connection = True
        with hub._lock:  # logged before answering: once the client has its answer, the log shows the request
            hub.requests.append(Logged(self.command, path, status, len(body), self.headers.get("Range", "")))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(body)

    def _drop(self, path):
        with self.server_hub._lock:
            self.server_hub.requests.append(Logged(self.command, path, 0))
        self.close_connection = True  # no status line at all: the client sees "server disconnected"

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


def client_env(endpoint: str, home: Path) -> dict[str, str]:
    """Environment for a `huggingface_hub` client in a child process (e.g. the quantkit CLI) talking to this server."""
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_XET_CACHE": str(home / "xet"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "0"}


def isolate_client(monkeypatch, home: Path) -> None:
    """Same for the client imported in this process. `huggingface_hub.constants` reads the environment once, at
    import, so the constants are patched too. The endpoint is NOT patched (constants.ENDPOINT is baked into the
    resolve-URL template): pass `endpoint=` to HfApi / hf_hub_download / snapshot_download explicitly."""
    from huggingface_hub import constants

    for key, value in client_env("", home).items():
        if key != "HF_ENDPOINT":
            monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_XET_CACHE": str(home / "xet"),
                        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                        "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": False}.items():
        monkeypatch.setattr(constants, name, value)
