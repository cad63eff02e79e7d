"""tests/hub_server.py driven only through the real huggingface_hub client (HfApi, snapshot_download, ...).

What these tests pin down about the 2.4 client (a publisher relies on it):
- uploads go through plain LFS only with HF_HUB_DISABLE_XET=1; otherwise the client goes to Xet without asking;
- 5xx on preupload are retried (1 s, 2 s, ... backoff; the LFS batch and PUT calls use the same http_backoff),
  on the commit POST they are not;
- a dropped connection on an LFS PUT is retried; on the commit POST it surfaces as httpx2.RemoteProtocolError;
- re-uploading unchanged files makes no commit at all (the client compares the oids preupload returns).
"""

import hashlib
import os

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants
from huggingface_hub.errors import (
    BadRequestError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
)
from huggingface_hub.utils import _http, set_client_factory

from hub_server import LFS_THRESHOLD, HubServer, isolate_client

TOKENS = {"tok-alice": {"alice", "acme"}, "tok-bob": {"bob"}, "tok-read": set(), "tok-admin": None}
NAMES = {"tok-alice": "alice", "tok-bob": "bob", "tok-read": "reader", "tok-admin": "admin"}

# The client's LFS PUT passes a file object as `data=`; httpx2 warns about it. Not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A started HubServer, and a huggingface_hub client that can only reach it."""
    isolate_client(monkeypatch, tmp_path / "hf_home")
    foreign = []

    def local_only_client():
        client = _http.default_client_factory()

        def refuse(request):  # the client must never reach huggingface.co (nor anything but this server)
            if request.url.host != "127.0.0.1":
                foreign.append(str(request.url))
                raise AssertionError(f"request outside the test hub: {request.url}")

        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], refuse]}
        return client

    previous = _http._GLOBAL_CLIENT_FACTORY
    set_client_factory(local_only_client)
    server = HubServer(tmp_path / "hub", TOKENS, names=NAMES)
    server.start()
    yield server
    server.stop()
    set_client_factory(previous)
    assert not foreign


def api(hub, token="tok-alice"):
    return HfApi(endpoint=hub.endpoint, token=token)


def head(hub, repo="alice/m", revision=None):
    return api(hub).model_info(repo, revision=revision).sha


def paths(hub, pattern):
    return [r for r in hub.requests if pattern in r.path]


@pytest.fixture
def folder(tmp_path):
    """Small text files (a model card, a name with a space) and a binary file over the LFS threshold."""
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A tiny model\n")  # client validates it first
    (src / "weights" / "notes v1.txt").write_text("a space in the name\n")
    (src / "weights" / "model.bin").write_bytes(os.urandom(LFS_THRESHOLD + 1024 * 1024))
    return src


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_repo_whoami_and_not_found(hub):
    a = api(hub)
    assert a.whoami()["name"] == "alice"
    url = a.create_repo("alice/m")
    assert url.repo_id == "alice/m" and url.endpoint == hub.endpoint
    with pytest.raises(HfHubHTTPError) as e:
        a.create_repo("alice/m")
    assert e.value.response.status_code == 409
    a.create_repo("alice/m", exist_ok=True)
    # Like the Hub, a new repo holds one "initial commit" with a .gitattributes.
    assert [c.title for c in a.list_repo_commits("alice/m")] == ["initial commit"]
    assert a.list_repo_files("alice/m") == [".gitattributes"]
    a.create_repo("acme/d", repo_type="dataset")
    assert a.repo_info("acme/d", repo_type="dataset").id == "acme/d"
    with pytest.raises(RepositoryNotFoundError):
        a.model_info("alice/nope")
    with pytest.raises(RevisionNotFoundError):
        a.model_info("alice/m", revision="nope")


