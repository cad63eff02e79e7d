#!/usr/bin/env python3
"""Evaluation benchmark: quantkit's GGUF perplexity run vs llama.cpp's own llama-perplexity (built from
the same llama.cpp tree by setup.sh) on the same file and text, in the same run.

Both process the same number of 512-token windows of the bundled evaluation text and score the
second half of each. Throughput is processed tokens per second, wall time including model load;
quantkit's run also does the chat smoke test, as it does in a build. Targets: throughput ratio
>= 0.9, perplexities within 0.5%.

Usage: .venv/bin/python scripts/bench_eval.py [--type Q8_0] [--windows 40] [--threads N]
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
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantkit.formats import BuildContext  # noqa: E402
from quantkit.formats.gguf import GGUFFormat  # noqa: E402
from quantkit.evaluate.text import BUILTIN  # noqa: E402
from quantkit.formats.gguf.llamacpp import find_tool  # noqa: E402
from quantkit.plan import ArtifactPlan  # noqa: E402
from quantkit.profiles import SmokeOptions  # noqa: E402
from quantkit.progress import Reporter  # noqa: E402
from quantkit.sample import ensure_sample  # noqa: E402
from quantkit.source import resolve  # noqa: E402


def make_gguf(work: Path, qtype: str, threads: int) -> Path:
    source = resolve(str(ensure_sample()))
    ctx = BuildContext(source=source, out_dir=work, reporter=Reporter(quiet=True), threads=threads)
    f16 = ArtifactPlan(backend="gguf", variant="F16", filename="model-F16.gguf", predicted_bytes=0, role="intermediate")
    GGUFFormat().build(f16, ctx)
    if qtype == "F16":
        return work / f16.filename
    q = ArtifactPlan(backend="gguf", variant=qtype, filename=f"model-{qtype}.gguf", predicted_bytes=0,
                     depends_on=f16.filename, options={"type": qtype})
    GGUFFormat().build(q, ctx)
    return work / q.filename


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qk-bench-eval-"))
    try:
        model = make_gguf(work, args.type, args.threads)
        text = BUILTIN["botchan"]
        tokens, bos = work / "tokens.npy", work / "bos.json"
        subprocess.run([sys.executable, "-m", "quantkit.evaluate.hf_worker", "tokenize", str(ensure_sample()),
                        str(text), str(tokens), str(bos)], check=True)
        import numpy as np

        np.save(tokens, np.load(tokens)[: args.windows * args.ctx])
        spec = {"tokens": str(tokens), "bos": json.loads(bos.read_text())["bos"], "ctx": args.ctx,
                "threads": args.threads, "smoke": asdict(SmokeOptions())}
        (work / "spec.json").write_text(json.dumps(spec))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantkit.formats.gguf.evaluate_worker", "evaluate", str(model),
                        str(work / "spec.json"), str(work / "out.json")], check=True, stderr=subprocess.DEVNULL)
        quantkit_s = time.perf_counter() - start
        ours = json.loads((work / "out.json").read_text())

        start = time.perf_counter()
        proc = subprocess.run([str(find_tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(args.ctx),
                               "-b", str(args.ctx), "-t", str(args.threads), "--chunks", str(args.windows)],
                              capture_output=True, text=True, check=True)
        llama_s = time.perf_counter() - start
        theirs = float(re.search(r"Final estimate: PPL = ([\d.]+)", proc.stdout + proc.stderr).group(1))

        processed = args.windows * args.ctx
        print(f"file {model.name} ({args.type}), {args.windows} windows of {args.ctx} tokens, {args.threads} threads")
        print(f"llama-perplexity  {llama_s:7.2f} s  {processed / llama_s:8.0f} tok/s  PPL {theirs:.4f}")
        print(f"quantkit          {quantkit_s:7.2f} s  {processed / quantkit_s:8.0f} tok/s  PPL {ours['perplexity']:.4f}"
              f"  (+ smoke test)")
        print(f"throughput ratio  {llama_s / quantkit_s:.3f}  (target >= 0.9)")
        print(f"PPL difference    {100 * (ours['perplexity'] / theirs - 1):+.3f}%  (target within 0.5%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
