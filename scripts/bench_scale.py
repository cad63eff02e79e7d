#!/usr/bin/env python3
"""Scale benchmark: a synthetic checkpoint of a real shape (default: Mistral-7B, 7.4B parameters) through
the whole pipeline on this machine, each step's wall time and peak memory against the plan's prediction.

The build is the real command line: `quantkit plan`, then `quantkit build` with a profile of an f16
GGUF, Q4_K_M and Q8_0 (add the MoE steps with --moe: imatrix, IQ4_XS, GPTQ), the fp16 reference and
every evaluation on --tokens tokens, and the report. Baselines measured in the same run: a plain copy
of the safetensors (the conversion's ratio), and llama.cpp's own llama-perplexity on the Q8_0 file
over the same number of windows (the evaluation's ratio). Each step's peak is also given split into
anonymous memory and file-backed pages (memwatch: what must fit, and what the kernel can drop and re-read).

Mixtral-8x7B at its real dimensions, N of its 32 layers, GGUF only, the imatrix from Q8_0:
    scripts/bench_scale.py --model mixtral --layers 4 --moe --no-gptq --imatrix-from q8_0

Usage: .venv/bin/python scripts/bench_scale.py [--model 7b|3b|1b|moe|mixtral|sample] [--layers N] [--tokens 1024]
           [--moe [--no-gptq] [--imatrix-from intermediate|q8_0] [--imatrix-chunks 16]] [--work DIR] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from quantkit.evaluate.text import BUILTIN  # noqa: E402
from quantkit.formats.gguf.llamacpp import find_tool  # noqa: E402
from quantkit.sample import ensure_sample  # noqa: E402
from quantkit.source import tensor_stats  # noqa: E402


def profile_text(tokens: int, moe: bool, *, gptq: bool = True, imatrix_from: str = "intermediate",
                 chunks: int = 16, chat: bool = True) -> str:
    types = "[Q4_K_M, IQ4_XS, Q8_0]" if moe else "[Q4_K_M, Q8_0]"
    lines = ["name: scale-benchmark", "formats:", "  gguf:", f"    types: {types}"]
    if moe:
        lines += [f"    imatrix: {{text: builtin:botchan, chunks: {chunks}, ctx: 512, from: {imatrix_from}}}"]
        if gptq:
            lines += ["  gptq:", "    variants: [{bits: 4, group_size: 128}]",
                      "    calibration: {text: builtin:botchan, samples: 16, seq_len: 512}"]
    lines += ["evaluation:", "  window: 512", f"  max_tokens: {tokens}",
              "smoke:", "  max_tokens: 8", "  allow_failures: true  # random weights answer nothing"]
    if not chat:
        lines += ["chat_checks:", "  enabled: false"]
    return "\n".join(lines) + "\n"


def copy_baseline(src: Path, dst: Path) -> float:
    dst.mkdir(parents=True)
    start = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def llama_perplexity(model: Path, windows: int, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run([str(find_tool("llama-perplexity")), "-m", str(model), "-f", str(BUILTIN["botchan"]), "-c", "512",
                    "-b", "512", "-t", str(threads), "--chunks", str(windows)], capture_output=True, check=True)
    return time.perf_counter() - start


def quantkit(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True)
    if proc.returncode not in (0, 7):  # 7: smoke tests failed, which random weights always do
        sys.exit(f"quantkit {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="7b", help="a synthetic shape (scripts/make_synthetic_model.py) or 'sample'")
    ap.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (windows of 512)")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers of the shape (default: all)")
    ap.add_argument("--moe", action="store_true", help="also imatrix, IQ4_XS and GPTQ (the MoE route)")
    ap.add_argument("--no-gptq", dest="gptq", action="store_false", help="with --moe: leave GPTQ out")
    ap.add_argument("--imatrix-from", choices=("intermediate", "q8_0"), default="intermediate")
    ap.add_argument("--imatrix-chunks", type=int, default=16, help="imatrix chunks of 512 tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the build folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    from make_synthetic_model import make

    model = ensure_sample() if args.model == "sample" else make(args.model, layers=args.layers)
    stats = tensor_stats(model)
    work = Path(tempfile.mkdtemp(prefix=f"qk-scale-{args.model}-", dir=args.work))
    try:
        copy_s = copy_baseline(model, work / "copy")
        profile = work / "scale.yaml"
        profile.write_text(profile_text(args.tokens, args.moe, gptq=args.gptq, imatrix_from=args.imatrix_from,
                                        chunks=args.imatrix_chunks, chat=args.model == "sample"))
        plan = quantkit("plan", str(model), "--profile", str(profile), "--out", str(work))
        start = time.perf_counter()
        quantkit("build", str(model), "--profile", str(profile), "--out", str(work), "--threads", str(args.threads))
        build_s = time.perf_counter() - start
        folder = work / model.name
        report = json.loads((folder / "report.json").read_text())
        q8 = next(folder / a["filename"] for a in report["artifacts"] if a["variant"] == "Q8_0")
        windows = args.tokens // 512
        llama_s = llama_perplexity(q8, windows, args.threads)

        rows = []
        for a in report["artifacts"]:
            rows.append({"step": f"make {a['filename']}", "seconds": a["seconds"], "predicted": a["predicted_peak_bytes"],
                         "measured": a["peak_rss_bytes"], "anon": a["peak_anon_bytes"], "file": a["peak_file_bytes"]})
        evals = [("reference", report["evaluation"]["reference_result"])]
        evals += [(a["filename"], a["evaluation"]) for a in report["artifacts"] if a.get("evaluation")]
        for name, e in evals:
            rows.append({"step": f"evaluate {name}", "seconds": e["seconds"], "predicted": e["predicted_peak_bytes"],
                         "measured": e["peak_rss_bytes"], "anon": e["peak_anon_bytes"], "file": e["peak_file_bytes"]})
        total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(f"model {model.name}: {stats.params / 1e9:.2f}B parameters, {stats.weight_bytes / 1e9:.2f} GB of safetensors; "
              f"machine {os.cpu_count()} cores, {total_mem / 1e9:.1f} GB; {args.tokens} evaluation tokens")
        print(next(line for line in plan.stdout.splitlines() if line.startswith("memory:")))
        print(f"{'step':60} {'time':>9} {'predicted':>10} {'measured':>10} {'anon':>7} {'file':>7} {'meas/pred':>9} "
              f"{'B/param':>8}")
        for r in rows:
            ratio = f"{r['measured'] / r['predicted']:.2f}" if r["predicted"] and r["measured"] else "—"
            print(f"{r['step'][:60]:60} {r['seconds']:8.1f}s {r['predicted'] / 1e9:9.2f}G {r['measured'] / 1e9:9.2f}G "
                  f"{r['anon'] / 1e9:6.2f}G {r['file'] / 1e9:6.2f}G {ratio:>9} {r['measured'] / stats.params:8.2f}")
        conv = next(r for r in rows if r["step"].endswith("-F16.gguf"))
        q8_eval = next(r for r in rows if r["step"] == f"evaluate {q8.name}")
        print(f"whole build {build_s:.1f}s; convert {conv['seconds']:.1f}s vs plain copy {copy_s:.1f}s "
              f"(copy/convert {copy_s / conv['seconds']:.2f}); Q8_0 evaluation {q8_eval['seconds']:.1f}s vs "
              f"llama-perplexity {llama_s:.1f}s on {windows} windows (llama-perplexity/quantkit {llama_s / q8_eval['seconds']:.2f}, "
              "quantkit's run includes the smoke test)")
        ref = report["evaluation"]["reference_result"]
        bound = 2.3 * stats.params + 2e9
        print(f"reference peak RSS {ref['peak_rss_bytes'] / 1e9:.2f} GB = {ref['peak_rss_bytes'] / stats.params:.2f} B/param "
              f"(target <= 2.3 B/param + 2 GB = {bound / 1e9:.2f} GB: {'met' if ref['peak_rss_bytes'] <= bound else 'MISSED'})")
        if args.json:
            args.json.write_text(json.dumps({"model": model.name, "params": stats.params, "rows": rows, "copy_s": copy_s,
                                             "build_s": build_s, "llama_perplexity_s": llama_s}, indent=1))
        if args.keep:
            print(f"kept {folder}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
