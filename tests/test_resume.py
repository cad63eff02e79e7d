"""Interrupted and edited builds: kill -9 mid-write, a deleted or damaged artifact."""

import os
import signal
import subprocess
import sys
import time

from conftest import PROFILES, REPO, run_cli


def _start_build(sample_model, out):
    return subprocess.Popen([sys.executable, "-m", "quantkit", "build", str(sample_model), "--profile",
                             str(PROFILES / "tiny.yaml"), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_kill_9_during_a_write_leaves_no_partial_file_under_a_final_name(sample_model, tmp_path):
    proc = _start_build(sample_model, tmp_path)
    folder = tmp_path / sample_model.name
    deadline = time.monotonic() + 300
    partial = []
    while time.monotonic() < deadline and not partial and proc.poll() is None:
        partial = list(folder.glob("*.gguf.partial"))
        time.sleep(0.02)
    assert partial, "the build finished or failed before a .gguf was being written"
    os.killpg(proc.pid, signal.SIGKILL)  # the converter/quantizer child dies with it
    proc.wait()
    time.sleep(0.5)
    # Whatever is under a final .gguf name is complete: the one being written is still .partial.
    assert partial[0].with_suffix("").name not in {p.name for p in folder.glob("*.gguf")}

    resumed = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    assert "left by an interrupted run" in resumed.stderr
    assert not list(folder.glob("*.partial")) and not list((folder / ".quantkit").glob("*.partial"))
    assert sorted(p.name for p in folder.glob("*.gguf")) == [f"{sample_model.name}-F16.gguf", f"{sample_model.name}-Q8_0.gguf"]


def test_a_deleted_or_damaged_artifact_is_rebuilt_and_nothing_else(sample_model, tmp_path):
    run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    folder = tmp_path / sample_model.name
    f16, q8 = folder / f"{sample_model.name}-F16.gguf", folder / f"{sample_model.name}-Q8_0.gguf"
    f16_mtime = f16.stat().st_mtime_ns
    with open(q8, "r+b") as f:  # same size, different bytes: only the content hash can tell
        f.seek(q8.stat().st_size // 2)
        f.write(b"\x00" * 64)
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    # The quantizer is deterministic: the remade file equals the evaluated one, so its results stand.
    assert "built 1, evaluated 0" in proc.stdout
    assert f16.stat().st_mtime_ns == f16_mtime
    q8.unlink()
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    assert "built 1, evaluated 0" in proc.stdout
    # Changing what an evaluation depends on (the smoke question) re-runs evaluations (the fp16
    # reference's and both files'), not builds.
    changed = tmp_path / "changed.yaml"
    changed.write_text((PROFILES / "tiny.yaml").read_text() + "smoke:\n  question: What is the capital of Italy?\n  expect: Rome\n  allow_failures: true\n")
    proc = run_cli("build", sample_model, "--profile", changed, "--out", tmp_path, check=True)
    assert "built 0, evaluated 3" in proc.stdout
