"""Fixtures shared by the suite. Builds are expensive, so a few are made once per session and the others start
from copies of them, resumed (docs/testing.md lists which test uses which):

- files_seed: the sample's F16 and Q8_0 files, evaluation off (tests/profiles/files.yaml);
- tiny_seed: files_seed evaluated as tests/profiles/tiny.yaml does it (no file is made again);
- sample_build: tiny_seed carried on to the full GGUF ladder of tests/profiles/fast.yaml;
- session_hub: one test Hub for the session, with the sample uploaded once as alice/SmolLM2-135M-Instruct.

A copy of a build folder is a build folder moved elsewhere: resuming one makes nothing again, which is what
quantkit promises (tests/test_resume.py checks it), and what makes the seeding sound.

The suite runs on two pytest-xdist workers (pyproject.toml). The session's seeds are made once for both: the
first worker to need one makes it under a lock, the other waits for it (`shared_folder`). Each worker's tools get
its share of the cores (QUANTKIT_THREADS), and whole modules go to one worker (GROUPS, GROUP_ORDER).
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.cpus import THREADS_ENV, usable_cpus
from quantkit.sample import ensure_sample

TESTS = Path(__file__).parent
TOKEN = "qk-test-token-alice-0123456789"  # alice's, on the test Hub server
OTHER = "qk-test-token-bob-0123456789"
PROFILES = TESTS / "profiles"
REPO = TESTS.parent
SAMPLE_REPO = "alice/SmolLM2-135M-Instruct"
# A child process that runs longer than this is stuck: the test fails with its output instead of eating the budget.
CHILD_TIMEOUT = 900


# Each module is an xdist group of its own (its module fixtures are then built once, by one worker), but modules
# that must not run while another of them does share a group, which one worker runs in turn:
# - "ray": each starts Ray on this machine (a local instance, a simulated cluster, nodes from `ray start`);
# - "sample-build": each resumes the session's sample_build folder, publishes from it (which writes its publish/
#   folder) or copies it.
GROUPS = {"test_cluster": "ray", "test_cluster_store": "ray", "test_executors": "ray", "test_jobs": "ray",
          "test_build_sample": "sample-build", "test_publish": "sample-build", "test_network": "sample-build",
          "test_formats_registry": "sample-build"}
# The order in which the workers take groups (the others follow, by name). The first builds the session's seeds,
# the second starts on builds of its own, and the long ones go early, so that neither worker ends alone on one.
GROUP_ORDER = ["sample-build", "test_moe", "test_formats", "test_runtime_engine", "ray", "test_mlx", "test_pickle",
               "test_gguf_depth", "test_resume", "test_errors", "test_faults", "test_streamed", "test_gates",
               "test_memory", "test_reference_chat"]


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        # Each worker's tools get their share of the cores (every child inherits it): llama.cpp's threads spin at
        # each barrier, so two workers' steps each asking for every core would run many times slower.
        share = str(max(1, usable_cpus() // workers))
        os.environ.setdefault(THREADS_ENV, share)
        os.environ.setdefault("OMP_NUM_THREADS", share)


def _group(path: str | Path) -> str:
    """The xdist group of a test module (by its path): GROUPS', else its own."""
    return GROUPS.get(Path(path).stem, Path(path).stem)


def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduler of whole scopes, a scope being a group. (Its own --dist loadgroup reads markers it tags
    node ids with, which pytest 9.2 no longer lets it do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid.split("::")[0])

    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    """Groups in GROUP_ORDER, then the others by name; xdist keeps the order it is given (--no-loadscope-reorder)."""
    first: dict[str, int] = {}
    for item in items:
        first.setdefault(_group(item.path), len(first))

    def rank(item) -> tuple[int, int]:
        group = _group(item.path)
        return (GROUP_ORDER.index(group), 0) if group in GROUP_ORDER else (len(GROUP_ORDER), first[group])

    items.sort(key=rank)


def shared_folder(tmp_path_factory, name: str, make) -> Path:
    """A folder `name` made once per session by `make(folder)`, for every xdist worker: the first to ask makes it
    under a lock, the others wait for it and get it made (or the first one's failure)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder; each worker's own is a folder in it
    folder, made, failed = base / name, base / f"{name}.made", base / f"{name}.failed"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():
            pytest.fail(f"{name}, made by another worker, failed:\n{failed.read_text()}")
        if not made.exists():
            folder.mkdir()
            try:
                make(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}"[-3000:])
                raise
            made.touch()
    return folder


def run_cli(*args, env=None, check=False, timeout=CHILD_TIMEOUT):
    """The real command line, in a child process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"quantkit {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def seed(folder: Path, out: Path) -> Path:
    """A copy of the build folder `folder` as `out`/<its name>, where a build resumes from it. Times are kept
    (copy2): the manifest's hash cache trusts a file whose size and mtime it recorded."""
    dest = out / folder.name
    shutil.copytree(folder, dest, symlinks=True)
    return dest


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="session")
def sample_model() -> Path:
    return ensure_sample()


