"""A Hub that cannot be reached, refuses connections, times out, answers 5xx or cuts a download off: every command
that talks to it (plan, build, watch, worker, publish) ends with one line of cause, one of fix and its exit code;
cached models build offline; interrupted downloads resume. The real CLI against the real HTTP test Hub
(tests/hub_server.py) or a closed port."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from huggingface_hub import HfApi

from conftest import PROFILES, REPO, SAMPLE_REPO as SOURCE, TOKEN, hub_env, run_cli
from hub_server import client_env
from quantkit.jobs.queue import open_queue

INFO = r"^/api/models/alice/SmolLM2-135M-Instruct(/revision/[^/]+)?$"  # model_info: where a build starts
WEIGHTS = r"/alice/SmolLM2-135M-Instruct/resolve/[0-9a-f]{40}/model\.safetensors$"


def _closed_port() -> str:
    """An endpoint nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _clean(proc) -> list[str]:
    """The error and fix lines of a failed command, after checking that no traceback reached the user."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]


@pytest.fixture(scope="module")
def server(module_hub):
    return module_hub


_env = hub_env  # a client of the test Hub with a Hugging Face cache of its own, retrying fast


def _served(hub, since: int, pattern: str = "/resolve/") -> list:
    return [r for r in hub.requests[since:] if r.method == "GET" and pattern in r.path]


def test_an_unreachable_hub_fails_plan_and_build_cleanly(server, tmp_path):
    home = tmp_path / "hf"
    cases = {  # the endpoint, and what the resolver or the socket says
        "http://quantkit-test.invalid": ("Name or service not known", "name resolution"),
        _closed_port(): ("Connection refused",),
    }
    for endpoint, causes in cases.items():
        for command in ("plan", "build"):
            proc = run_cli(command, "someorg/somemodel", "--out", tmp_path / "out",
                           env=_env(server, home, HF_ENDPOINT=endpoint))
            assert proc.returncode == 3, proc.stderr
            error, fix = _clean(proc)
            assert error.startswith(f"error: the Hub at {endpoint} cannot be reached (ConnectError: "), error
            assert any(cause in error for cause in causes), error
            assert error.endswith("after 5 attempts), and someorg/somemodel (main) is not in the Hugging Face cache")
            assert fix.startswith("  fix: build once with the Hub reachable")
            assert proc.stderr.count("retrying in") == 4  # back-off, 4 retries
    assert not (tmp_path / "out").exists()


def test_a_hub_that_times_out_or_fails_with_5xx(server, tmp_path):
    # Holds every model_info request longer than the timeout: five timeouts, then the refusal.
    server.hold_next("GET", INFO, seconds=3, count=5)
    env = _env(server, tmp_path / "hf", QUANTKIT_HUB_TIMEOUT_S="1")
    start = time.monotonic()
    proc = run_cli("plan", SOURCE, env=env)
    assert proc.returncode == 3 and time.monotonic() - start < 30
    error, _ = _clean(proc)
    assert f"the Hub at {server.endpoint} cannot be reached (ReadTimeout" in error and "after 5 attempts" in error

    server.fail_next("GET", INFO, status=503, count=5)
    proc = run_cli("plan", SOURCE, env=env)
    assert proc.returncode == 3
    error, _ = _clean(proc)
    assert f"the Hub at {server.endpoint} is failing (HTTP 503" in error and "after 5 attempts" in error

    # Three 503s, then an answer: the retries get through and the plan is made.
    server.fail_next("GET", INFO, status=503, count=3)
    proc = run_cli("plan", SOURCE, env=env, check=True)
    assert proc.stderr.count("retrying in") == 3 and f"{SOURCE}@{server.commit[:12]}" in proc.stdout


def test_offline_plan_of_an_uncached_model_is_refused(server, tmp_path):
    proc = run_cli("plan", "someorg/somemodel", env=_env(server, tmp_path / "hf", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 3
    assert _clean(proc) == [
        "error: HF_HUB_OFFLINE is set, and someorg/somemodel (main) is not in the Hugging Face cache",
        "  fix: build once with the Hub reachable (unset HF_HUB_OFFLINE), pass --revision with a cached commit, "
        "or build from a local folder"]


def test_publish_to_an_unreachable_hub(sample_build, tmp_path):
    env = {**client_env(_closed_port(), tmp_path / "hf"), "HF_TOKEN": TOKEN, "QUANTKIT_RETRY_BACKOFF_S": "0.05"}
    proc = run_cli("publish", sample_build["dir"], "--owner", "alice", env=env)
    assert proc.returncode == 8
    error, fix = _clean(proc)
    assert error.startswith("error: the Hub kept failing after 5 attempts: ConnectError:")
    assert fix == "  fix: the repo is unchanged; run the same command again later"

    proc = run_cli("publish", sample_build["dir"], "--owner", "alice", env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 8
    assert _clean(proc) == ["error: publishing needs the Hub, and HF_HUB_OFFLINE is set",
                            "  fix: unset HF_HUB_OFFLINE (quantkit publish --dry-run shows the plan offline)"]


def test_a_cached_model_builds_offline_and_never_mixes_snapshots(server, tmp_path):
    home, out = tmp_path / "hf", tmp_path / "out"
    env = _env(server, home)
    run_cli("plan", SOURCE, env=env, check=True)  # fills the cache with commit A
    commit_a = server.commit
    # Commit B changes the card; its download is cut short (the card never arrives), so B's snapshot is partial.
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    commit_b = api.upload_file(path_or_fileobj=b"---\nlicense: apache-2.0\n---\nB\n", path_in_repo="README.md",
                               repo_id=SOURCE).oid
    server.fail_next("GET", r"/resolve/[0-9a-f]{40}/README\.md$", status=503, count=5)
    proc = run_cli("plan", SOURCE, env=env)
    assert proc.returncode == 3 and "the download of alice/SmolLM2-135M-Instruct failed" in _clean(proc)[0]
    snapshots = home / "hub" / "models--alice--SmolLM2-135M-Instruct" / "snapshots"
    assert (snapshots / commit_b).is_dir() and not (snapshots / commit_b / "README.md").exists()

    server.stop()
    try:
        # Offline: main is still A in the cache (B never finished), so A is built, from A's files alone.
        offline = {**env, "HF_HUB_OFFLINE": "1"}
        proc = run_cli("build", SOURCE, "--profile", PROFILES / "files.yaml", "--out", out, env=offline, check=True)
        assert "Traceback" not in proc.stderr
        assert f"using {SOURCE}@{commit_a[:12]} from the Hugging Face cache: HF_HUB_OFFLINE is set" in proc.stderr
        report = json.loads((out / "SmolLM2-135M-Instruct" / "report.json").read_text())
        assert report["source"]["revision"] == commit_a
        assert report["source"]["from_cache"] == "HF_HUB_OFFLINE is set"
        assert "from the local Hugging Face cache (HF_HUB_OFFLINE is set)" in (out / "SmolLM2-135M-Instruct" / "report.md").read_text()
        assert "built 2" in proc.stdout

        # The partial snapshot B is refused by commit, never filled in from A.
        proc = run_cli("plan", SOURCE, "--revision", commit_b, env=offline)
        assert proc.returncode == 3
        error, fix = _clean(proc)
        assert error == (f"error: HF_HUB_OFFLINE is set, and the cached snapshot of {SOURCE} ({commit_b}) is incomplete: "
                         "1 file(s) are missing (README.md)")
        # A revision the cache never saw: refused, naming what the cache holds.
        proc = run_cli("plan", SOURCE, "--revision", "v2", env=offline)
        assert proc.returncode == 3
        assert _clean(proc)[0] == (f"error: HF_HUB_OFFLINE is set, and {SOURCE} (v2) is not in the Hugging Face cache "
                                   f"(cached: main -> {commit_a[:12]}, snapshot {commit_b[:12]})")

        # Not offline, but the Hub is gone (the stopped server's port): the same cached snapshot, and it says why.
        proc = run_cli("plan", SOURCE, "--revision", commit_a, env=env, check=True)
        assert f"using {SOURCE}@{commit_a[:12]} from the Hugging Face cache: the Hub at {server.endpoint} cannot be " \
               "reached (ConnectError" in proc.stderr
        assert "(from the Hugging Face cache: the Hub at" in proc.stdout
    finally:
        server.start()


def test_a_download_cut_off_mid_file_resumes_without_fetching_again(server, tmp_path):
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    info = api.model_info(SOURCE, files_metadata=True)
    [weights] = [s for s in info.siblings if s.rfilename == "model.safetensors"]
    size, sha256 = weights.size, weights.lfs.sha256

    # Cut once, mid-file: the next attempt asks only for the rest.
    env = _env(server, tmp_path / "hf1")
    cut = (30 << 20) + 12345
    server.cut_next("GET", WEIGHTS, after_bytes=cut)
    since = len(server.requests)
    proc = run_cli("plan", SOURCE, env=env, check=True)
    assert "retrying in" in proc.stderr and "Traceback" not in proc.stderr
    first, second = _served(server, since, "model.safetensors")
    assert (first.status, first.sent, first.range) == (200, cut, "")
    assert (second.status, second.range, second.sent) == (206, f"bytes={cut}-", size - cut)

    # Cut at 150 MiB, then the Hub fails every retry: the run ends cleanly, keeping what it has. The rerun, a new
    # process, asks for the rest only.
    home = tmp_path / "hf2"
    env = _env(server, home)
    cut = (150 << 20) + 777
    server.cut_next("GET", WEIGHTS, after_bytes=cut)
    server.fail_next("GET", WEIGHTS, status=503, count=4)
    since = len(server.requests)
    proc = run_cli("plan", SOURCE, env=env)
    assert proc.returncode == 3
    error, fix = _clean(proc)
    assert error.startswith(f"error: the download of {SOURCE} failed: the Hub at {server.endpoint} is failing (HTTP 503")
    assert fix == "  fix: run the same command again later: the download resumes where it stopped"
    [partial] = (home / "hub" / "models--alice--SmolLM2-135M-Instruct" / "blobs").glob("*.quantkit-partial")
    assert partial.name == f"{sha256}.quantkit-partial" and partial.stat().st_size == cut
    complete = {r.path for r in _served(server, since) if r.status == 200 and r.sent and "model.safetensors" not in r.path}

    since = len(server.requests)
    proc = run_cli("plan", SOURCE, env=env, check=True)
    assert "Traceback" not in proc.stderr
    [rest] = _served(server, since, "model.safetensors")  # one request: the rest of the weights
    assert (rest.status, rest.range, rest.sent) == (206, f"bytes={cut}-", size - cut)
    assert not complete & {r.path for r in _served(server, since)}, "a file of the first run was fetched again"
    snapshot = home / "hub" / "models--alice--SmolLM2-135M-Instruct" / "snapshots" / info.sha
    assert hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest() == sha256
    for entry in api.list_repo_tree(SOURCE, revision=info.sha):
        if entry.path != "model.safetensors" and (snapshot / entry.path).exists():
            assert hashlib.sha1(b"blob %d\0" % entry.size + (snapshot / entry.path).read_bytes()).hexdigest() == entry.blob_id


def test_a_listing_whose_blob_name_is_no_sha256_is_refused_before_any_download(server, tmp_path):
    # The LFS sha256 of the listing names the blob file in the cache: a tampered one must not say where bytes go.
    info = HfApi(endpoint=server.endpoint, token=TOKEN).model_info(SOURCE, files_metadata=True)
    [weights] = [s for s in info.siblings if s.rfilename == "model.safetensors"]
    evil = "../../../escaped"
    server.rewrite_next("GET", r"^/api/models/alice/SmolLM2-135M-Instruct/tree/",
                        f'"oid": "{weights.lfs.sha256}"'.encode(), f'"oid": "{evil}"'.encode())
    since = len(server.requests)
    proc = run_cli("plan", SOURCE, env=_env(server, tmp_path / "hf"))
    assert proc.returncode == 3, proc.stderr
    assert _clean(proc) == [
        f"error: the Hub's listing of {SOURCE} gives 'model.safetensors' the LFS sha256 '{evil}', which is not a "
        "sha256 (64 lowercase hex digits)",
        "  fix: check HF_ENDPOINT: the server there does not answer as the Hub does"]
    assert any("/tree/" in r.path for r in server.requests[since:]), "the tampered listing was never asked for"
    assert not _served(server, since, "model.safetensors")
    assert not [p for p in tmp_path.rglob("*") if "escaped" in p.name]


def test_a_watch_pass_in_an_outage_says_one_line_and_every_keeps_going(server, tmp_path):
    queue = tmp_path / "queue.db"
    # The Hub answers 503 through huggingface_hub's own retries of the first pass (about 23 s of its fixed
    # back-off); the second pass works. The one-shot passes below run meanwhile: they never reach this server.
    server.fail_next("GET", r"^/api/models$", status=503, count=6)
    watch = subprocess.Popen([sys.executable, "-m", "quantkit", "watch", "alice", "--queue", str(queue), "--every", "1",
                              "--profile", str(PROFILES / "tiny.yaml"), "--out", str(tmp_path / "out")],
                             cwd=REPO, env={**os.environ, **_env(server, tmp_path / "hf"), "PYTHONUNBUFFERED": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        other = tmp_path / "other.db"
        proc = run_cli("watch", "alice", "--queue", other, env=_env(server, tmp_path / "hf2", HF_ENDPOINT="http://quantkit-test.invalid"))
        assert proc.returncode == 3
        error, fix = _clean(proc)
        assert error.startswith("error: cannot list the models of 'alice': the Hub at http://quantkit-test.invalid cannot "
                                "be reached (ConnectError:")
        assert [l for l in proc.stderr.splitlines() if l.strip()] == [error, fix]  # nothing else: one line, one fix

        proc = run_cli("watch", "alice", "--queue", other, env=_env(server, tmp_path / "hf2", HF_HUB_OFFLINE="1"))
        assert proc.returncode == 3
        assert _clean(proc) == ["error: watch lists models on the Hub, and HF_HUB_OFFLINE is set", "  fix: unset HF_HUB_OFFLINE"]
        assert not open_queue(other).list()

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not open_queue(queue).list():
            assert watch.poll() is None, watch.stderr.read()
            time.sleep(0.5)
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=30)
    assert "Traceback" not in out + err
    [line] = [l for l in err.splitlines() if l.strip()]
    assert line.startswith("error: cannot list the models of 'alice': the Hub at") and "is failing (HTTP 503" in line
    assert line.endswith("; next pass in 1s")
    assert "1 new job(s)" in out
    [job] = open_queue(queue).list()
    head = HfApi(endpoint=server.endpoint, token=TOKEN).model_info(SOURCE).sha
    assert (job.repo_id, job.revision) == (SOURCE, head)


def test_a_worker_retries_a_job_the_network_failed_then_marks_it_failed(server, tmp_path):
    queue = open_queue(tmp_path / "queue.db")
    # Job 1: its first attempt meets a Hub that fails (503 on every retry); the second attempt builds it.
    one = queue.enqueue(SOURCE, server.commit, str(PROFILES / "files.yaml"), tmp_path / "out", max_attempts=3)
    server.fail_next("GET", INFO, status=503, count=5)
    proc = run_cli("worker", "--once", "--poll", "0.2", "--queue", queue.path, env=_env(server, tmp_path / "hf"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr + queue.log_path(one.id).read_text()
    assert f"#{one.id} {SOURCE}@{server.commit[:12]}: failed (exit 3): the Hub at {server.endpoint} is failing (HTTP 503" \
        in proc.stdout
    assert "queued again, attempt 2/3" in proc.stdout and "1 job(s) done, 0 failed" in proc.stdout
    done = queue.get(one.id)
    assert (done.state, done.attempts, done.exit_code) == ("done", 2, 0)

    # Job 2: the Hub is gone for good (a closed port, nothing cached): two attempts, then failed with the cause.
    two = queue.enqueue(SOURCE, "0" * 40, str(PROFILES / "files.yaml"), tmp_path / "out2", max_attempts=2)
    proc = run_cli("worker", "--once", "--poll", "0.2", "--queue", queue.path,
                   env=_env(server, tmp_path / "hf-empty", HF_ENDPOINT=_closed_port()))
    assert proc.returncode == 1
    log = queue.log_path(two.id).read_text()
    assert "Traceback" not in proc.stdout + proc.stderr + log
    assert "queued again, attempt 2/2" in proc.stdout and "0 job(s) done, 1 failed" in proc.stdout
    failed = queue.get(two.id)
    assert (failed.state, failed.attempts, failed.exit_code) == ("failed", 2, 3)
    assert failed.error.startswith("the Hub at http://127.0.0.1:") and "cannot be reached (ConnectError" in failed.error
    assert log.count("error: the Hub at") == 2


def test_an_unexpected_exception_prints_one_line_and_logs_the_traceback(tmp_path):
    """A third-party format with a bug: the user sees one line and where the traceback is."""
    site = tmp_path / "site"
    (site / "quantkit_buggy-0.1.dist-info").mkdir(parents=True)
    (site / "quantkit_buggy-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: quantkit-buggy\nVersion: 0.1\n")
    (site / "quantkit_buggy-0.1.dist-info" / "entry_points.txt").write_text("[quantkit.formats]\nbuggy = quantkit_buggy:Buggy\n")
    (site / "quantkit_buggy.py").write_text(textwrap.dedent("""
        from quantkit.formats import Format

        class Buggy(Format):
            def plan(self, source, options, ctx_llama_cpp=None):
                return []

            def build(self, item, ctx):
                return {}

            def describe(self, item, path, facts):
                return {}

            def requirements(self):
                return [1 / 0]
    """))
    state = tmp_path / "state"
    proc = run_cli("backends", env={"PYTHONPATH": str(site), "XDG_STATE_HOME": str(state)})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    error, fix = _clean(proc)
    assert error == "error: unexpected ZeroDivisionError: division by zero"
    [log] = (state / "quantkit" / "crashes").glob("crash-*.log")
    assert fix == f"  fix: this is a bug: the traceback is in {log}; please include that file in a bug report"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "quantkit_buggy.py" in text and "ZeroDivisionError" in text
