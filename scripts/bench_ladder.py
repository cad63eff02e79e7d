#!/usr/bin/env python3
"""The sample's whole GGUF ladder: quantkit with `evaluation.precision` against the same work done with
llama.cpp's own tools, measured in the same run on the same machine.

llama.cpp's tools: convert_hf_to_gguf.py (f16), llama_model_quantize for each of the six types, one
`llama-perplexity --kl-divergence-base` run on the F16 file, then `llama-perplexity --kl-divergence` on each
of the seven files, every run on all the windows (40 × 512 tokens by default).

quantkit: `quantkit build` of the same source with profiles/sample.yaml plus `evaluation.precision`
(default "KLD ±3% at 95%"), in a fresh folder: conversion, quantization, the fp16 reference (transformers),
every evaluation window by window until precise, the smoke test, the chat-template checks and the tool-call
and JSON-mode probes. Prints both times, their ratio (target <= 0.7), and each file's KLD with its error
bar and the tokens it took, next to llama-perplexity's KLD on all the windows.

Usage: .venv/bin/python scripts/bench_ladder.py [--precision "KLD ±3% at 95%"] [--windows 40] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantkit.evaluate.stats import parse_precision  # noqa: E402
from quantkit.evaluate.text import BUILTIN  # noqa: E402
from quantkit.formats.gguf.llamacpp import find_tool, find_tree  # noqa: E402
from quantkit.sample import ensure_sample  # noqa: E402

TYPES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


def timed(args: list, **kw) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if proc.returncode:
        sys.exit(f"{args[0]} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def tools_run(model: Path, work: Path, windows: int, ctx: int, threads: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per stage, and llama-perplexity's mean KLD per type."""
    seconds, kld = {}, {}
    tree = find_tree()
    f16 = work / "F16.gguf"
    seconds["convert"], _ = timed([sys.executable, tree.converter, model, "--outtype", "f16", "--outfile", f16], cwd=tree.root)
    seconds["quantize"] = 0.0
    for t in TYPES:
        code = (f"import ctypes, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{t}; p.nthread = {threads}; "
                f"assert llama_cpp.llama_model_quantize({str(f16)!r}.encode(), {str(work / (t + '.gguf'))!r}.encode(), "
                f"ctypes.byref(p)) == 0")
        s, _ = timed([sys.executable, "-c", code])
        seconds["quantize"] += s
    common = ["-f", BUILTIN["botchan"], "-c", ctx, "-b", ctx, "-t", threads, "--chunks", windows]
    perplexity = find_tool("llama-perplexity")
    seconds["kld base (F16)"], _ = timed([perplexity, "-m", f16, "--kl-divergence-base", work / "base.kld", *common])
    seconds["kld runs"] = 0.0
    for t in ["F16", *TYPES]:
        s, out = timed([perplexity, "-m", work / f"{t}.gguf", "--kl-divergence-base", work / "base.kld", "--kl-divergence", *common])
        seconds["kld runs"] += s
        kld[t] = float(re.search(r"Mean\s+KLD:\s+([\d.]+)", out).group(1))
    return seconds, kld


def quantkit_run(model: Path, work: Path, precision: str, windows: int, ctx: int, threads: int) -> tuple[float, dict]:
    profile = yaml.safe_load((REPO / "profiles" / "sample.yaml").read_text())
    profile["evaluation"] |= {"precision": precision, "max_tokens": windows * ctx, "ctx": ctx}
    (work / "ladder.yaml").write_text(yaml.safe_dump(profile, allow_unicode=True))
    s, _ = timed([sys.executable, "-m", "quantkit", "build", model, "--profile", work / "ladder.yaml", "--out", work / "out",
                  "--threads", threads, "--quiet"])
    return s, json.loads((work / "out" / model.name / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="KLD ±3% at 95%")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    target = parse_precision(args.precision)
    model = ensure_sample()
    work = Path(tempfile.mkdtemp(prefix="qk-bench-ladder-"))
    try:
        tools_s, tools_kld = tools_run(model, work, args.windows, args.ctx, args.threads)
        ours_s, report = quantkit_run(model, work, args.precision, args.windows, args.ctx, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_tools = sum(tools_s.values())
    print(f"sample ladder: F16 + {', '.join(TYPES)}; {args.windows} windows of {args.ctx} tokens; {args.threads} threads")
    print(f"llama.cpp tools  {total_tools:7.1f} s  (" + ", ".join(f"{k} {v:.1f} s" for k, v in tools_s.items()) + ")")
    ref = report["evaluation"]["reference_result"]
    print(f"quantkit         {ours_s:7.1f} s  (precision {target.describe()}; reference {ref['seconds']:.1f} s on "
          f"{ref['tokens_scored']} tokens; smoke test, chat checks and probes included)")
    print(f"ratio            {ours_s / total_tools:.3f}  (target <= 0.7)")
    print("\nfile      quantkit KLD ± SE       ±95% rel  tokens   llama-perplexity KLD (all windows)")
    for a in report["artifacts"]:
        e = a["evaluation"]
        rel = target.z * e["kld_se"] / e["kld_mean"] if e["kld_mean"] else 0.0
        print(f"{a['variant']:8}  {e['kld_mean']:.5f} ± {e['kld_se']:.5f}  {100 * rel:6.2f}%  {e['tokens_scored']:6}   "
              f"{tools_kld[a['variant']]:.5f}")


if __name__ == "__main__":
    main()
