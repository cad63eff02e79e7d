"""Bad input: one clear line, the fix, a non-zero exit, and nothing half-written."""

import json
import re
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


def test_a_pre_tokenizer_the_converter_does_not_know_is_refused_at_plan_time(sample_model, tmp_path):
    """A new model family's BPE pre-tokenizer (issue 27): here the sample's byte-level one with punctuation split
    off first, which changes how the converter's fixed text tokenizes, so its hash, to one llama.cpp does not list
    (splitting digits first instead gives SmolLM's own, which it does)."""
    src = _copy_sample(sample_model, tmp_path / "m")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Isolated"}, tok["pre_tokenizer"]]}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    proc = run_cli("build", src, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path / "out")  # it plans first
    assert proc.returncode == 3, proc.stderr
    err, fix = _error_lines(proc)
    assert re.fullmatch(r"error: llama\.cpp's converter \(llama-cpp-python [\d.]+\) does not know m's BPE "
                        r"pre-tokenizer \(hash [0-9a-f]{64}\), so a GGUF of it would split text as no runtime "
                        r"expects", err), err
    assert fix.startswith("  fix: build with a newer llama.cpp") and "--llama-cpp PATH" in fix
    assert not (tmp_path / "out").exists()  # refused before the build made its folder


def test_pickle_only_checkpoint_is_refused(sample_model, tmp_path):
    src = _copy_sample(sample_model, tmp_path / "m", weights=False)
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    proc = run_cli("build", src, "--out", tmp_path / "out")
    assert proc.returncode == 3
    err, fix = _error_lines(proc)
    assert "pickle" in err and "--allow-pickle" in fix