def test_upload_folder_goes_through_lfs_and_downloads_identical(hub, folder, tmp_path):
    a = api(hub)
    a.create_repo("alice/m")
    hub.requests.clear()
    info = a.upload_folder(repo_id="alice/m", folder_path=folder, commit_message="first")

    # The big file went through the LFS batch API and a PUT to this server; nothing asked for Xet.
    assert [r.status for r in paths(hub, ".git/info/lfs/objects/batch")] == [200]
    assert [r.status for r in hub.requests if r.method == "PUT" and r.path.startswith("/_lfs/")] == [200]
    assert not paths(hub, "xet")
    assert {r.status for r in paths(hub, "/api/validate-yaml")} == {200}  # the client checks README.md first
    siblings = {s.rfilename: s for s in a.model_info("alice/m").siblings}
    assert siblings["weights/model.bin"].lfs.sha256 == sha256(folder / "weights" / "model.bin")
    assert siblings["README.md"].lfs is None and siblings["weights/notes v1.txt"].lfs is None
    assert head(hub) == info.oid
    assert len(a.list_repo_commits("alice/m")) == 2

    # Downloads: plain HTTP, byte-identical, both into a local folder and into the cache.
    local = snapshot_download("alice/m", endpoint=hub.endpoint, token=False, local_dir=tmp_path / "dl")
    cached = snapshot_download("alice/m", endpoint=hub.endpoint, token=False, cache_dir=tmp_path / "cache")
    for root in (local, cached):
        for name in ("README.md", "weights/notes v1.txt", "weights/model.bin"):
            assert sha256(tmp_path / root / name) == sha256(folder / name)
    one = hf_hub_download("alice/m", "weights/model.bin", endpoint=hub.endpoint, cache_dir=tmp_path / "c2")
    assert sha256(tmp_path / one) == sha256(folder / "weights" / "model.bin")
    assert not paths(hub, "xet")
    assert sorted(a.list_repo_files("alice/m")) == [".gitattributes", "README.md", "weights/model.bin", "weights/notes v1.txt"]

    # Unchanged files: the client compares preupload's oids and makes no commit at all (no POST /commit).
    hub.requests.clear()
    again = a.upload_folder(repo_id="alice/m", folder_path=folder)
    assert again.oid == info.oid and not paths(hub, "/commit/")
    assert len(a.list_repo_commits("alice/m")) == 2


