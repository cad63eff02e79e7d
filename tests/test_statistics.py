"""quantkit's statistics against llama.cpp's own `llama-perplexity --kl-divergence` (built by setup.sh from the
same tree as the bindings), on the same text and the same windows: every statistic within 1%."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from quantkit.evaluate.stats import Precision, parse_precision, statistics
from quantkit.evaluate.text import BUILTIN
from quantkit.errors import ProfileError
from quantkit.formats.gguf.llamacpp import find_tool

# llama-perplexity's line -> (report key, its standard error's key, scale of the printed number)
LINES = {
    "Mean PPL(Q)": ("perplexity", "perplexity_se", 1),
    "Mean ln(PPL(Q)/PPL(base))": ("ln_ppl_ratio", "ln_ppl_ratio_se", 1),
    "Mean    KLD": ("kld_mean", "kld_se", 1),
    "Maximum KLD": ("kld_max", None, 1),
    "99.9%   KLD": ("kld_p999", None, 1),
    "99.0%   KLD": ("kld_p99", None, 1),
    "95.0%   KLD": ("kld_p95", None, 1),
    "90.0%   KLD": ("kld_p90", None, 1),
    "Median  KLD": ("kld_median", None, 1),
    "RMS Δp": ("rms_dp", "rms_dp_se", 100),
    "Same top p": ("top1_agreement", "top1_se", 100),
}


def _llama_perplexity(*args) -> str:
    proc = subprocess.run([str(find_tool("llama-perplexity")), *map(str, args)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _parse(output: str) -> dict:
    out = {}
    for line in output.splitlines():
        for prefix, (key, se_key, scale) in LINES.items():
            if re.match(re.escape(prefix) + r"\s*:", line):
                numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", line.split(":", 1)[1])]
                out[key] = numbers[0] / scale
                if se_key:
                    out[se_key] = numbers[1] / scale
    return out


def _quantkit_worker(model, spec: dict, tmp_path, name: str) -> dict:
    """quantkit's GGUF evaluation worker, run as the build runs it."""
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "quantkit.formats.gguf.runner", "evaluate", str(model),
                    str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}.out.json")], check=True, capture_output=True)
    return json.loads((tmp_path / f"{name}.out.json").read_text())


def test_statistics_match_llama_perplexity_within_one_percent(sample_build, tmp_path):
    """Both sides score Q4_K_M against llama.cpp's run of the F16 file (llama-perplexity's base, quantkit's
    reference rows): the same base model, so what is compared is the statistics, not two references."""
    folder, report = sample_build["dir"], sample_build["report"]
    ctx = report["evaluation"]["window"]
    tokens_file = folder / ".quantkit" / "eval-tokens.npy"
    tokens = np.load(tokens_file)
    chunks = len(tokens) // ctx
    text = BUILTIN["botchan"].read_text(encoding="utf-8")
    # The same token ids: llama-perplexity tokenizes the text itself.
    from llama_cpp import Llama

    f16, q4 = folder / "SmolLM2-135M-Instruct-F16.gguf", folder / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    vocab = Llama(model_path=str(f16), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=False)[: len(tokens)] == tokens.tolist()
    base = tmp_path / "f16.kld"
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    common = ["-f", tmp_path / "text.txt", "-c", ctx, "-b", ctx, "--chunks", chunks, "-t", 2]
    _llama_perplexity("-m", f16, "--kl-divergence-base", base, *common)
    theirs = _parse(_llama_perplexity("-m", q4, "--kl-divergence-base", base, "--kl-divergence", *common))
    assert len(theirs) == 16, theirs

    spec = {"tokens": str(tokens_file), "bos": None, "ctx": ctx, "chat": False}  # statistics only
    _quantkit_worker(f16, spec | {"ref_write": str(tmp_path / "ref.npy")}, tmp_path, "f16")
    ours = _quantkit_worker(q4, spec | {"ref_read": str(tmp_path / "ref.npy")}, tmp_path, "q4")
    assert ours["tokens_scored"] == chunks * (ctx // 2 - 1)
    off = {k: (ours[k], v) for k, v in theirs.items() if abs(ours[k] / v - 1) > 0.01}
    assert not off, f"beyond 1% of llama-perplexity (quantkit, llama-perplexity): {off}"
    # The build's own numbers use the transformers reference; the per-token statistics agree as closely.
    built = next(a for a in report["artifacts"] if a["variant"] == "Q4_K_M")["evaluation"]
    for key in ("kld_mean", "kld_median", "kld_p99", "top1_agreement", "rms_dp"):
        assert abs(built[key] / theirs[key] - 1) < 0.02, (key, built[key], theirs[key])


def test_statistics_by_hand():
    rng = np.random.default_rng(0)
    nll, nll_base = rng.exponential(3, 400), rng.exponential(3, 400)
    kld, p_diff = rng.exponential(0.05, 400), rng.normal(0, 0.1, 400)
    same = rng.random(400) < 0.8
    s = statistics(nll, nll_base, kld, p_diff, same)
    assert s["perplexity"] == pytest.approx(np.exp(nll.mean()))
    assert s["perplexity_se"] == pytest.approx(np.exp(nll.mean()) * nll.std() / np.sqrt(399))
    assert s["ln_ppl_ratio"] == pytest.approx(nll.mean() - nll_base.mean())
    assert s["kld_se"] == pytest.approx(kld.std() / np.sqrt(399))
    assert s["kld_median"] == pytest.approx(np.median(kld))
    assert s["kld_p99"] == pytest.approx(np.percentile(kld, 99))  # numpy's default is the same interpolation
    assert s["kld_max"] == kld.max()
    assert s["top1_agreement"] == same.mean()
    assert s["rms_dp"] == pytest.approx(np.sqrt((p_diff ** 2).mean()))


def test_precision_target_parses_and_stops():
    p = parse_precision("KLD ±3% at 95%")
    assert p == Precision(0.03, 0.95) and p.z == pytest.approx(1.96, abs=0.001)
    assert parse_precision("kld +-5% at 90%") == Precision(0.05, 0.90)
    assert parse_precision("") is None
    for bad in ("KLD 3%", "KLD ±0% at 95%", "PPL ±3% at 95%", "KLD ±3% at 100%"):
        with pytest.raises(ProfileError, match="not a precision target"):
            parse_precision(bad)
    tight = np.full(1200, 0.05) + np.random.default_rng(1).normal(0, 0.001, 1200)
    assert p.reached(tight) and not p.reached(tight[:500])  # too few positions to trust an error bar
    wide = np.random.default_rng(2).exponential(0.05, 1200)
    assert not p.reached(wide)  # ±5.5% at 95%
    tiny = np.random.default_rng(3).exponential(4e-5, 1200)  # F16-like: at the reference's resolution
    assert p.reached(tiny)
    assert p.windows_needed(0.05, 0.005, 4) == pytest.approx(1.1 * 4 * (1.96 * 0.1 / 0.03) ** 2, abs=1)
