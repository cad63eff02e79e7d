"""kill -9 at each kind of step (conversion is in test_resume.py): during a quantization, during an
evaluation, during an upload to the test Hub. The rerun completes, no file under a final name is
partial, and finished work is not redone."""

import os
import signal
import subprocess
import sys
import time

import pytest
from huggingface_hub import HfApi

from conftest import PROFILES, REPO, TOKEN, run_cli, seed


def _start(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "quantkit", *map(str, args)], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc, ready, timeout=600):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the process ended before the point to kill it at"
        assert time.monotonic() < deadline, "the point to kill at never came"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the process group: the worker child dies with it
    proc.wait()


def _finals(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.gguf")}


@pytest.mark.parametrize("point", ["quantization", "evaluation"])
def test_kill_9_mid_step_then_resume(sample_model, files_seed, tiny_seed, tmp_path, point):
    # Quantization: the evaluated seed without its Q8_0 file. Evaluation: the files, never evaluated.
    folder = seed(tiny_seed if point == "quantization" else files_seed, tmp_path)
    q8 = folder / f"{sample_model.name}-Q8_0.gguf"
    state = folder / ".quantkit"
    if point == "quantization":
        q8.unlink()
    ready = {
        "quantization": lambda: any(q8.parent.glob(q8.name + ".*.partial")),
        # The fp16 reference's log-probabilities are being written: every GGUF file is final by then. The rows are
        # written in place (a precision target extends them); the manifest trusts the file only with the hash
        # it records once the run has finished.
        "evaluation": lambda: (state / "reference-logprobs.npy").exists(),
    }[point]
    _kill_when(_start("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path), ready)
    before = _finals(folder)
    assert q8.name not in before if point == "quantization" else q8.name in before
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    assert not list(folder.rglob("*.partial"))
    after = _finals(folder)
    assert all(after[name] == mtime for name, mtime in before.items()), "a finished file was made again"
    # The remade Q8_0 is the file the seed evaluated, byte for byte: its evaluations stand.
    assert ("built 1, evaluated 0" if point == "quantization" else "built 0, evaluated 3") in proc.stdout, proc.stdout[-1500:]


def test_kill_9_mid_upload_then_publish_again(sample_model, tiny_seed, hub, tmp_path):
    folder = seed(tiny_seed, tmp_path)
    # The large files go up in parallel: the first is let through and stored, every other one stalls, and the
    # publish is killed then. The rerun must send the others, and not the stored one again.
    stalled = hub.hold_next("PUT", r"^/_lfs/", seconds=30, count=10, skip=1)
    stored = lambda since=0: {r.path for r in hub.requests[since:]  # noqa: E731
                              if r.method == "PUT" and r.path.startswith("/_lfs/") and r.status == 200}
    _kill_when(_start("publish", folder, env=hub.env), lambda: stalled.is_set() and stored())
    killed_at = len(hub.requests)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    repo = f"alice/{sample_model.name}-GGUF"
    # Killed before its commit: the repo has no model files (it may exist, created first).
    assert not any(f.endswith(".gguf") for f in (api.list_repo_files(repo) if api.repo_exists(repo) else []))
    uploaded_before = stored()
    assert len(uploaded_before) == 1, uploaded_before
    proc = run_cli("publish", folder, env=hub.env, check=True)
    assert f"{repo}@main: new commit" in proc.stdout
    files = api.list_repo_files(repo)
    assert {f"{sample_model.name}-F16.gguf", f"{sample_model.name}-Q8_0.gguf", "README.md"} <= set(files)
    again = stored(killed_at)
    assert again and not uploaded_before & again, "an object stored before the kill was sent again"
