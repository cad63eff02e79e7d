"""Bad input: one clear line, the fix, a non-zero exit, and nothing half-written."""

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import PROFILES, run_cli


def _error_lines(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert len(lines) == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines


def _copy_sample(sample_model, dst, *, weights=True):
    dst.mkdir()
    for p in sample_model.iterdir():
        if p.suffix != ".safetensors" or weights:
            (dst / p.name).symlink_to(p) if p.suffix == ".safetensors" else shutil.copy(p, dst / p.name)
    return dst


def _assert_nothing_written(out):
    assert not list(out.rglob("*.gguf")) and not list(out.rglob("*.partial"))


def test_missing_config_json(sample_model, tmp_path):
    src = _copy_sample(sample_model, tmp_path / "m")
    (src / "config.json").unlink()
    proc = run_cli("build", src, "--out", tmp_path / "out")
    assert proc.returncode == 3
    err, fix = _error_lines(proc)
    assert "no config.json" in err and "config.json" in fix
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture(sample_model, tmp_path):
    src = _copy_sample(sample_model, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("build", src, "--out", tmp_path / "out")
    assert proc.returncode == 3
    err, _ = _error_lines(proc)
    assert "FrobnicatorForCausalLM is not supported by llama.cpp's converter" in err
    _assert_nothing_written(tmp_path / "out")


def test_pickle_only_checkpoint_is_refused(sample_model, tmp_path):
    src = _copy_sample(sample_model, tmp_path / "m", weights=False)
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    proc = run_cli("build", src, "--out", tmp_path / "out")
    assert proc.returncode == 3
    err, fix = _error_lines(proc)
    assert "pickle" in err and "--allow-pickle" in fix


def test_custom_code_is_refused_without_trust_remote_code(sample_model, tmp_path):
    src = _copy_sample(sample_model, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("plan", src)
    assert proc.returncode == 3
    assert "--trust-remote-code" in _error_lines(proc)[1]


def test_unknown_quant_type_in_a_profile(sample_model, tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("backends:\n  gguf:\n    types: [Q4_K_M, Q4_K_X]\n")
    proc = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out")
    assert proc.returncode == 4
    err, fix = _error_lines(proc)
    assert "unknown quant type 'Q4_K_X'" in err and "Q4_K_M" in fix
    _assert_nothing_written(tmp_path / "out")


def test_unknown_profile_name(sample_model):
    proc = run_cli("plan", sample_model, "--profile", "no-such-profile")
    assert proc.returncode == 4
    assert "gguf-standard" in _error_lines(proc)[1]


class _HubThatKnowsNoRepo(BaseHTTPRequestHandler):
    """Answers every request the way the Hub answers for a repo that does not exist."""

    def do_GET(self):
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_unknown_hub_repo(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubThatKnowsNoRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        proc = run_cli("build", "nobody/no-such-model", "--out", tmp_path / "out",
                       env={"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "QUANTKIT_CACHE": str(tmp_path / "c")})
    finally:
        server.shutdown()
    assert proc.returncode == 3
    err, fix = _error_lines(proc)
    assert err == f"error: repo nobody/no-such-model not found on {endpoint}"
    assert "HF_TOKEN" in fix
    _assert_nothing_written(tmp_path / "out")


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_not_enough_disk_space(sample_model, small_disk):
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", small_disk)
    assert proc.returncode == 5
    err, fix = _error_lines(proc)
    assert "not enough disk space" in err and "MB free" in err and "--out" in fix
    _assert_nothing_written(small_disk)
