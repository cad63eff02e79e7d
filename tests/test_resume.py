"""Resuming: kill -9 mid-write, a deleted or damaged artifact, a build folder moved elsewhere, an edited calibration
text, and build folders written by another version of quantkit."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import PROFILES, REPO, TESTS, report, run_cli, seed


def _start_build(sample_model, out):
    return subprocess.Popen([sys.executable, "-m", "quantkit", "build", str(sample_model), "--profile",
                             str(PROFILES / "tiny.yaml"), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file() or p.is_dir()}


def test_kill_9_during_a_write_leaves_no_partial_file_under_a_final_name(sample_model, tiny_seed, tmp_path):
    folder = seed(tiny_seed, tmp_path)
    for gguf in folder.glob("*.gguf"):  # both files are made again; their evaluations are on record
        gguf.unlink()
    proc = _start_build(sample_model, tmp_path)
    deadline = time.monotonic() + 300
    partial = []
    while time.monotonic() < deadline and not partial and proc.poll() is None:
        partial = list(folder.glob("*.gguf.*.partial"))
        time.sleep(0.02)
    assert partial, "the build finished or failed before a .gguf was being written"
    os.killpg(proc.pid, signal.SIGKILL)  # the converter/quantizer child dies with it
    proc.wait()
    time.sleep(0.5)
    # Whatever is under a final .gguf name is complete: the one being written is still .partial.
    assert partial[0].name.split(".gguf.")[0] + ".gguf" not in {p.name for p in folder.glob("*.gguf")}

    resumed = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    assert "left by an interrupted run" in resumed.stderr
    assert not list(folder.glob("*.partial")) and not list((folder / ".quantkit").glob("*.partial"))
    assert sorted(p.name for p in folder.glob("*.gguf")) == [f"{sample_model.name}-F16.gguf", f"{sample_model.name}-Q8_0.gguf"]
    # llama.cpp's converter and quantizer are deterministic: the remade files are the evaluated ones, byte for
    # byte, so their evaluations (keyed by content) stand.
    assert "built 2, evaluated 0" in resumed.stdout, resumed.stdout[-1500:]


def test_a_deleted_or_damaged_artifact_is_rebuilt_and_nothing_else(sample_model, tiny_seed, tmp_path):
    folder = seed(tiny_seed, tmp_path)
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


def test_a_moved_build_folder_resumes_with_nothing_made_or_scored_again(sample_model, tiny_seed, tmp_path):
    """The folder a build wrote, moved to another place (a shared disk mounted elsewhere, a Ray node's view)."""
    first = seed(tiny_seed, tmp_path / "here")
    moved = tmp_path / "mounted" / "elsewhere" / first.name
    moved.parent.mkdir(parents=True)
    os.rename(first, moved)
    before = _mtimes(moved)
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", moved.parent, check=True)
    assert "built 0, evaluated 0" in proc.stdout, proc.stdout[-1500:]
    assert all(f"✓ {p.name} (up to date)" in proc.stderr for p in moved.glob("*.gguf"))
    after = _mtimes(moved)
    assert {k: v for k, v in after.items() if k.endswith(".gguf")} == {k: v for k, v in before.items() if k.endswith(".gguf")}
    assert [a["evaluation"] for a in report(moved)["artifacts"]] == [a["evaluation"] for a in report(tiny_seed)["artifacts"]]
    # The manifest names files of the folder by their place in it, and nothing by where the folder is.
    manifest = (moved / ".quantkit" / "manifest.json").read_text()
    assert str(tmp_path) not in manifest and str(tiny_seed.parent) not in manifest
    assert any(k.startswith("./") and k.endswith("-Q8_0.gguf") for k in json.loads(manifest)["hashes"])


def test_an_edited_calibration_text_remakes_the_importance_matrix_and_only_what_uses_it(sample_model, files_seed,
                                                                                         tmp_path):
    from quantkit.evaluate.text import CALIBRATION

    text = tmp_path / "calibration.txt"
    text.write_text(CALIBRATION["botchan"].read_text(encoding="utf-8"), encoding="utf-8")
    profile = tmp_path / "imatrix.yaml"
    profile.write_text(f"formats:\n  gguf:\n    imatrix: {{text: {text}, chunks: 2, ctx: 256}}\n"
                       "    types: [Q4_K_M, {type: Q8_0, imatrix: false}]\nevaluation:\n  enabled: false\n")
    folder = seed(files_seed, tmp_path)
    name = sample_model.name
    imatrix, q4, q8, f16 = (folder / f"{name}.imatrix.gguf", folder / f"{name}-Q4_K_M.gguf", folder / f"{name}-Q8_0.gguf",
                            folder / f"{name}-F16.gguf")
    run_cli("build", sample_model, "--profile", profile, "--out", tmp_path, check=True)
    assert {a["variant"]: a["uses"] for a in report(folder)["artifacts"]}["Q4_K_M"] == [imatrix.name]
    again = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path, check=True)
    assert "built 0," in again.stdout  # unchanged text: nothing is made again
    kept = {p: p.stat().st_mtime_ns for p in (f16, q8)}
    remade = {p: p.stat().st_mtime_ns for p in (imatrix, q4)}

    text.write_text("A line the first calibration chunk now starts with.\n" + text.read_text(encoding="utf-8"),
                    encoding="utf-8")
    proc = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path, check=True)
    assert "built 2," in proc.stdout, proc.stdout[-1500:]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "a file that does not use the text was made again"
    assert all(p.stat().st_mtime_ns != t for p, t in remade.items())
    by = {a["variant"]: a for a in report(folder)["artifacts"]}
    assert by["imatrix"]["tools"]["llama-imatrix"] and by["Q4_K_M"]["tools"]["llama-cpp-python"]


