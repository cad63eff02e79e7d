"""The format registry: the built-in formats, one folder each, and third-party formats through the
`quantkit.formats` entry point: built, evaluated by their own runner and published with their own card text."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from huggingface_hub import HfApi, ModelCard, hf_hub_download

from conftest import TESTS, TOKEN, run_cli


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The tiny plugin really installed (pip, from its folder) into a directory put on PYTHONPATH."""
    target = tmp_path_factory.mktemp("plugin")
    source = tmp_path_factory.mktemp("plugin-src") / "tinyformat"
    shutil.copytree(TESTS / "fixtures" / "tinyformat", source)  # pip writes build/ next to the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return {"PYTHONPATH": str(target)}


def test_backends_lists_gguf_with_what_it_uses():
    out = run_cli("backends", check=True).stdout
    assert "gguf" in out and "available (package llama-cpp-python 0.3.36, package gguf" in out


def test_the_core_names_no_format():
    """Only quantkit/formats/ knows a format by name; the core asks the format."""
    pkg = TESTS.parent / "quantkit"
    named = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py") if "formats" not in p.relative_to(pkg).parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r'"(gguf|gptq|awq|exl2|mlx)"', line)]
    assert named == []


def test_entry_point_backends_are_listed_with_their_missing_needs(plugin_path):
    out = run_cli("backends", env=plugin_path, check=True).stdout.splitlines()
    assert any(l.startswith("tiny ") and "available" in l for l in out)
    assert any(l.startswith("needy ") and "missing: package frobnicate-kernels (pip install frobnicate-kernels)" in l
               for l in out)


def test_third_party_backend_plans_beside_gguf(plugin_path, sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("backends:\n  gguf:\n    types: [Q8_0]\n  tiny: {}\n")
    out = run_cli("plan", sample_model, "--profile", profile, env=plugin_path, check=True).stdout
    assert "SmolLM2-135M-Instruct-Q8_0.gguf" in out and "SmolLM2-135M-Instruct-tiny " in out


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


def test_third_party_format_is_built_evaluated_and_published(plugin_path, sample_model, hub, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("backends:\n  gguf:\n    types: [Q8_0]\n  tiny: {}\n"
                       "evaluation:\n  ctx: 256\n  max_tokens: 512\npublish:\n  owner: alice\n")
    env = {**plugin_path, **hub.env}
    run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out", env=env, check=True)
    folder = tmp_path / "out" / sample_model.name
    report = json.loads((folder / "report.json").read_text())
    tiny = next(a for a in report["artifacts"] if a["backend"] == "tiny")
    assert (folder / tiny["filename"] / "config.json").read_text() == (sample_model / "config.json").read_text()
    # Measured by its own runner, against the same reference as the GGUF file: a 16-bit copy of the source.
    e = tiny["evaluation"]
    assert e["note"] == "scored by the tiny runner" and e["tokens_scored"] == 254
    assert e["kld_mean"] < 0.01 and e["top1_agreement"] > 0.95 and e["smoke_passed"]
    assert tiny["integrity"] == []  # its tokenizer files are the source's
    assert all(a["evaluation"] for a in report["artifacts"] if a["backend"] == "gguf")
    assert f"| {tiny['filename']} | TINY COPY |" in (folder / "report.md").read_text()

    proc = run_cli("publish", folder, env=env, check=True)
    assert "alice/SmolLM2-135M-Instruct-TINY@COPY" in proc.stdout
    card = ModelCard.load(hf_hub_download("alice/SmolLM2-135M-Instruct-TINY", "README.md", endpoint=hub.endpoint,
                                          token=TOKEN, cache_dir=tmp_path / "dl"))
    assert "tiny-runtime" in card.data.tags and "tiny" in card.data.tags
    assert "made with quantkit" in card.text and "using tinyformat's copier. They load in tiny-runtime." in card.text
    assert "tiny-run SmolLM2-135M-Instruct-TINY-COPY" in card.text and "a tiny copy" in card.text
    files = {f.rfilename for f in HfApi(endpoint=hub.endpoint, token=TOKEN).model_info(
        "alice/SmolLM2-135M-Instruct-TINY", revision="COPY", files_metadata=True).siblings}
    assert {p.name for p in (folder / tiny["filename"]).iterdir()} <= files
