#!/usr/bin/env python3
"""Evaluation benchmark: quantkit's GGUF perplexity run vs llama.cpp's own llama-perplexity (built from
the same llama.cpp tree by setup.sh) on the same file and text, in the same run.

Both process the same 512-token windows of the bundled evaluation text and score the second half of each,
at one window per decode and at four (llama-perplexity's n_seq = n_batch / n_ctx, its default 2048 / 512;
given -ub 2048 too, so that the four share one micro-batch, that is one pass over the weights, as quantkit's
runner does). Throughput is processed tokens per second, wall time including model load; quantkit's run also
does the chat smoke test, as it does in a build. Targets: throughput ratio >= 0.9 against llama-perplexity
with the same windows per decode, perplexities within 0.5%, and quantkit's 1 and 4 windows a decode
bit-identical.

`--memory-limit` runs every command in a cgroup (v1, as root) that holds only its measured anonymous peak
plus that many bytes of page cache: the GGUF's pages then do not all stay resident and are read from disk
again on every pass, as for a file larger than free memory.

Usage: .venv/bin/python scripts/bench_eval.py [--type Q8_0 | --gguf FILE] [--windows 40] [--threads N]
       [--memory-limit 150M]
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
    context = BuildContext(source=source, out_dir=work, reporter=Reporter(quiet=True), threads=threads)
    f16 = ArtifactPlan(backend="gguf", variant="F16", filename="model-F16.gguf", predicted_bytes=0, role="intermediate")
    GGUFFormat().build(f16, context)
    if qtype == "F16":
        return work / f16.filename
    q = ArtifactPlan(backend="gguf", variant=qtype, filename=f"model-{qtype}.gguf", predicted_bytes=0,
                     depends_on=f16.filename, options={"type": qtype})
    GGUFFormat().build(q, context)
    return work / q.filename


CGROUP = Path("/sys/fs/cgroup/memory")


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache: pages cached earlier stay charged to whoever read them first,
    so a limited run must fault them in itself for its cgroup to hold them to the limit."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(cmd: list[str], limit: int | None, model: Path | None = None) -> tuple[float, object]:
    """(seconds, procs.Finished) of `cmd`, in a memory cgroup of `limit` bytes if given (`model` evicted first)."""
    from quantkit.procs import run_program

    prefix: list[str] = []
    group = None
    if limit:
        evict(model)
        group = CGROUP / f"qk-bench-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        # The child joins the cgroup before exec, so everything it maps is charged there.
        prefix = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
    try:
        start = time.perf_counter()
        done = run_program(prefix[0] if prefix else cmd[0], (prefix[1:] + cmd) if prefix else cmd[1:], what=cmd[0])
        return time.perf_counter() - start, done
    finally:
        if group:
            group.rmdir()


def quantkit_run(model: Path, spec: dict, n_seq: int, work: Path, limit: int | None) -> tuple[float, dict, object]:
    (work / f"spec{n_seq}.json").write_text(json.dumps({**spec, "windows_per_decode": n_seq, "ref_write": str(work / f"lp{n_seq}.npy")}))
    seconds, done = run([sys.executable, "-m", "quantkit.formats.gguf.runner", "evaluate", str(model),
                         str(work / f"spec{n_seq}.json"), str(work / f"out{n_seq}.json")], limit, model)
    return seconds, json.loads((work / f"out{n_seq}.json").read_text()), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q8_0", help="a type to make from the sample (default Q8_0)")
    ap.add_argument("--gguf", type=Path, default=None, help="an existing GGUF whose tokenizer is the sample's")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-limit", default=None, help="page cache each run may hold above its anonymous peak (150M)")
    args = ap.parse_args()
    from quantkit.evaluate.metrics import ReferenceRows, scored_range
    from quantkit.fsutil import parse_bytes

    room = parse_bytes(args.memory_limit) if args.memory_limit else 0
    if room and not os.access(CGROUP, os.W_OK):
        sys.exit(f"--memory-limit needs a writable cgroup v1 memory controller at {CGROUP} (root)")
    work = Path(tempfile.mkdtemp(prefix="qk-bench-eval-"))
    try:
        model = args.gguf or make_gguf(work, args.type, args.threads)
        text = BUILTIN["botchan"]
        tokens, bos = work / "tokens.npy", work / "bos.json"
        subprocess.run([sys.executable, "-m", "quantkit.evaluate.hf_runner", "tokenize", str(ensure_sample()),
                        str(text), str(tokens), str(bos)], check=True)
        import numpy as np

        np.save(tokens, np.load(tokens)[: args.windows * args.ctx])
        spec = {"tokens": str(tokens), "bos": json.loads(bos.read_text())["bos"], "ctx": args.ctx,
                "threads": args.threads, "smoke": asdict(SmokeOptions())}
        perplexity = str(find_tool("llama-perplexity"))

        def llama(n_seq: int, limit: int | None):
            b = str(n_seq * args.ctx)
            seconds, done = run([perplexity, "-m", str(model), "-f", str(text), "-c", str(args.ctx), "-b", b, "-ub", b,
                                 "-t", str(args.threads), "--chunks", str(args.windows)], limit, model)
            return seconds, float(re.search(r"Final estimate: PPL = ([\d.]+)", "\n".join(done.lines)).group(1)), done

        rows, free = [], {}
        for n_seq in (1, 4):
            if room:  # the same page-cache room above each run's own anonymous peak, measured without a limit
                q_s, _, q_done = quantkit_run(model, spec, n_seq, work, None)
                l_s, _, l_done = llama(n_seq, None)
                free[n_seq] = (l_s, q_s)
            q_s, ours, q_done = quantkit_run(model, spec, n_seq, work, room and q_done.peak_anon_bytes + room)
            l_s, theirs, l_done = llama(n_seq, room and l_done.peak_anon_bytes + room)
            rows.append((n_seq, l_s, theirs, l_done, q_s, ours["perplexity"], q_done))
        first, last = scored_range(args.ctx)
        n_rows = args.windows * (last - first)
        one, four = (ReferenceRows(str(work / f"lp{n}.npy"), "r").read(0, n_rows) for n in (1, 4))
        processed = args.windows * args.ctx
        size = model.stat().st_size
        print(f"file {model.name} ({size / 1e6:.1f} MB), {args.windows} windows of {args.ctx} tokens, {args.threads} threads"
              + (f", page cache limited to {args.memory_limit} above each run's anonymous peak" if room else ""))
        print("| windows a decode | weight passes | llama-perplexity | quantkit | throughput ratio | PPL llama / quantkit "
              "| peak anon / file, llama | peak anon / file, quantkit |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n_seq, l_s, theirs, l_done, q_s, ppl, q_done in rows:
            was = [f"{t:.2f} s without the limit, " for t in free[n_seq]] if room else ["", ""]
            print(f"| {n_seq} | {-(-args.windows // n_seq)} | {was[0]}{l_s:.2f} s ({processed / l_s:.0f} tok/s) | {was[1]}{q_s:.2f} s "
                  f"({processed / q_s:.0f} tok/s) | {l_s / q_s:.3f} | {theirs:.4f} / {ppl:.4f} ({100 * (ppl / theirs - 1):+.3f}%) "
                  f"| {l_done.peak_anon_bytes / 1e6:.0f} / {l_done.peak_file_bytes / 1e6:.0f} MB "
                  f"| {q_done.peak_anon_bytes / 1e6:.0f} / {q_done.peak_file_bytes / 1e6:.0f} MB |")
        print(f"quantkit, 4 windows a decode vs 1: log-probabilities identical: {bool(np.array_equal(one, four))} "
              f"(largest difference {float(np.abs(one.astype(np.float32) - four.astype(np.float32)).max()):.3g})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
