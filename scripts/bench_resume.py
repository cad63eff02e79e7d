#!/usr/bin/env python3
"""How much of a build a re-run costs: first build vs an identical second build of the sample.

Prints both times, their ratio (the acceptance bar is < 0.10), and as a baseline the time to
copy the build's GGUF files with a plain file copy, measured in the same run.
Usage: .venv/bin/python scripts/bench_resume.py [--profile sample] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantkit", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="sample")
    ap.add_argument("--keep", action="store_true", help="keep the build folder")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="qk-bench-"))
    try:
        cmd = ["build", "--sample", "--profile", args.profile, "--out", str(out), "--quiet"]
        timed(["sample"])  # the sample checkpoint is built once per machine; not part of either run
        first = timed(cmd)
        second = timed(cmd)
        folder = next(out.iterdir())
        start = time.perf_counter()
        copy = out / "copy"
        copy.mkdir()
        for f in folder.glob("*.gguf"):
            shutil.copyfile(f, copy / f.name)
        baseline = time.perf_counter() - start
        print(f"first build     {first:8.2f} s")
        print(f"second build    {second:8.2f} s   ratio to first {second / first:.4f}  (bar: < 0.10)")
        print(f"copy of GGUFs   {baseline:8.2f} s   second build / copy {second / baseline:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
