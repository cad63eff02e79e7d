"""The backend registry: built-in backends, and third-party ones through the `quantkit.backends` entry point."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import TESTS, run_cli


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The tiny plugin really installed (pip, from its folder) into a directory put on PYTHONPATH."""
    target = tmp_path_factory.mktemp("plugin")
    source = tmp_path_factory.mktemp("plugin-src") / "tinybackend"
    shutil.copytree(TESTS / "fixtures" / "tinybackend", source)  # pip writes build/ next to the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return {"PYTHONPATH": str(target)}


def test_backends_lists_gguf_with_what_it_uses():
    out = run_cli("backends", check=True).stdout
    assert "gguf" in out and "available (package llama-cpp-python 0.3.36, package gguf" in out


def test_entry_point_backends_are_listed_with_their_missing_needs(plugin_path):
    out = run_cli("backends", env=plugin_path, check=True).stdout.splitlines()
    assert any(l.startswith("tiny ") and "available" in l for l in out)
    assert any(l.startswith("needy ") and "missing: package frobnicate-kernels (pip install frobnicate-kernels)" in l
               for l in out)


def test_third_party_backend_plans_beside_gguf(plugin_path, sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("backends:\n  gguf:\n    types: [Q8_0]\n  tiny: {}\n")
    out = run_cli("plan", sample_model, "--profile", profile, env=plugin_path, check=True).stdout
    assert "SmolLM2-135M-Instruct-Q8_0.gguf" in out and "SmolLM2-135M-Instruct-tiny.json" in out


def test_a_backend_with_missing_needs_is_refused_before_any_work(plugin_path, sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("backends:\n  gguf:\n    types: [Q8_0]\n  needy: {}\n")
    proc = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out", env=plugin_path)
    assert proc.returncode == 4
    assert "error: backend needy needs package frobnicate-kernels" in proc.stderr
    assert "fix: pip install frobnicate-kernels" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_backend(sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("backends:\n  gptqq: {}\n")
    proc = run_cli("plan", sample_model, "--profile", profile)
    assert proc.returncode == 4 and "unknown backend 'gptqq'" in proc.stderr


def test_third_party_artifact_is_built_and_reported(plugin_path, sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("backends:\n  gguf:\n    types: [Q8_0]\n  tiny: {}\n"
                       "evaluation:\n  ctx: 256\n  max_tokens: 512\n")
    run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out", env=plugin_path, check=True)
    folder = tmp_path / "out" / sample_model.name
    report = json.loads((folder / "report.json").read_text())
    tiny = next(a for a in report["artifacts"] if a["backend"] == "tiny")
    assert (folder / tiny["filename"]).read_text() == (sample_model / "config.json").read_text()
    assert tiny["evaluation"] is None  # no evaluation runner for it; the GGUF ones were evaluated
    assert all(a["evaluation"] for a in report["artifacts"] if a["backend"] == "gguf")
    assert f"| {tiny['filename']} | TINY COPY |" in (folder / "report.md").read_text()
