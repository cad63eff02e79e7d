import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.sample import ensure_sample

TESTS = Path(__file__).parent
TOKEN = "qk-test-token-alice-0123456789"  # alice's, on the test Hub server
OTHER = "qk-test-token-bob-0123456789"
PROFILES = TESTS / "profiles"
REPO = TESTS.parent


def run_cli(*args, env=None, check=False, timeout=1800):
    """The real command line, in a child process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"quantkit {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def sample_model() -> Path:
    return ensure_sample()


@pytest.fixture(scope="session")
def sample_build(sample_model, tmp_path_factory):
    """One full build of the sample with every default type, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("builds")
    proc = run_cli("build", sample_model, "--profile", PROFILES / "fast.yaml", "--out", out, check=True)
    folder = out / sample_model.name
    return {"dir": folder, "out": out, "report": json.loads((folder / "report.json").read_text()), "proc": proc}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A real HTTP server speaking the Hub API (tests/hub_server.py), with users alice (TOKEN) and bob (OTHER);
    `hub.env` points quantkit's child processes at it."""
    from hub_server import HubServer, client_env, isolate_client

    isolate_client(monkeypatch, tmp_path / "hf_home_tests")  # the test's own client: plain LFS, no ~/.cache
    server = HubServer(tmp_path / "hub", {TOKEN: {"alice"}, OTHER: {"bob"}}, names={TOKEN: "alice", OTHER: "bob"})
    server.start()
    server.env = {**client_env(server.endpoint, tmp_path / "hf_home"), "HF_TOKEN": TOKEN,
                  "QUANTKIT_RETRY_BACKOFF_S": "0.05"}
    yield server
    server.stop()


SAMPLE_REPO = "alice/SmolLM2-135M-Instruct"


@contextlib.contextmanager
def sample_on_hub(sample_model: Path, tmp: Path):
    """The sample as alice/SmolLM2-135M-Instruct on a test Hub server of its own, for a module's tests:
    `hub.commit` is its commit, `hub.env` points quantkit's child processes at it."""
    from huggingface_hub import HfApi
    from hub_server import HubServer, client_env, isolate_client

    mp = pytest.MonkeyPatch()
    isolate_client(mp, tmp / "hf_home_tests")
    server = HubServer(tmp / "hub", {TOKEN: {"alice"}}, names={TOKEN: "alice"})
    server.start()
    server.env = {**client_env(server.endpoint, tmp / "hf_home"), "HF_TOKEN": TOKEN, "QUANTKIT_RETRY_BACKOFF_S": "0.05"}
    try:
        api = HfApi(endpoint=server.endpoint, token=TOKEN)
        api.create_repo(SAMPLE_REPO)
        server.commit = api.upload_folder(repo_id=SAMPLE_REPO, folder_path=sample_model).oid
        yield server
    finally:
        server.stop()
        mp.undo()