def test_custom_code_is_refused(sample_model, tmp_path):
    src = _copy_sample(sample_model, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("plan", src)
    assert proc.returncode == 3
    err, fix = _error_lines(proc)
    assert "quantkit does not run a model's own code" in err and "natively" in fix  # tests/test_flags.py: the rest


def test_unknown_quant_type_in_a_profile(sample_model, tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("formats:\n  gguf:\n    types: [Q4_K_M, Q4_K_X]\n")
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


# More bad input, each with its one-line cause, its exit code, and nothing written. Sources are
# copies of the sample with one thing broken.

def _broken(sample_model, tmp_path, how):
    src = _copy_sample(sample_model, tmp_path / "m")
    weights = src / "model.safetensors"
    if how == "corrupt-header":
        weights.unlink()
        data = (sample_model / "model.safetensors").read_bytes()
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    elif how == "truncated":
        weights.unlink()
        with open(sample_model / "model.safetensors", "rb") as f:
            weights.write_bytes(f.read(50_000_000))
    elif how == "config-invalid":
        (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    elif how == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
            (src / name).unlink(missing_ok=True)
    return src


@pytest.mark.parametrize("how, message", [
    ("corrupt-header", "model.safetensors has a corrupt safetensors header"),
    ("truncated", "model.safetensors is truncated: 50000000 bytes, its header needs 269"),
    ("config-invalid", "config.json is not valid JSON (Expecting"),
    ("no-tokenizer", "has no tokenizer (tokenizer.json or tokenizer.model)"),
])
def test_broken_checkpoints(sample_model, tmp_path, how, message):
    src = _broken(sample_model, tmp_path, how)
    proc = run_cli("build", src, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path / "out")
    assert proc.returncode == 3, proc.stderr
    err, fix = _error_lines(proc)
    assert message in err and fix.strip() != "fix:", (err, fix)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("profile, code, message", [
    ("formats: {gptq: {variants: [{bits: 4, group_size: 128}]}}", 4, "group size 128 does not divide the layer widths [576]"),
    ("formats: {exl2: {bits: [4.0, 9.5]}}", 4, "exl2: 9.5 bits per weight is out of range"),
    ("formats: {exl2: {bits: [4.0, {bits: 8.0, head: 8}]}}", 4, "exl2.bits[1]: unknown key(s) ['head']"),
    ("formats: {exl2: {bits: [{bits: 8.0, head_bits: 7}]}}", 4, "exl2: head_bits 7 is not supported"),
    ("formats: {gguf: {types: [Q8_0]}}\nevaluation: {window: 512, max_tokens: 600}", 4,
     "evaluation.max_tokens 600 is less than two windows of 512"),
    ("formats: {gguf: {types: [Q8_0]}\n", 4, "is not valid YAML"),
    ("formats: {gguf: {types: [Q8_0]}}\nevaluaton: {window: 512}", 4, "unknown profile key(s) ['evaluaton']"),
])
def test_bad_profiles(sample_model, tmp_path, profile, code, message):
    if "gptq" in profile:
        pytest.importorskip("gptqmodel", reason="the gptq extra is not installed")
    path = tmp_path / "bad.yaml"
    path.write_text(profile + "\n")
    proc = run_cli("build", sample_model, "--profile", path, "--out", tmp_path / "out")
    assert proc.returncode == code, proc.stderr
    assert message in _error_lines(proc)[0]
    _assert_nothing_written(tmp_path / "out")


def test_output_folder_not_writable(sample_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", blocker / "builds")
    assert proc.returncode == 5
    err, fix = _error_lines(proc)
    assert err.startswith("error: cannot write to the output folder") and "--out" in fix


def test_evaluation_text_too_short_fails_before_building(sample_model, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("A short text of a few words. " * 20)
    profile = tmp_path / "short.yaml"
    profile.write_text(f"formats: {{gguf: {{types: [Q8_0]}}}}\nevaluation: {{text: {text}, window: 512, max_tokens: 0}}\n")
    proc = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out")
    assert proc.returncode == 4
    err, fix = _error_lines(proc)
    assert "fewer than two windows of 512" in err and "longer text" in fix
    _assert_nothing_written(tmp_path / "out")


def test_missing_chat_template_is_reported_by_the_smoke_test(sample_model, tmp_path):
    src = _copy_sample(sample_model, tmp_path / "m")
    (src / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    profile = tmp_path / "tiny-allow.yaml"
    profile.write_text((PROFILES / "tiny.yaml").read_text() + "smoke:\n  allow_failures: true\n")
    proc = run_cli("build", src, "--profile", profile, "--out", tmp_path / "out", check=True)
    report = json.loads((tmp_path / "out" / "m" / "report.json").read_text())
    reasons = {a["variant"]: a["evaluation"]["smoke_reason"] for a in report["artifacts"]}
    assert reasons == {"F16": "the GGUF has no tokenizer.chat_template", "Q8_0": "the GGUF has no tokenizer.chat_template"}
    assert report["prompt_format"] is None and "smoke test failed" in proc.stderr


# Numbers of the evaluation that cannot work are refused when the profile is read, naming the key, instead of a
# ZeroDivisionError's crash log or a runtime's failure halfway through a build.
@pytest.mark.parametrize("section, message", [
    ("evaluation: {window: 0}", "evaluation.window must be between 16 and 1048576 tokens, got 0"),
    ("evaluation: {window: -512}", "evaluation.window must be between 16 and 1048576 tokens, got -512"),
    ("evaluation: {ctx: 4}", "evaluation.window must be between 16 and 1048576 tokens, got 4"),  # its old name
    ("evaluation: {window: 100000000000}", "evaluation.window must be between 16 and 1048576 tokens, got 100000000000"),
    ("evaluation: {max_tokens: -1}", "evaluation.max_tokens must be 0 (the whole text) or a token count, got -1"),
    ("evaluation: {window: 256, max_tokens: 300}", "evaluation.max_tokens 300 is less than two windows of 256"),
    ("smoke: {max_tokens: 0}", "smoke.max_tokens must be between 1 and 2048 tokens, got 0"),
    ("chat_checks: {max_tokens: 100000}", "chat_checks.max_tokens must be between 1 and 2048 tokens, got 100000"),
])
def test_impossible_evaluation_numbers(tmp_path, section, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"formats: {{gguf: {{types: [Q8_0]}}}}\n{section}\n")
    proc = run_cli("plan", "--sample", "--profile", path)
    assert proc.returncode == 4, proc.stderr
    err, fix = _error_lines(proc)
    assert err == f"error: {path}: {message}"
    assert "crash" not in fix


def test_a_model_without_eos_is_scored_and_the_smoke_test_says_why(sample_model, tmp_path):
    """No EOS anywhere (config, generation config, tokenizer): the reference still scores, its replies run to their
    cap, and the smoke test's reason names the missing token (it was a ValueError from min() of no ids)."""
    import numpy as np

    from quantkit.evaluate.text import load_text
    from quantkit.procs import run_python

    src = _copy_sample(sample_model, tmp_path / "m")
    for name, keys in (("config.json", ("eos_token_id", "pad_token_id")),
                       ("generation_config.json", ("eos_token_id", "pad_token_id")),
                       ("tokenizer_config.json", ("eos_token", "pad_token"))):
        data = json.loads((src / name).read_text())
        assert any(data.pop(k, None) is not None for k in keys), name
        (src / name).write_text(json.dumps(data))
    text = tmp_path / "text.txt"
    text.write_text(load_text("builtin:botchan")[:20_000], encoding="utf-8")
    run_python(["-m", "quantkit.evaluate.hf_runner", "tokenize", str(src), str(text), str(tmp_path / "all.npy"),
                str(tmp_path / "bos.json")])
    np.save(tmp_path / "tokens.npy", np.load(tmp_path / "all.npy")[:512])
    spec = {"tokens": str(tmp_path / "tokens.npy"), "bos": json.loads((tmp_path / "bos.json").read_text())["bos"],
            "ctx": 256, "reference": True,
            "smoke": {"system": "You are a helpful assistant.", "question": "What is the capital of France?",
                      "expect": "Paris", "max_tokens": 12}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_python(["-m", "quantkit.evaluate.hf_runner", "evaluate", str(src), str(tmp_path / "spec.json"),
                str(tmp_path / "out.json")])
    result = json.loads((tmp_path / "out.json").read_text())
    assert 1 < result["perplexity"] < 1000
    smoke = result["smoke"]
    assert smoke["passed"] is False and smoke["end_token"] is None and "Paris" in smoke["reply"]
    assert smoke["reason"].startswith("the checkpoint names no EOS token")
