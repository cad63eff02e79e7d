#!/usr/bin/env python3
"""Conversion and quantization benchmarks, each against a baseline measured in the same run.

convert:   quantkit's conversion step (llama.cpp's converter, HF -> f16 GGUF) in bytes/s, as a ratio
           to a plain copy of the same safetensors bytes on the same disk; and its peak memory for
           the sample and for synthetic Llama-shaped 1B and 3B checkpoints (scripts/make_synthetic_model.py):
           the peak resident set (ru_maxrss, which also counts pages of the memory-mapped input) and
           the peak anonymous memory (RssAnon, sampled every 0.1 s by quantkit.memwatch: what the process really needs).
quantize:  quantkit's quantize step vs a direct llama_model_quantize call on the same f16 file
           (target: ratio <= 1.05).

Usage: .venv/bin/python scripts/bench_gguf.py [--models sample,1b,3b] [--type Q4_K_M] [--threads N]
"""

from __future__ import annotations

import argparse
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

from quantkit.formats import BuildContext  # noqa: E402
from quantkit.formats.gguf import GGUFFormat  # noqa: E402
from quantkit.plan import ArtifactPlan  # noqa: E402
from quantkit.progress import Reporter  # noqa: E402
from quantkit.sample import ensure_sample  # noqa: E402
from quantkit.source import resolve  # noqa: E402


def copy_baseline(src: Path, dst: Path) -> tuple[int, float]:
    files = sorted(src.glob("*.safetensors"))
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
    os.sync()
    return sum(f.stat().st_size for f in files), time.perf_counter() - start


def convert(model: Path, work: Path, threads: int) -> tuple[Path, float, int, int]:
    source = resolve(str(model))
    item = ArtifactPlan(backend="gguf", variant="F16", filename=f"{source.name}-F16.gguf", predicted_bytes=0,
                        role="intermediate")
    context = BuildContext(source=source, out_dir=work, reporter=Reporter(quiet=True), threads=threads)
    start = time.perf_counter()
    facts = GGUFFormat().build(item, context)
    os.sync()
    return work / item.filename, time.perf_counter() - start, facts["peak_rss_bytes"], facts["peak_anon_bytes"]


def quantize_quantkit(f16: Path, work: Path, qtype: str, threads: int) -> float:
    item = ArtifactPlan(backend="gguf", variant=qtype, filename=f"quantkit-{qtype}.gguf", predicted_bytes=0,
                        depends_on=f16.name, options={"type": qtype})
    context = BuildContext(source=None, out_dir=work, reporter=Reporter(quiet=True), threads=threads)
    start = time.perf_counter()
    GGUFFormat().build(item, context)
    return time.perf_counter() - start


def quantize_direct(f16: Path, work: Path, qtype: str, threads: int) -> float:
    """The baseline: llama_model_quantize called directly, in a fresh interpreter, nothing around it."""
    code = (f"import ctypes, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{qtype}; p.nthread = {threads}; "
            f"assert llama_cpp.llama_model_quantize({str(f16)!r}.encode(), {str(work / ('direct-' + qtype + '.gguf'))!r}.encode(), ctypes.byref(p)) == 0")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sample,1b,3b")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    from make_synthetic_model import make  # noqa: E402 (a sibling script)
    from quantkit.paths import cache_dir

    models = {"sample": ensure_sample}
    for size in ("1b", "3b"):
        models[size] = lambda s=size: make(s, cache_dir() / "synthetic" / f"Synthetic-Llama-{s.upper()}")
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.1f} GB RAM; "
          f"threads {args.threads}; quantize type {args.type}")
    print(f"{'model':8} {'params':>8} {'safetensors':>12} {'copy MB/s':>10} {'convert MB/s':>13} {'ratio':>6} "
          f"{'peak RSS':>9} {'peak anon':>10} {'quantkit q':>11} {'direct q':>9} {'ratio':>6}")
    for name in args.models.split(","):
        model = models[name]()
        work = Path(tempfile.mkdtemp(prefix=f"qk-bench-{name}-", dir=args.work))
        try:
            copy_dir = work / "copy"
            copy_dir.mkdir()
            n_bytes, copy_s = copy_baseline(model, copy_dir)
            shutil.rmtree(copy_dir)
            f16, conv_s, rss, anon = convert(model, work, args.threads)
            q_direct = quantize_direct(f16, work, args.type, args.threads)
            q_quantkit = quantize_quantkit(f16, work, args.type, args.threads)
            params = n_bytes / 2
            print(f"{name:8} {params / 1e9:7.2f}B {n_bytes / 1e9:10.2f}GB {n_bytes / copy_s / 1e6:10.0f} "
                  f"{n_bytes / conv_s / 1e6:13.0f} {copy_s / conv_s:6.2f} {rss / 1e9:8.2f}G {anon / 1e9:9.2f}G "
                  f"{q_quantkit:10.1f}s {q_direct:8.1f}s {q_quantkit / q_direct:6.3f}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
