#!/usr/bin/env python3
"""What computing the importance matrix from the Q8_0 file (gguf.imatrix.from: q8_0) changes, against the
baseline of computing it from the 16-bit intermediate, both in the same run: the KLD and top-1 agreement of
IQ4_XS and Q4_K_M quantized with each, and llama-imatrix's peak memory (it maps the whole file it runs).

On the sample and on the Mixtral-shaped synthetic (`moe`, 0.52B, 8 experts, top-2; random weights, so its
numbers say how far the two imatrices differ, not how good either is). The second build of each model starts
from a copy of the first (F16, Q8_0 and the reference are taken as built; only the imatrix and the two quants
are made again), so both are scored on the same tokens against the same reference.

Usage: .venv/bin/python scripts/bench_imatrix.py [--models sample moe] [--tokens 4096] [--chunks 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_synthetic_model import make  # noqa: E402

from quantkit.sample import ensure_sample  # noqa: E402

QUANTS = ("Q4_K_M", "IQ4_XS")


def profile(source: str, tokens: int, chunks: int) -> str:
    frm = ", from: q8_0" if source == "q8_0" else ""
    return "\n".join([
        f"name: imatrix-from-{source}", "formats:", "  gguf:",
        f"    imatrix: {{text: builtin:botchan, chunks: {chunks}, ctx: 512{frm}}}",
        # Q8_0 without the imatrix in both builds, so that the second build takes it as the first made it.
        "    types: [Q4_K_M, IQ4_XS, {type: Q8_0, imatrix: false}]",
        "evaluation:", "  window: 512", f"  max_tokens: {tokens}",
        "chat_checks:", "  enabled: false",
        "smoke:", "  max_tokens: 8", "  allow_failures: true  # random weights answer nothing",
    ]) + "\n"


def build(model: Path, out: Path, text: str) -> dict:
    prof = out / "profile.yaml"
    prof.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "quantkit", "build", str(model), "--profile", str(prof),
                           "--out", str(out)], capture_output=True, text=True)
    if proc.returncode not in (0, 7):  # 7: smoke tests failed, which random weights always do
        sys.exit(f"quantkit build exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    report = json.loads((out / model.name / "report.json").read_text())
    return {a["variant"]: a for a in report["artifacts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sample", "moe"])
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per artifact")
    ap.add_argument("--chunks", type=int, default=32, help="imatrix chunks of 512 tokens")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as tmp:
        for name in args.models:
            model = ensure_sample() if name == "sample" else make(name)
            first, second = Path(tmp) / name / "intermediate", Path(tmp) / name / "q8_0"
            first.mkdir(parents=True)
            base = build(model, first, profile("intermediate", args.tokens, args.chunks))
            shutil.copytree(first / model.name, second / model.name, symlinks=True)  # copy2 keeps the mtimes
            q8 = build(model, second, profile("q8_0", args.tokens, args.chunks))
            row = {"model": name, "imatrix_peak_gb": {k: round(b["imatrix"]["peak_rss_bytes"] / 1e9, 3)
                                                       for k, b in (("intermediate", base), ("q8_0", q8))}}
            for quant in QUANTS:
                e0, e1 = base[quant]["evaluation"], q8[quant]["evaluation"]
                row[quant] = {"kld_intermediate": e0["kld_mean"], "kld_q8_0": e1["kld_mean"],
                              "kld_ratio": e1["kld_mean"] / e0["kld_mean"],
                              "top1_intermediate": e0["top1_agreement"], "top1_q8_0": e1["top1_agreement"],
                              "tokens": e1["tokens_scored"]}
            rows.append(row)
            shutil.rmtree(Path(tmp) / name)
    print(f"{'model':8} {'quant':7} {'KLD (16-bit imatrix)':>21} {'KLD (Q8_0 imatrix)':>19} {'ratio':>7} "
          f"{'top-1 16-bit':>13} {'top-1 Q8_0':>11}")
    for r in rows:
        for quant in QUANTS:
            q = r[quant]
            print(f"{r['model']:8} {quant:7} {q['kld_intermediate']:21.5f} {q['kld_q8_0']:19.5f} {q['kld_ratio']:7.3f} "
                  f"{q['top1_intermediate']:13.3f} {q['top1_q8_0']:11.3f}")
        peaks = r["imatrix_peak_gb"]
        print(f"{r['model']:8} llama-imatrix peak RSS: {peaks['intermediate']} GB from the intermediate, "
              f"{peaks['q8_0']} GB from Q8_0 (ratio {peaks['q8_0'] / peaks['intermediate']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
