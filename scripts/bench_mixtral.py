#!/usr/bin/env python3
"""Mixtral-8x7B at its real dimensions: the fp16 reference, memory-mapped (in memory) and streamed layer by
layer (evaluate/streamed.py), on checkpoints of N of Mixtral's 32 layers (scripts/make_synthetic_model.py
mixtral --layers N: hidden 4096, 8 experts of 14336, top-2, bf16, 2.8 GB a layer), scoring --tokens tokens.

For each N and mode: wall time, peak resident memory (ru_maxrss), and the peaks of anonymous memory (what
the process needs) and of file-backed pages (memory-mapped weights, which the kernel can reclaim), sampled
every 0.1 s by quantkit.memwatch; the plan's prediction; and the two modes' agreement (KLD of their log-probabilities, PPL
ratio). Baseline measured in the same run: one plain sequential read of the checkpoint's files (the least
any reference must do), as the time ratio.

Usage: .venv/bin/python scripts/bench_mixtral.py [--layers 2 4] [--tokens 1024] [--ctx 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_synthetic_model import make  # noqa: E402

from quantkit.evaluate.metrics import ReferenceRows  # noqa: E402
from quantkit.evaluate.text import load_text  # noqa: E402
from quantkit.memory import reference_peak, streamed_reference_peak  # noqa: E402
from quantkit.procs import run_python  # noqa: E402
from quantkit.source import tensor_stats  # noqa: E402

GB = 1e9


def read_baseline(model: Path) -> float:
    start = time.perf_counter()
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - start


def reference(model: Path, work: Path, mode: str, tokens: Path, bos, ctx: int, windows: int) -> dict:
    spec = {"tokens": str(tokens), "bos": bos, "ctx": ctx, "threads": 2, "reference": True, "chat": False,
            "windows": windows, "ref_write": str(work / f"{mode}.npy"), "streamed": mode == "streamed"}
    (work / f"{mode}.spec.json").write_text(json.dumps(spec))
    start = time.perf_counter()
    done = run_python(["-m", "quantkit.evaluate.hf_runner", "evaluate", str(model), str(work / f"{mode}.spec.json"),
                       str(work / f"{mode}.json")])
    result = json.loads((work / f"{mode}.json").read_text())
    rows = ReferenceRows(str(work / f"{mode}.npy"), "r")
    logprobs = rows.read(0, windows * (ctx // 2 - 1)).astype(np.float64)
    rows.close()
    return {"seconds": time.perf_counter() - start, "peak_rss": result["peak_rss_bytes"], "anon": done.peak_anon_bytes,
            "file": done.peak_file_bytes, "ppl": result["perplexity"], "logprobs": logprobs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    windows = args.tokens // args.ctx
    rows = []
    for n in args.layers:
        model = make("mixtral", layers=n)
        stats = tensor_stats(model)
        config = json.loads((model / "config.json").read_text())
        with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
            work = Path(tmp)
            (work / "text.txt").write_text(load_text("builtin:botchan"), encoding="utf-8")
            run_python(["-m", "quantkit.evaluate.hf_runner", "tokenize", str(model), str(work / "text.txt"),
                        str(work / "all.npy"), str(work / "bos.json")])
            np.save(work / "tokens.npy", np.load(work / "all.npy")[:args.tokens])
            bos = json.loads((work / "bos.json").read_text())["bos"]
            baseline = read_baseline(model)
            runs = {mode: reference(model, work, mode, work / "tokens.npy", bos, args.ctx, windows)
                    for mode in ("in-memory", "streamed")}
        p, q = runs["in-memory"].pop("logprobs"), runs["streamed"].pop("logprobs")
        kld = float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))
        predicted = {"in-memory": reference_peak(stats.params, stats.weight_bytes, stats.largest,
                                                  int(config["vocab_size"]), args.ctx),
                     "streamed": streamed_reference_peak(stats, config, int(config["vocab_size"]), args.ctx, windows)}
        for mode, r in runs.items():
            rows.append({"layers": n, "weights_gb": stats.weight_bytes / GB, "mode": mode, **r,
                         "predicted": predicted[mode], "read_seconds": baseline, "kld": kld,
                         "ppl_ratio": runs["streamed"]["ppl"] / runs["in-memory"]["ppl"]})
    print(f"{'N':>2} {'weights':>8} {'mode':10} {'time':>7} {'x read':>6} {'peak RSS':>9} {'anon':>7} {'file':>7} "
          f"{'predicted':>9}")
    for r in rows:
        print(f"{r['layers']:>2} {r['weights_gb']:7.2f}G {r['mode']:10} {r['seconds']:6.1f}s {r['seconds'] / r['read_seconds']:6.2f} "
              f"{r['peak_rss'] / GB:8.2f}G {r['anon'] / GB:6.2f}G {r['file'] / GB:6.2f}G {r['predicted'] / GB:8.2f}G")
    for n in args.layers:
        r = next(x for x in rows if x["layers"] == n)
        print(f"N={n}: streamed vs in-memory KLD {r['kld']:.2e}, PPL ratio {r['ppl_ratio']:.8f}")
    streamed = [r for r in rows if r["mode"] == "streamed"]
    if len(streamed) > 1:
        print(f"streamed peak RSS, N={streamed[-1]['layers']} / N={streamed[0]['layers']}: "
              f"{streamed[-1]['peak_rss'] / streamed[0]['peak_rss']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
