#!/usr/bin/env python3
"""The release profile's plan for Mixtral-8x7B at its real size, on two machines, as one table: the seed's
workstation (--memory 128G and an 80 GB GPU) and this one (its own memory, no GPU). The checkpoint is
header-only (scripts/make_synthetic_model.py mixtral --header-only: Mixtral-8x7B's tensor names, shapes and
bf16 dtype in sparse files with no data, 93.7 GB apparent, a few MB on disk), which is all planning reads.

For every step: its predicted peak, how much of it is memory-mapped files, and what each machine does with
it: runs; streams (the reference, layer by layer); re-reads (its mapped files do not stay resident: the
extra disk time at QUANTKIT_DISK_READ); needs the GPU; or is refused (its anonymous memory does not fit), with
the bytes. Prints markdown (docs/benchmarks.md, "The release plan").

Usage: .venv/bin/python scripts/plan_release.py [--profile release] [--memory 128G] [--gpu 80G]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_synthetic_model import make  # noqa: E402

from quantkit.build import make_plan  # noqa: E402
from quantkit.fsutil import human_size, parse_bytes  # noqa: E402
from quantkit.memory import disk_read_rate, machine_memory  # noqa: E402


def verdicts(plan) -> dict[str, str]:
    """What the machine of `plan` does with each step, by step name."""
    limit, rate, gpu = plan.memory_limit, disk_read_rate(), set(plan.gpu_steps())
    out = {}
    for s in plan.memory_steps():
        if s.anonymous_bytes > limit:
            what = f"refused: {human_size(s.anonymous_bytes)} of its own"
        elif extra := s.re_read_bytes(limit):
            what = f"re-reads {human_size(extra)} (+{extra / rate / 60:.0f} min)"
        elif s.target == "reference" and plan.reference_streamed:
            what = "streams layer by layer"
        else:
            what = "runs"
        if s.target in gpu:
            what += ", on the GPU"
        out[s.step] = what
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="release")
    ap.add_argument("--memory", default="128G")
    ap.add_argument("--gpu", default="80G")
    args = ap.parse_args()
    model = make("mixtral", header_only=True)
    workstation = make_plan(str(model), args.profile, "/tmp/plan-release", memory_limit=parse_bytes(args.memory),
                            memory_where=f"a {args.memory} workstation", gpu_memory=parse_bytes(args.gpu))
    here = make_plan(str(model), args.profile, "/tmp/plan-release")
    on_ws, on_here = verdicts(workstation), verdicts(here)
    peaks = {s.step: s for s in here.memory_steps()}
    print(f"| step | peak (of it mapped) | {args.memory} + {args.gpu} GPU | this machine ({human_size(machine_memory())}, no GPU) |")
    print("|---|---:|---|---|")
    for s in workstation.memory_steps():
        mine = peaks.get(s.step)
        # The reference is planned differently on each: in memory on the workstation, streamed here.
        here_step = mine or next((p for p in here.memory_steps() if p.target == s.target), None)
        cell = f"{human_size(s.peak_bytes)} ({human_size(s.mapped_bytes)})"
        if here_step is not None and here_step is not mine:
            cell += f"; here {human_size(here_step.peak_bytes)} ({human_size(here_step.mapped_bytes)})"
        print(f"| {s.step.replace(model.name, 'M')} | {cell} | {on_ws[s.step]} | "
              f"{on_here.get(here_step.step, 'left out') if here_step else 'left out (no CUDA)'} |")
    for line in here.skipped:
        print(f"\nThis machine: {line}")


if __name__ == "__main__":
    main()
