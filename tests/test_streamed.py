"""The layer-major (streamed) reference, evaluate/streamed.py: the same numbers as the in-memory reference, on
the sample and on a MoE, chosen by the plan when the in-memory one would not fit, and run by a real build."""

import json
import sys

import numpy as np
import pytest

from conftest import PROFILES, REPO, report, run_cli, seed

sys.path.insert(0, str(REPO / "scripts"))
from make_synthetic_model import make  # noqa: E402 (a script, not a package)


def _reference(folder, tmp, name: str, tokens, bos, **extra) -> tuple[dict, np.ndarray]:
    from quantkit.evaluate.metrics import ReferenceRows
    from quantkit.procs import run_python

    spec = {"tokens": str(tokens), "bos": bos, "ctx": 256, "reference": True, "chat": False,
            "windows": 8, "ref_write": str(tmp / f"{name}.npy"), **extra}
    (tmp / f"{name}.spec.json").write_text(json.dumps(spec))
    run_python(["-m", "quantkit.evaluate.hf_runner", "evaluate", str(folder), str(tmp / f"{name}.spec.json"),
                str(tmp / f"{name}.json")])
    rows = ReferenceRows(str(tmp / f"{name}.npy"), "r")  # the header names every window of the text; 8 are written
    try:
        return json.loads((tmp / f"{name}.json").read_text()), rows.read(0, 8 * 127).astype(np.float64)
    finally:
        rows.close()


@pytest.mark.parametrize("model", ["sample", "moe-tiny"])
def test_streamed_reference_gives_the_in_memory_numbers(model, sample_model, tmp_path):
    from quantkit.evaluate.text import load_text
    from quantkit.procs import run_python

    folder = sample_model if model == "sample" else make("moe-tiny", dead_experts=2)
    (tmp_path / "text.txt").write_text(load_text("builtin:botchan"), encoding="utf-8")
    run_python(["-m", "quantkit.evaluate.hf_runner", "tokenize", str(folder), str(tmp_path / "text.txt"),
                str(tmp_path / "tokens.npy"), str(tmp_path / "bos.json")])
    bos = json.loads((tmp_path / "bos.json").read_text())["bos"]
    memory, p = _reference(folder, tmp_path, "memory", tmp_path / "tokens.npy", bos)
    # 8 windows in groups of 3: every layer runs three groups, the last one short.
    streamed, q = _reference(folder, tmp_path, "streamed", tmp_path / "tokens.npy", bos, streamed=True, stream_group=3)
    kld = np.sum(np.exp(p) * (p - q), axis=-1)
    delta = abs(streamed["perplexity"] / memory["perplexity"] - 1)
    print(f"{model}: PPL {memory['perplexity']:.6f} in memory, {streamed['perplexity']:.6f} streamed "
          f"(relative {delta:.2e}); KLD mean {kld.mean():.2e}, max {kld.max():.2e}; peak RSS "
          f"{memory['peak_rss_bytes'] / 1e6:.0f} -> {streamed['peak_rss_bytes'] / 1e6:.0f} MB", file=sys.stderr)
    assert streamed["tokens_scored"] == memory["tokens_scored"] == 8 * 127
    assert p.shape == q.shape and kld.mean() < 1e-5 and delta < 1e-4
    assert streamed["streamed"] and "does not generate" in streamed["note"]


def test_plan_streams_the_reference_when_it_would_not_fit(sample_model):
    """auto: in memory where it fits, streamed (with its own smaller peak) where it does not."""
    from quantkit.fsutil import parse_bytes

    roomy = run_cli("plan", sample_model, "--profile", PROFILES / "tiny.yaml", check=True)
    assert "reference (fp16 source, transformers) " in roomy.stdout, roomy.stdout
    tight = run_cli("plan", sample_model, "--profile", PROFILES / "tiny.yaml", env={"QUANTKIT_MEMORY": "1300M"}, check=True)
    step = next(line for line in tight.stdout.splitlines() if "streamed layer by layer" in line)
    in_memory = next(line for line in roomy.stdout.splitlines() if "reference (fp16 source" in line)
    # "peak memory ~1.5 GB (269.0 MB of it memory-mapped files)": the whole peak
    size = lambda line: parse_bytes(line.split("~")[1].split(" (")[0].replace(" ", ""))  # noqa: E731
    assert size(step) < size(in_memory), (step, in_memory)


def test_a_build_with_the_streamed_reference_scores_as_the_in_memory_one(sample_model, files_seed, tiny_seed, tmp_path):
    """tests/profiles/streamed.yaml is tiny.yaml with `reference: streamed`: the same reference perplexity and the
    same KL-divergence of each file, and the report says the reference did not generate."""
    folder = seed(files_seed, tmp_path)
    proc = run_cli("build", sample_model, "--profile", PROFILES / "streamed.yaml", "--out", tmp_path, check=True)
    assert "streamed" in proc.stdout + proc.stderr
    ours, theirs = report(folder), report(tiny_seed)
    ref, base = ours["evaluation"]["reference_result"], theirs["evaluation"]["reference_result"]
    assert abs(ref["perplexity"] / base["perplexity"] - 1) < 1e-4, (ref["perplexity"], base["perplexity"])
    assert "does not generate" in ref["note"]
    kld = {a["filename"]: a["evaluation"]["kld_mean"] for a in theirs["artifacts"] if a.get("evaluation")}
    for a in ours["artifacts"]:
        if a.get("evaluation"):
            assert a["evaluation"]["kld_mean"] == pytest.approx(kld[a["filename"]], rel=1e-3, abs=1e-6), a["filename"]
    assert "does not generate" in (folder / "report.md").read_text()
