"""EXL2 through exllamav2: refused, or skipped when the profile says so, on a machine without CUDA,
without breaking the other backends; on a CUDA machine, the sample's bitrate ladder end to end."""

import json
import subprocess
import sys

import pytest

from conftest import PROFILES, REPO, run_cli, seed
from quantkit.gpus import cuda_devices

CUDA = cuda_devices() > 0
no_cuda_only = pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU; these tests are for machines without one")


def _profile(tmp_path, when):
    path = tmp_path / f"exl2-{when}.yaml"
    path.write_text("formats:\n  gguf: {types: [Q8_0]}\n"
                    f"  exl2: {{bits: [4.0], if_unavailable: {when}}}\n"
                    "evaluation: {ctx: 256, max_tokens: 512}\nsmoke: {allow_failures: true}\n"
                    "chat_checks: {enabled: false}\n")  # as tests/profiles/tiny.yaml: the seed's evaluations stand
    return path


@no_cuda_only
def test_exl2_is_refused_without_cuda_and_nothing_is_built(sample_model, tmp_path):
    proc = run_cli("build", sample_model, "--profile", _profile(tmp_path, "fail"), "--out", tmp_path / "out")
    assert proc.returncode == 4, proc.stderr
    err, fix = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert err.startswith("error: format exl2 needs") and "a CUDA GPU" in err
    assert "EXL2 needs a CUDA GPU" in fix and "if_unavailable: skip" in fix
    assert not (tmp_path / "out").exists()
    # Planned for a machine that has one (plan --gpu), the same profile plans its EXL2 steps there.
    plan = run_cli("plan", sample_model, "--profile", _profile(tmp_path, "fail"), "--gpu", "80G", check=True).stdout
    assert "gpu: 2 step(s) run on a GPU of 80.0 GB: SmolLM2-135M-Instruct-exl2-measurement.json, " \
           "SmolLM2-135M-Instruct-exl2-4.0bpw-h6" in plan


@no_cuda_only
def test_exl2_is_skipped_when_the_profile_says_so(sample_model, tiny_seed, tmp_path):
    out = tmp_path / "out"
    seed(tiny_seed, out)  # the GGUF side of this profile is the tiny one: built and scored already
    proc = run_cli("build", sample_model, "--profile", _profile(tmp_path, "skip"), "--out", out, check=True)
    assert "warning: exl2: format exl2 needs" in proc.stderr and "skipped (if_unavailable: skip)" in proc.stderr
    report = json.loads((out / sample_model.name / "report.json").read_text())
    assert {a["backend"] for a in report["artifacts"]} == {"gguf"}
    assert all(a["evaluation"]["perplexity"] > 1 for a in report["artifacts"])
    plan = run_cli("plan", sample_model, "--profile", _profile(tmp_path, "skip"), check=True)
    assert "skipped  exl2: format exl2 needs" in plan.stdout


def test_exl2_backend_lists_what_it_needs():
    line = next(l for l in run_cli("formats", check=True).stdout.splitlines() if l.startswith("exl2"))
    assert ("available" if CUDA else "missing: ") in line
    if not CUDA:
        assert "a CUDA GPU" in line


def test_planning_never_imports_exllamav2(sample_model, tmp_path):
    """exllamav2 compiles its CUDA extension on import; quantkit imports it only in EXL2's child processes."""
    code = ("import sys; from quantkit.build import make_plan; "
            f"make_plan({str(sample_model)!r}, {str(_profile(tmp_path, 'skip'))!r}, {str(tmp_path)!r}); "
            "from quantkit import formats; [formats.get(n).requirements() for n in formats.names()]; "
            "assert 'exllamav2' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine: the EXL2 ladder runs only where a GPU is lent")