@pytest.fixture(scope="session")
def files_seed(sample_model, tmp_path_factory) -> Path:
    """The sample's F16 and Q8_0 files, built once with evaluation off."""
    def make(out: Path) -> None:
        run_cli("build", sample_model, "--profile", PROFILES / "files.yaml", "--out", out, check=True)

    return shared_folder(tmp_path_factory, "files-seed", make) / sample_model.name


@pytest.fixture(scope="session")
def tiny_seed(sample_model, files_seed, tmp_path_factory) -> Path:
    """files_seed evaluated with tests/profiles/tiny.yaml: the F16 and Q8_0 files are taken as built."""
    def make(out: Path) -> None:
        seed(files_seed, out)
        proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", out, check=True)
        assert "built 0, evaluated 3" in proc.stdout, proc.stdout[-2000:]

    return shared_folder(tmp_path_factory, "tiny-seed", make) / sample_model.name


@pytest.fixture(scope="session")
def sample_build(sample_model, tiny_seed, tmp_path_factory):
    """The sample's full GGUF ladder (every default type), shared by the tests that only read it."""
    def make(out: Path) -> None:
        seed(tiny_seed, out)
        run_cli("build", sample_model, "--profile", PROFILES / "fast.yaml", "--out", out, check=True)

    out = shared_folder(tmp_path_factory, "builds", make)
    folder = out / sample_model.name
    return {"dir": folder, "out": out, "report": report(folder)}


@pytest.fixture(scope="session")
def session_hub(sample_model, tmp_path_factory):
    """One real HTTP server speaking the Hub API (tests/hub_server.py) for the whole session, with users alice
    (TOKEN) and bob (OTHER), and the sample uploaded once as alice/SmolLM2-135M-Instruct (`.commit`). Tests get it
    through `hub`, which resets it."""
    from huggingface_hub import HfApi
    from hub_server import HubServer, isolate_client

    tmp = tmp_path_factory.mktemp("session-hub")
    mp = pytest.MonkeyPatch()
    isolate_client(mp, tmp / "hf_home_tests")
    server = HubServer(tmp / "hub", {TOKEN: {"alice"}, OTHER: {"bob"}}, names={TOKEN: "alice", OTHER: "bob"})
    server.start()
    try:
        api = HfApi(endpoint=server.endpoint, token=TOKEN)
        api.create_repo(SAMPLE_REPO)
        server.commit = api.upload_folder(repo_id=SAMPLE_REPO, folder_path=sample_model).oid
    finally:
        mp.undo()
    yield server
    server.stop()


@pytest.fixture
def hub(session_hub, tmp_path, monkeypatch):
    """The session's test Hub as a fresh one: no repo but the sample (at `.commit`), no pending fault, an empty
    request log. `hub.env` points quantkit's child processes at it with a Hugging Face cache of the test's own."""
    from hub_server import isolate_client

    session_hub.reset(keep=(SAMPLE_REPO,))
    isolate_client(monkeypatch, tmp_path / "hf_home_tests")  # the test's own client: plain LFS, no ~/.cache
    session_hub.env = hub_env(session_hub, tmp_path / "hf_home")
    yield session_hub
    session_hub.reset(keep=(SAMPLE_REPO,))


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request):
    """`tmp_path_factory.mktemp` for a module's fixtures, whose folders are removed when the module is done unless
    one of its tests failed. A run writes about 19 GB; what only one module reads should not wait for the session's
    end to give its disk back (pyproject.toml keeps no passed test's folder)."""
    made = []
    failed = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_hub(session_hub, module_dir):
    """The session's test Hub, fresh for a module whose tests build on each other's state (its repos, its request
    log); reset again when the module is done."""
    from hub_server import isolate_client

    session_hub.reset(keep=(SAMPLE_REPO,))
    mp = pytest.MonkeyPatch()
    tmp = module_dir("module-hub")
    isolate_client(mp, tmp / "hf_home_tests")
    session_hub.env = hub_env(session_hub, tmp / "hf_home")
    try:
        yield session_hub
    finally:
        mp.undo()
        session_hub.reset(keep=(SAMPLE_REPO,))


def hub_env(server, home: Path, **extra) -> dict:
    """A quantkit child process's environment: a client of `server` with the Hugging Face cache `home`, as alice,
    retrying fast."""
    from hub_server import client_env

    return {**client_env(server.endpoint, home), "HF_TOKEN": TOKEN, "QUANTKIT_RETRY_BACKOFF_S": "0.05", **extra}


@contextlib.contextmanager
def hub_down(server):
    """The Hub gone for the duration (its port refuses connections), then back on the same port."""
    server.stop()
    try:
        yield
    finally:
        server.start()