def test_a_manifest_of_the_previous_schema_is_read(sample_model, tiny_seed, tmp_path):
    """tests/fixtures/manifest-v1.json was written by quantkit before this schema (commit 2ccfa23, tiny profile):
    its artifact and evaluation keys were made another way, so those steps are done again; the tokens are kept."""
    folder = seed(tiny_seed, tmp_path)
    state = folder / ".quantkit"
    old = json.loads((TESTS / "fixtures" / "manifest-v1.json").read_text())
    # The tokens' key is the same in both schemas, made of the sample's files, and the sample's config.json records the
    # transformers that rebuilt it on this machine (the fixture's: 5.24.0): the key this sample gives, as that
    # quantkit would have written it.
    old["steps"]["tokens"]["key"] = json.loads((state / "manifest.json").read_text())["steps"]["tokens"]["key"]
    (state / "manifest.json").write_text(json.dumps(old))
    tokens = state / "eval-tokens.npy"
    tokens_mtime = tokens.stat().st_mtime_ns
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    assert "Traceback" not in proc.stderr
    assert "was built by an older quantkit (manifest schema 1, now 2)" in proc.stderr
    assert "built 2, evaluated 3" in proc.stdout, proc.stdout[-1500:]
    assert tokens.stat().st_mtime_ns == tokens_mtime  # the same text and tokenizer: the same step, kept
    assert json.loads((state / "manifest.json").read_text())["version"] == 2
    assert [a["evaluation"]["kld_mean"] for a in report(folder)["artifacts"]] == \
        [a["evaluation"]["kld_mean"] for a in report(tiny_seed)["artifacts"]]
    again = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path, check=True)
    assert "built 0, evaluated 0" in again.stdout


def test_a_folder_built_by_a_newer_quantkit_is_refused_untouched(sample_model, tiny_seed, tmp_path):
    folder = seed(tiny_seed, tmp_path)
    manifest = folder / ".quantkit" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    before = manifest.read_text()
    proc = run_cli("build", sample_model, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path)
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
    assert f"error: {folder} was built by a newer quantkit (manifest schema 99; this one reads up to 2)" in proc.stderr
    assert "fix: upgrade quantkit, or build into another --out" in proc.stderr
    assert manifest.read_text() == before