def test_exl2_ladder_on_a_gpu(sample_model, tmp_path):
    out = tmp_path / "out"
    run_cli("build", sample_model, "--profile", PROFILES / "exl2.yaml", "--out", out, check=True)
    folder = out / sample_model.name
    report = json.loads((folder / "report.json").read_text())
    exl2 = [a for a in report["artifacts"] if a["backend"] == "exl2" and a["role"] == "model"]
    assert [a["variant"] for a in exl2] == ["3.0bpw-h6", "4.0bpw-h6", "6.0bpw-h6", "8.0bpw-h6"]
    assert (folder / f"{sample_model.name}-exl2-measurement.json").exists()
    for a in exl2:
        cfg = json.loads((folder / a["filename"] / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "exl2"
        assert (folder / a["filename"] / "tokenizer_config.json").exists()
    # exllamav2 reproduced the fp16 source before it quantized it (its parity preflight).
    preflight = next(p for p in report["parity"] if p["runtime"].startswith("exllamav2"))
    assert preflight["passed"] and preflight["kld_mean"] < 0.01, preflight
    # Absolute bounds (issue 14), not an ordering: garbage passes "KLD falls as bits rise".
    by = {a["variant"]: a for a in exl2}
    assert by["4.0bpw-h6"]["evaluation"]["kld_mean"] < 0.25
    assert by["6.0bpw-h6"]["evaluation"]["kld_mean"] < 0.05
    assert by["8.0bpw-h6"]["evaluation"]["kld_mean"] < 0.02
    assert by["8.0bpw-h6"]["evaluation"]["smoke_passed"], by["8.0bpw-h6"]["evaluation"]["smoke_reply"]
    for a in exl2:
        assert abs(a["size_bytes"] / a["predicted_bytes"] - 1) < 0.03, (a["variant"], a["size_bytes"], a["predicted_bytes"])
    print(json.dumps([{k: a[k] for k in ("variant", "size_bytes", "predicted_bytes", "bits_per_weight", "seconds")} | {
        k: a["evaluation"][k] for k in ("perplexity", "kld_mean", "top1_agreement", "smoke_passed", "seconds")}
        for a in exl2], indent=1))


def test_calibration_parquet_is_what_exllamav2_reads(tmp_path):
    """The part of the EXL2 build that runs anywhere: our calibration text as exllamav2's parquet rows."""
    pandas = pytest.importorskip("pandas")
    from quantkit.evaluate.text import CALIBRATION

    out = tmp_path / "cal.parquet"
    subprocess.run([sys.executable, "-m", "quantkit.formats.exl2.tool", "parquet", str(CALIBRATION["botchan"]),
                    str(out)], check=True, cwd=REPO)
    df = pandas.read_parquet(out, engine="fastparquet")  # exactly how exllamav2's tokenize.py reads it
    text = CALIBRATION["botchan"].read_text(encoding="utf-8")
    assert list(df.columns) == ["text"] and len(df) > 50
    assert df["text"].iloc[0] in text and df["text"].iloc[-1] in text


def test_a_waves_exl2_bitrates_share_one_run_and_other_steps_keep_their_own():
    """The ladder in one exllamav2 process (issue 26): the executors hand EXL2's bitrates of a wave to one
    build_many, in one run (one Ray task), where the first of them stood; every other step keeps a run of its own."""
    from quantkit.executors import runs_of
    from quantkit.plan import ArtifactPlan

    def step(backend, variant):
        return ArtifactPlan(backend=backend, variant=variant, filename=f"m-{backend}-{variant}", predicted_bytes=1)

    wave = [step("gguf", "Q4_K_M"), step("exl2", "3.0bpw-h6"), step("gguf", "Q8_0"), step("exl2", "4.0bpw-h6"),
            step("gptq", "4bit-g128"), step("exl2", "8.0bpw-h8")]
    assert [[i.filename for i in run] for run in runs_of(wave)] == [
        ["m-gguf-Q4_K_M"], ["m-exl2-3.0bpw-h6", "m-exl2-4.0bpw-h6", "m-exl2-8.0bpw-h8"], ["m-gguf-Q8_0"],
        ["m-gptq-4bit-g128"]]


@no_cuda_only
def test_the_ladder_without_cuda_stops_with_its_cause_and_leaves_no_folder(sample_model, tmp_path):
    """EXL2Format.build_many's side of the one-process ladder, as far as a machine without CUDA takes it: the real
    child refuses, and the build says which bitrates were not made and why, with nothing half-written left."""
    from quantkit import formats
    from quantkit.errors import ToolError
    from quantkit.progress import Reporter
    from quantkit.source import resolve

    fmt = formats.get("exl2")
    source = resolve(str(sample_model))
    _, *rates = fmt.plan(source, fmt.read_options({"bits": [3.0, 4.0]}))
    context = formats.BuildContext(source=source, out_dir=tmp_path, reporter=Reporter(quiet=True), threads=1)
    with pytest.raises(ToolError) as e:
        list(fmt.build_many(rates, context))
    assert str(e.value) == ("exllamav2 did not make 3.0bpw-h6, 4.0bpw-h6 (exllamav2 (the EXL2 ladder) failed (exit "
                            "code 3): error: exllamav2's converter needs a CUDA GPU and torch sees none)")
    assert "  fix: run the EXL2 steps on a machine with one" in e.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".quantkit"]
    spec = json.loads((tmp_path / ".quantkit" / "exl2-ladder.json").read_text())
    assert [r["variant"] for r in spec["rates"]] == ["3.0bpw-h6", "4.0bpw-h6"]
    assert spec["rates"][1]["args"][-8:] == ["-b", "4.0", "-hb", "6", "-r", "100", "-l", "2048"]
