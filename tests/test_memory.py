"""Memory: the fp16 reference keeps 16-bit weights and gives the float32 reference's numbers; every step's
peak memory is planned, shown by `quantkit plan`, and a step that cannot fit is refused before any work."""

import json
import sys

import numpy as np
import pytest

from conftest import PROFILES, run_cli
from quantkit.build import make_plan
from quantkit.evaluate.metrics import scored_range
from quantkit.procs import run_python
from quantkit.profiles import SmokeOptions
from quantkit.source import tensor_stats

WINDOWS = 6  # of 512 tokens: 1,530 scored positions


@pytest.fixture(scope="module")
def sample_tokens(sample_model, module_dir):
    tmp = module_dir("ref")
    text = tmp / "text.txt"
    from quantkit.evaluate.text import load_text

    text.write_text(load_text("builtin:botchan"), encoding="utf-8")
    run_python(["-m", "quantkit.evaluate.hf_runner", "tokenize", str(sample_model), str(text), str(tmp / "all.npy"),
                str(tmp / "bos.json")])
    np.save(tmp / "tokens.npy", np.load(tmp / "all.npy")[: WINDOWS * 512])
    return tmp, json.loads((tmp / "bos.json").read_text())["bos"]


def _reference(sample_model, tmp, bos, name, **extra) -> dict:
    from dataclasses import asdict

    spec = {"tokens": str(tmp / "tokens.npy"), "bos": bos, "ctx": 512, "reference": True,
            "smoke": asdict(SmokeOptions(max_tokens=16)), **extra}
    (tmp / f"{name}.spec.json").write_text(json.dumps(spec))
    run_python(["-m", "quantkit.evaluate.hf_runner", "evaluate", str(sample_model), str(tmp / f"{name}.spec.json"),
                str(tmp / f"{name}.json")])
    return json.loads((tmp / f"{name}.json").read_text())