def test_branches(hub, folder, tmp_path):
    a = api(hub)
    a.create_repo("alice/m")
    main_before = head(hub)
    a.create_branch("alice/m", branch="dev")
    a.create_branch("alice/m", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as e:
        a.create_branch("alice/m", branch="dev")
    assert e.value.response.status_code == 409
    assert {b.name: b.target_commit for b in a.list_repo_refs("alice/m").branches} == {"main": main_before, "dev": main_before}

    info = a.upload_file(repo_id="alice/m", path_or_fileobj=b"on dev\n", path_in_repo="notes/dev.txt", revision="dev")
    assert head(hub, revision="dev") == info.oid and head(hub) == main_before
    assert len(a.list_repo_commits("alice/m", revision="dev")) == 2
    assert len(a.list_repo_commits("alice/m")) == 1
    got = hf_hub_download("alice/m", "notes/dev.txt", revision="dev", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert open(got, "rb").read() == b"on dev\n"
    a.create_branch("alice/m", branch="from-dev", revision=info.oid)
    assert head(hub, revision="from-dev") == info.oid


def test_auth_private_and_gated(hub, tmp_path):
    api(hub).create_repo("alice/m")
    for token, status in ((False, 401), ("tok-bob", 403), ("tok-read", 403), ("tok-wrong", 401)):
        with pytest.raises(HfHubHTTPError) as e:
            api(hub, token).create_repo("alice/other")
        assert e.value.response.status_code == status, token
        with pytest.raises(HfHubHTTPError) as e:
            api(hub, token).upload_file(repo_id="alice/m", path_or_fileobj=b"x", path_in_repo="x.txt")
        assert e.value.response.status_code == status, token
    assert api(hub, "tok-admin").create_repo("bob/by-admin").repo_id == "bob/by-admin"
    assert len(api(hub).list_repo_commits("alice/m")) == 1

    # Private repos do not exist for whoever may not write to them, like on the Hub.
    api(hub).create_repo("alice/secret", private=True)
    for token in (False, "tok-bob"):
        with pytest.raises(RepositoryNotFoundError):
            api(hub, token).model_info("alice/secret")
    assert api(hub).model_info("alice/secret").private is True

    api(hub).update_repo_settings("alice/m", gated="auto")
    with pytest.raises(GatedRepoError):
        hf_hub_download("alice/m", ".gitattributes", endpoint=hub.endpoint, token=False, cache_dir=tmp_path / "c")
    assert hf_hub_download("alice/m", ".gitattributes", endpoint=hub.endpoint, token="tok-bob", cache_dir=tmp_path / "c")


def test_server_errors_retried_or_surfaced(hub):
    a = api(hub)
    a.create_repo("alice/m")
    before = head(hub)

    # The commit POST is not retried: a 500 reaches the caller and the branch has not moved.
    hub.fail_next("POST", r"/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as e:
        a.upload_file(repo_id="alice/m", path_or_fileobj=b"hello\n", path_in_repo="a.txt")
    assert e.value.response.status_code == 500
    assert head(hub) == before and len(a.list_repo_commits("alice/m")) == 1

    # preupload goes through http_backoff: one 503 costs a 1 s wait, then the upload succeeds.
    hub.fail_next("POST", r"/preupload/", status=503)
    info = a.upload_file(repo_id="alice/m", path_or_fileobj=b"hello\n", path_in_repo="a.txt")
    assert [r.status for r in paths(hub, "/preupload/")][-2:] == [503, 200]
    assert head(hub) == info.oid


def test_dropped_lfs_put_is_retried(hub, folder):
    # Observed: the client retries the PUT (http_backoff treats RemoteProtocolError as transient) after 1 s,
    # re-sending the whole file from the start, and the upload then succeeds. Only after 6 failed tries would it
    # give up (1+2+4+8+8 s of waiting), raising before any commit, so the head would stay unchanged.
    a = api(hub)
    a.create_repo("alice/m")
    hub.drop_next("PUT", r"^/_lfs/")
    info = a.upload_folder(repo_id="alice/m", folder_path=folder)
    assert [r.status for r in hub.requests if r.method == "PUT"] == [0, 200]
    assert head(hub) == info.oid


def test_lfs_content_must_match_its_oid(hub):
    a = api(hub)
    a.create_repo("alice/m")
    before = head(hub)
    data = os.urandom(LFS_THRESHOLD + 1)

    # Announce one sha256, upload other bytes: the PUT is refused (400, not retried) and nothing is committed.
    lying = CommitOperationAdd("big.bin", data)
    lying.upload_info.sha256 = hashlib.sha256(b"something else").digest()
    with pytest.raises(Exception) as e:
        a.create_commit("alice/m", [lying], commit_message="bad")
    assert isinstance(e.value.__cause__, HfHubHTTPError) and e.value.__cause__.response.status_code == 400
    # A commit naming an LFS object that was never uploaded is refused too. (Marking the operation as already
    # uploaded is how a client that called preupload_lfs_files earlier, elsewhere, would send it.)
    ghost = CommitOperationAdd("ghost.bin", data)
    ghost._upload_mode, ghost._is_uploaded, ghost._should_ignore = "lfs", True, False
    with pytest.raises(BadRequestError):
        a.create_commit("alice/m", [ghost], commit_message="ghost")
    assert head(hub) == before


def test_parent_commit_and_lost_commit_answer(hub):
    a = api(hub)
    a.create_repo("alice/m")
    first = head(hub)
    a.upload_file(repo_id="alice/m", path_or_fileobj=b"1\n", path_in_repo="a.txt", parent_commit=first)
    moved = head(hub)
    # parent_commit travels in the NDJSON header as "parentCommit"; a stale one is refused with 412.
    with pytest.raises(HfHubHTTPError) as e:
        a.upload_file(repo_id="alice/m", path_or_fileobj=b"2\n", path_in_repo="a.txt", parent_commit=first)
    assert e.value.response.status_code == 412 and head(hub) == moved

    # The commit is made but its answer is lost: the client raises httpx2.RemoteProtocolError (not an
    # HfHubHTTPError), and does not retry the commit POST.
    hub.drop_next("POST", r"/commit/", after_handling=True)
    with pytest.raises(httpx2.RemoteProtocolError):
        a.upload_file(repo_id="alice/m", path_or_fileobj=b"3\n", path_in_repo="a.txt", parent_commit=moved)
    made = head(hub)
    assert made != moved
    # Re-running the same upload is harmless: preupload reports the same oid at that path, so the client sends
    # no commit at all (not even to be refused for its stale parent_commit) and returns the current head.
    hub.requests.clear()
    again = a.upload_file(repo_id="alice/m", path_or_fileobj=b"3\n", path_in_repo="a.txt", parent_commit=moved)
    assert again.oid == made and not paths(hub, "/commit/")
    assert len(a.list_repo_commits("alice/m")) == 3


def test_client_with_xet_enabled_fails_fast(hub, monkeypatch):
    # hf_xet installed and HF_HUB_DISABLE_XET unset: the client asks for a Xet write token without consulting the
    # server. This server refuses (400), so the upload fails at once, as a builtin ConnectionError raised by hf_xet.
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    a = api(hub)
    a.create_repo("alice/m")
    before = head(hub)
    with pytest.raises(ConnectionError):
        a.upload_file(repo_id="alice/m", path_or_fileobj=os.urandom(LFS_THRESHOLD), path_in_repo="w.bin")
    assert [r.status for r in paths(hub, "/xet-write-token/")] == [400]
    assert not paths(hub, ".git/info/lfs") and head(hub) == before
