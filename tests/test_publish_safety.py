"""What quantkit trusts, and what it refuses (issue 25): publish reads file names and hashes from report.json, which
may sit on shared storage, so a tampered report or build folder must not upload anything but the build's own
files; the child processes that do not talk to the Hub run without its token; the llama.cpp converter comes only
from the llama-cpp-python sdist PyPI publishes; and a killed parent takes its children with it. The real CLI
against the real HTTP test Hub (tests/hub_server.py), real files and real child processes."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from conftest import REPO, TOKEN, run_cli, seed

GGUF_REPO = "alice/SmolLM2-135M-Instruct-GGUF"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lines(proc) -> list[str]:
    """The error and fix lines of a failed command, after checking that no traceback reached the user."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]


def _edit_report(folder: Path, edit) -> None:
    path = folder / "report.json"
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))


def _q8(report: dict) -> dict:
    [a] = [a for a in report["artifacts"] if a["variant"] == "Q8_0"]
    return a


def _nothing_uploaded(hub) -> None:
    assert not hub.requests, [f"{r.method} {r.path}" for r in hub.requests]  # not even the owner was asked
    assert not HfApi(endpoint=hub.endpoint, token=TOKEN).repo_exists(GGUF_REPO)


def test_a_report_naming_anything_but_a_plain_file_name_is_refused_before_any_request(tiny_seed, hub, tmp_path):
    folder = seed(tiny_seed, tmp_path / "out")
    original = (folder / "report.json").read_text()
    i = [a["variant"] for a in json.loads(original)["artifacts"]].index("Q8_0")
    # A private file two folders up, with its size and hash put into the report: a check of sizes or hashes alone
    # would let it go up.
    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + os.urandom(64))
    cases = [("filename", "../../id_rsa"), ("filename", str(secret)), ("filename", "..\\..\\id_rsa"),
             ("filename", ".."), ("filename", "."), ("filename", ""), ("filename", "Q8_0\0.gguf"),
             ("variant", "../../Q8_0"), ("backend", "../gguf")]
    for key, value in cases:
        def tamper(report):
            a = _q8(report)
            a[key] = value
            if key == "filename":
                a["size_bytes"] = secret.stat().st_size
                a["sha256"] = _sha(secret)

        (folder / "report.json").write_text(original)
        _edit_report(folder, tamper)
        hub.requests.clear()
        proc = run_cli("publish", folder, env=hub.env)
        assert proc.returncode == 8, (key, value, proc.stderr)
        assert _lines(proc) == [
            f"error: report.json's artifacts[{i}].{key} is {value!r}, which is not a plain file name in the "
            "build folder",
            "  fix: report.json was edited or damaged: re-run the same quantkit build command, which writes it anew, "
            "then publish"], (key, value)
        _nothing_uploaded(hub)


def test_a_report_of_a_newer_quantkit_or_not_quantkits_is_refused(tiny_seed, hub, tmp_path):
    folder = seed(tiny_seed, tmp_path / "out")
    assert json.loads((folder / "report.json").read_text())["schema"] == 3
    _edit_report(folder, lambda report: report.update(schema=4))
    proc = run_cli("publish", folder, env=hub.env)
    assert proc.returncode == 5 and _lines(proc)[0] == (
        f"error: {folder / 'report.json'} was written by a newer quantkit (report schema 4; this one reads up to 3)")
    sha = _q8(json.loads((folder / "report.json").read_text()))["sha256"]
    _edit_report(folder, lambda report: report.update(schema=3) or _q8(report).pop("sha256"))
    proc = run_cli("publish", folder, env=hub.env)
    assert proc.returncode == 5 and _lines(proc)[0] == f"error: {folder / 'report.json'} is not a report as quantkit writes it"
    assert "re-run the same quantkit build command" in _lines(proc)[1]
    # A report an older quantkit wrote (schema 2: the window length under "ctx") is still read.
    def as_schema_2(report):
        report.update(schema=2)
        report["evaluation"]["ctx"] = report["evaluation"].pop("window")
    _edit_report(folder, lambda report: _q8(report).update(sha256=sha) or as_schema_2(report))
    proc = run_cli("publish", folder, "--dry-run", "--owner", "alice", env=hub.env, check=True)
    assert "(windows of 256)" in (folder / "publish" / "gguf" / "README.md").read_text()
    _nothing_uploaded(hub)