def test_16bit_reference_agrees_with_the_float32_reference(sample_model, sample_tokens):
    tmp, bos = sample_tokens
    old = _reference(sample_model, tmp, bos, "float32", weights="float32", ref_write=str(tmp / "old.npy"))
    # The new reference, scored against the old one's log-probabilities: KL(old || new) per position.
    new = _reference(sample_model, tmp, bos, "stored", ref_read=str(tmp / "old.npy"))
    first, last = scored_range(512)
    assert old["tokens_scored"] == new["tokens_scored"] == WINDOWS * (last - first)
    delta = abs(new["perplexity"] / old["perplexity"] - 1)
    print(f"float32 PPL {old['perplexity']:.4f}, 16-bit PPL {new['perplexity']:.4f}, |dPPL| {100 * delta:.5f}%, "
          f"KLD {new['kld_mean']:.2e}, top-1 {new['top1_agreement']:.4f}; peak RSS {old['peak_rss_bytes'] / 1e9:.2f} GB "
          f"-> {new['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    assert delta < 0.001  # |ΔPPL| < 0.1%
    assert new["kld_mean"] < 1e-4
    assert new["top1_agreement"] > 0.999
    assert new["smoke"]["reply"] == old["smoke"]["reply"] and "Paris" in new["smoke"]["reply"]
    # 16-bit weights: the float32 copy of the model (4 bytes a parameter) is gone.
    params = tensor_stats(sample_model).params
    assert new["peak_rss_bytes"] <= 2.3 * params + 2e9
    assert old["peak_rss_bytes"] - new["peak_rss_bytes"] > 1.5 * params


def test_plan_shows_the_memory_of_every_step(sample_model, tmp_path):
    proc = run_cli("plan", sample_model, "--profile", PROFILES / "fast.yaml", "--out", tmp_path, check=True)
    lines = proc.stdout.splitlines()
    ref = next(line for line in lines if "reference (fp16 source, transformers)" in line)
    assert "peak memory ~" in ref
    for variant in ("F16", "Q2_K", "Q4_K_M", "Q8_0"):
        assert any(f"evaluate SmolLM2-135M-Instruct-{variant}.gguf" in line and "peak memory ~" in line for line in lines)
        assert any(line.strip().startswith("gguf") and f"-{variant}.gguf" in line and "peak memory ~" in line
                   for line in lines)
    assert any(line.startswith("memory: the largest step is") for line in lines)
    plan = make_plan(str(sample_model), str(PROFILES / "fast.yaml"), tmp_path)
    assert [e.target for e in plan.evaluations][0] == "reference"
    assert len(plan.evaluations) == 1 + len([a for a in plan.artifacts if a.is_model])
    assert all(0.2e9 < e.peak_bytes < 3e9 for e in plan.evaluations)  # a 135M model: under 3 GB each


@pytest.mark.parametrize("how", ["env", "option"])
def test_a_step_too_large_for_the_machine_is_refused_up_front(sample_model, tmp_path, how):
    out = tmp_path / "out"
    args = ("--memory", "600M") if how == "option" else ()
    env = {"QUANTKIT_MEMORY": "600M"} if how == "env" else {}
    # tiny.yaml with 10 windows: the GGUF runner decodes 4 at a time, so 3 passes over each file.
    profile = tmp_path / "ten-windows.yaml"
    profile.write_text((PROFILES / "tiny.yaml").read_text().replace("max_tokens: 512", "max_tokens: 2560"))
    for command in ("plan", "build"):
        proc = run_cli(command, sample_model, "--profile", profile, "--out", out, *args, env=env)
        assert proc.returncode == 5, proc.stderr
        err = proc.stderr.strip().splitlines()
        i = next(i for i, line in enumerate(err) if line.startswith("error: "))  # build prints its plan first
        # The conversion's own memory does not fit. The in-memory reference does not either, so the plan streams
        # it (evaluate/streamed.py), which fits; so does the F16 evaluation's own memory: only its memory-mapped
        # file does not stay resident beside it, which is not a refusal but a re-read (printed by the plan).
        assert err[i].startswith("error: convert to SmolLM2-135M-Instruct-F16.gguf needs about 942.5 MB of memory "
                                 "and this machine has 600.0 MB"), err[i]
        assert "reference" not in err[i] and "evaluate" not in err[i], err[i]
        assert err[i + 1].startswith("  fix: build on a machine with at least 942.5 MB")
        if command == "plan":
            assert "reference (fp16 source, transformers, streamed layer by layer)" in proc.stdout
            reread = next(line for line in proc.stdout.splitlines() if "re-reads" in line)
            assert reread.startswith("  re-reads evaluate SmolLM2-135M-Instruct-F16.gguf: 270.9 MB of memory-mapped "
                                     "files do not stay resident beside"), reread
            assert "over 3 passes: at least" in reread and "reference" not in proc.stdout.split("re-reads", 1)[1], reread
        assert "--ray" in err[i + 1] and "evaluation.enabled: false" in err[i + 1]
        assert "Traceback" not in proc.stderr
    assert not out.exists()  # refused before anything was written


def test_evaluation_off_plans_no_reference_and_fits(sample_model, tmp_path):
    proc = run_cli("plan", sample_model, "--profile", PROFILES / "files.yaml", "--out", tmp_path, "--memory", "1.5G",
                   check=True)
    assert "evaluation: off" in proc.stdout and "reference (fp16 source" not in proc.stdout


def test_worker_jobs_are_sized_by_the_plans_formulas(sample_model, tmp_path):
    from quantkit.jobs.watch import job_needs
    from quantkit.profiles import load_profile

    profile = load_profile(str(PROFILES / "fast.yaml"))
    plan = make_plan(str(sample_model), profile, tmp_path)
    heaviest = max(s.peak_bytes for s in plan.memory_steps())
    _, estimate = job_needs(profile, tensor_stats(sample_model).params)
    # From the parameter count alone (the Hub's listing), the job's estimate is the plan's heaviest step, or above
    # it: it assumes a 152k vocabulary, whose logits for the GGUF runner's four windows a decode take 0.9 GB more
    # than the sample's 49k.
    assert heaviest <= estimate < 1.5 * heaviest, (estimate, heaviest)
    # A Mistral-7B fits a 24 GB machine; a Mixtral-8x7B does not.
    assert job_needs(profile, 7_241_732_096)[1] < 24e9 < job_needs(profile, 46_702_792_704)[1]


MEMINFO = "MemTotal:       24683772 kB\nMemFree:         1204420 kB\nMemAvailable:   20110356 kB\n"


@pytest.mark.parametrize("platform, report, expected", [
    ("linux", MEMINFO, 24683772 * 1024),
    ("linux", "MemFree: 1204420 kB\n", 0),  # no MemTotal line: unknown, not a wrong number
    ("linux", "", 0),
    ("darwin", "68719476736\n", 64 << 30),  # `sysctl -n hw.memsize` of a 64 GB Mac
    ("darwin", "", 0),
    ("darwin", "sysctl: unknown oid 'hw.memsize'\n", 0),
    ("darwin", MEMINFO, 0),  # each platform reads its own report only
    ("win32", "68719476736", 0),
])
def test_each_platforms_memory_report_is_read(platform, report, expected):
    """Parsed the same on every machine, macOS's included (where machine_memory() used to be 0, so no memory
    refusal could fire)."""
    from quantkit.memory import total_memory

    assert total_memory(platform, report) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_this_machines_memory_is_its_memtotal(monkeypatch):
    from pathlib import Path

    from quantkit.memory import MEMORY_ENV, machine_memory

    monkeypatch.delenv(MEMORY_ENV, raising=False)
    kib = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
    assert abs(machine_memory() - kib * 1024) <= 0.01 * kib * 1024