def test_a_file_changed_in_place_with_its_size_and_time_kept_is_refused(tiny_seed, hub, tmp_path):
    folder = seed(tiny_seed, tmp_path / "out")
    recorded = _q8(json.loads((folder / "report.json").read_text()))
    q8 = folder / recorded["filename"]
    st = q8.stat()
    with open(q8, "r+b") as f:  # one bit, in the middle of the tensor data
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(q8, ns=(st.st_atime_ns, st.st_mtime_ns))  # a cache of hashes by size and time would miss it
    assert q8.stat().st_size == st.st_size
    hub.requests.clear()
    proc = run_cli("publish", folder, env=hub.env)
    assert proc.returncode == 8, proc.stderr
    error, fix = _lines(proc)
    assert error.startswith(f"error: {q8.name} changed since the report was written: its sha256 is ")
    assert error.endswith(f", the report's {recorded['sha256'][:16]}…")
    assert fix == "  fix: re-run the same quantkit build command: it remakes what changed and writes the report anew"
    _nothing_uploaded(hub)

    # --dry-run checks the same, without the network.
    proc = run_cli("publish", folder, "--dry-run", "--owner", "alice", env=hub.env)
    assert proc.returncode == 8 and _lines(proc)[0] == error


def test_a_link_out_of_the_build_folder_is_refused_even_with_the_right_bytes(tiny_seed, hub, tmp_path):
    folder = seed(tiny_seed, tmp_path / "out")
    q8 = folder / _q8(json.loads((folder / "report.json").read_text()))["filename"]
    outside = tmp_path / "elsewhere.gguf"
    q8.rename(outside)
    q8.symlink_to(outside)  # same bytes, same size, same hash: only where it lives is wrong
    # The card's plot is written in place: a link left there must not make publish write through it.
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    stage = folder / "publish" / "gguf"
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "size-vs-kld.png").symlink_to(victim)
    hub.requests.clear()
    proc = run_cli("publish", folder, env=hub.env)
    assert proc.returncode == 8, proc.stderr
    assert _lines(proc) == [f"error: {q8.name} in {folder.name} is a link to a file outside the build folder",
                            "  fix: replace the link by the file itself, or re-run the same quantkit build command"]
    _nothing_uploaded(hub)

    # Back in place: the plan holds the card, the plot and the artifacts, not what else lies in publish/gguf/.
    q8.unlink()
    outside.rename(q8)
    (stage / "stray.txt").write_text("left there by someone")
    proc = run_cli("publish", folder, "--dry-run", "--owner", "alice", env=hub.env, check=True)
    assert victim.read_text() == "not yours"
    assert not (stage / "size-vs-kld.png").is_symlink()
    planned = [l.split()[0] for l in proc.stdout.splitlines() if l.startswith("  ") and "sha256" in l]
    report = json.loads((folder / "report.json").read_text())
    assert planned == ["README.md", "size-vs-kld.png"] + [a["filename"] for a in report["artifacts"]]


def test_a_file_name_the_card_puts_in_a_command_cannot_run_anything(tiny_seed, hub, tmp_path):
    folder = seed(tiny_seed, tmp_path / "out")
    report = json.loads((folder / "report.json").read_text())
    name = "SmolLM2-135M-Instruct-Q8_0 $(touch pwned);.gguf"  # one plain name, and a shell command
    (folder / _q8(report)["filename"]).rename(folder / name)
    _edit_report(folder, lambda r: _q8(r).update(filename=name))
    run_cli("publish", folder, "--dry-run", "--owner", "alice", env=hub.env, check=True)
    card = (folder / "publish" / "gguf" / "README.md").read_text()
    [line] = [l for l in card.splitlines() if l.startswith("hf download ")]
    # The Download line as a reader pastes it, with `hf` printing the arguments it gets.
    shell = subprocess.run(["bash", "-c", f"hf() {{ printf '%s\\n' \"$@\"; }}\n{line}"], cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    assert shell.stdout.splitlines() == ["download", GGUF_REPO, name, "--local-dir", "."]
    assert not (tmp_path / "pwned").exists()


def test_a_folder_artifact_is_checked_file_by_file_against_the_builds_own_hash(tmp_path):
    """A folder (GPTQ, AWQ, EXL2, MLX variant) has one sha256 in the report, the build's hash of its files' names and
    hashes: publish remakes it from the hashes it takes for the upload."""
    from quantkit.fsutil import HashCache
    from quantkit.publish.hub import PublishError, _artifact_files
    from quantkit.results import Judged

    variant = tmp_path / "M-4bit"
    (variant / "sub").mkdir(parents=True)
    (variant / "config.json").write_text('{"bits": 4}')
    (variant / "sub" / "model.safetensors").write_bytes(os.urandom(1 << 20))
    a = Judged(backend="gptq", variant="4bit", filename=variant.name, size_bytes=0,  # as the build records it
               sha256=HashCache().sha256(variant), bits_per_weight=4.0, tensor_types={}, fallbacks=[])
    files = _artifact_files(tmp_path, a)
    assert [f.path_in_repo for f in files] == ["config.json", "sub/model.safetensors"]
    assert files[1].sha256 == _sha(variant / "sub" / "model.safetensors")

    weights = variant / "sub" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[12345] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PublishError, match=r"^M-4bit changed since the report was written: its sha256 is "):
        _artifact_files(tmp_path, a)
    data[12345] ^= 1
    weights.write_bytes(bytes(data))
    _artifact_files(tmp_path, a)
    (variant / "extra.bin").write_bytes(b"x")
    with pytest.raises(PublishError, match="changed since the report was written"):
        _artifact_files(tmp_path, a)


_SEES = ("import os; from huggingface_hub import get_token; "
         "print([k for k in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN') if k in os.environ], get_token())")


def test_only_children_that_talk_to_the_hub_get_its_token(tmp_path, monkeypatch):
    from quantkit.procs import run_python

    stored = tmp_path / "hf" / "token"
    stored.parent.mkdir()
    stored.write_text("hf_stored-login-token")  # as `hf auth login` leaves it
    monkeypatch.setenv("HF_HOME", str(stored.parent))
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # Without a variable, the stored login is what a child would find.
    assert run_python(["-c", _SEES], hub=True).lines == ["[] hf_stored-login-token"]
    assert run_python(["-c", _SEES]).lines == ["[] None"]

    monkeypatch.setenv("HF_TOKEN", "hf_env-token")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_old-env-token")
    assert run_python(["-c", _SEES]).lines == ["[] None"]  # converters, quantizers, evaluators
    assert run_python(["-c", _SEES], env={"HF_TOKEN": "hf_passed"}).lines == ["[] None"]
    assert run_python(["-c", _SEES], hub=True).lines == ["['HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN'] hf_env-token"]


def test_a_workers_build_gets_the_token(tmp_path, monkeypatch):
    """The worker's child is a whole build, which downloads its source: it must keep the token."""
    from quantkit.jobs.worker import Worker, WorkerOptions
    from quantkit.jobs.queue import open_queue

    queue = open_queue(tmp_path / "queue.db")
    job = queue.enqueue("alice/Some-Model", "0" * 40, str(tmp_path / "profile.yaml"), tmp_path / "out", max_attempts=1)
    # The build child is replaced by this interpreter printing what it sees, through the worker's own Popen call.
    monkeypatch.setattr(sys, "executable", str(_fake_python(tmp_path)))
    monkeypatch.setenv("HF_TOKEN", "hf_runner-token")
    Worker(queue, WorkerOptions(once=True, poll_s=0.1, gpus=0), log=lambda line: None).run()
    assert "seen: hf_runner-token" in queue.log_path(job.id).read_text()


def _fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import os; print(\"seen:\", os.environ.get(\"HF_TOKEN\"))'\n")
    script.chmod(0o755)
    return script


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_parent_killed_while_other_threads_run(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import threading
        from quantkit.procs import run_python

        def spin():
            while True:
                sum(range(1000))

        # Busy threads in the parent, as a build has (progress, memory sampling): the fork happens among them.
        for _ in range(4):
            threading.Thread(target=spin, daemon=True).start()
        run_python(["-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"])
    """)], cwd=REPO)
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert parent.poll() is None and time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()
        if child and _alive(child):  # a failed test leaves no orphan either
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie is dead, whoever reaps it


def test_the_llama_cpp_source_is_pinned_by_sha256(tmp_path, monkeypatch):
    from quantkit.errors import ToolError
    from quantkit.formats.gguf.llamacpp import SDIST_SHA256, _sdist
    from quantkit.paths import cache_dir

    # The version the project installs is pinned, and setup.sh reads the same hash as quantkit.
    pyproject = (REPO / "pyproject.toml").read_text()
    [version] = [v for v in SDIST_SHA256 if f'"llama-cpp-python=={v}"' in pyproject]
    script = subprocess.run(["bash", "-c", "set -eu; eval \"$(sed -n '/^LLAMA_VERSION=/p;/^LLAMA_SHA256=/,/^fi$/p' "
                             "scripts/setup.sh)\"; echo \"$LLAMA_VERSION $LLAMA_SHA256\""],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert script.stdout.split() == [version, SDIST_SHA256[version]]

    real = cache_dir() / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not real.exists():
        pytest.skip(f"no cached llama-cpp-python {version} sdist (./scripts/setup.sh leaves one)")
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "sdist" / real.name
    cached.parent.mkdir(parents=True)
    shutil.copyfile(real, cached)
    assert _sdist(version) == cached  # PyPI's own file

    with open(cached, "r+b") as f:  # one byte changed, the size kept
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ToolError) as e:
        _sdist(version)
    assert str(e.value).startswith(f"the cached llama-cpp-python {version} source has sha256 ")
    assert str(e.value).endswith(f"not PyPI's {SDIST_SHA256[version][:16]}…; it was deleted")
    assert "--llama-cpp PATH" in e.value.hint
    assert not cached.exists()  # no later run extracts the converter from it

    with pytest.raises(ToolError) as e:
        _sdist("0.0.1")
    assert str(e.value) == ("quantkit has no sha256 for the llama-cpp-python 0.0.1 source, so it cannot check the "
                            "llama.cpp converter it would run")
    assert e.value.hint.startswith("pass --llama-cpp PATH to a llama.cpp checkout, or add that version's sdist sha256")
    assert not list((tmp_path / "cache" / "sdist").iterdir())  # nothing was downloaded
