#!/usr/bin/env python3
"""The fp16 reference's scoring and its chat turns, measured apart, now and as before, against the plan's prediction.

The reference worker (evaluate/hf_runner.py) runs on a synthetic checkpoint of a real shape with the default chat
turns (smoke test 48 tokens, tool-call and JSON-mode probes 96 each, prompts rendered from the source's template)
and evaluation `window: 512`, `--tokens` tokens:
- now: every window scored in float32, each prompt read in float32, the replies decoded together in the stored
  16-bit dtype (generate_batch);
- before (the baseline, in the same run): the same prompts, every generated token decoded in float32, one prompt at
  a time (`generate: float32`: the whole model widened again for every token). A token costs it the same however
  many there are, so it runs twice, with 1 and with 1 + `--before-tokens` tokens a turn: the difference is its
  seconds per generated token, the first run its prompts' time, and its time for the full replies is extrapolated
  from the two. Each of its runs scores one window.
Random weights never end a turn, so every reply runs to its cap. Printed: seconds per scored token, per prompt
token and per generated token, the chat turns' time over the scoring's (the issue's bound: at most 2), and the
plan's predictions (evaluate/reference_time.py).

Usage: .venv/bin/python scripts/bench_reference.py [--model 3b|7b|sample] [--tokens 1024] [--before-tokens 8]
           [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from quantkit.build import predict_reference_time  # noqa: E402
from quantkit.evaluate.integrity import folder_facts  # noqa: E402
from quantkit.evaluate.probes import prompts  # noqa: E402
from quantkit.evaluate.text import load_text  # noqa: E402
from quantkit.profiles import parse_profile  # noqa: E402
from quantkit.sample import ensure_sample  # noqa: E402
from quantkit.source import tensor_stats  # noqa: E402

WORKER = "quantkit.evaluate.hf_runner"


def run_reference(folder: Path, work: Path, name: str, spec: dict) -> dict:
    (work / f"{name}.spec.json").write_text(json.dumps(spec))
    out = work / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", WORKER, "evaluate", str(folder), str(work / f"{name}.spec.json"), str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the reference ({name}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="3b", help="a synthetic shape (scripts/make_synthetic_model.py) or 'sample'")
    ap.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (windows of 512)")
    ap.add_argument("--before-tokens", type=int, default=8, help="tokens a turn for the float32 decode (the baseline)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args()
    from make_synthetic_model import make

    model = ensure_sample() if args.model == "sample" else make(args.model)
    stats = tensor_stats(model)
    profile = parse_profile({"name": "bench-reference", "formats": {"gguf": {}},
                             "evaluation": {"ctx": 512, "max_tokens": args.tokens}})
    facts = folder_facts(model)
    smoke = {k: v for k, v in asdict(profile.smoke).items() if k != "allow_failures"}
    probes = prompts(facts, profile.chat_checks)
    with tempfile.TemporaryDirectory(prefix="qk-bench-ref-") as tmp:
        work = Path(tmp)
        (work / "text.txt").write_text(load_text(profile.evaluation.text), encoding="utf-8")
        subprocess.run([sys.executable, "-m", WORKER, "tokenize", str(model), str(work / "text.txt"), str(work / "all.npy"),
                        str(work / "bos.json")], check=True, capture_output=True)
        np.save(work / "tokens.npy", np.load(work / "all.npy")[: args.tokens])
        base = {"tokens": str(work / "tokens.npy"), "bos": json.loads((work / "bos.json").read_text())["bos"],
                "ctx": 512, "threads": args.threads, "reference": True, "smoke": smoke, "probes": probes,
                "probe_tokens": profile.chat_checks.max_tokens}
        now = run_reference(model, work, "now", base)
        before = [run_reference(model, work, f"before-{n}", {**base, "generate": "float32", "windows": 1,
                                                             "smoke": {**smoke, "max_tokens": n}, "probe_tokens": n})
                  for n in (1, 1 + args.before_tokens)]
    plan = predict_reference_time(stats, profile, facts, args.tokens, streamed=False)

    def rates(r: dict) -> dict:
        c = r["chat_stats"]
        return {"scored": r["windows"] * 512, "score_s": r["score_seconds"], "prompt": c["prompt_tokens"],
                "prefill_s": c["prefill_seconds"], "generated": c["generated_tokens"], "decode_s": c["decode_seconds"],
                "chat_s": c["seconds"], "peak_rss": r["peak_rss_bytes"]}

    a, one, more = rates(now), rates(before[0]), rates(before[1])
    full = a["generated"]
    # The float32 decode: its seconds a token from the difference of its two runs; its prompts (and first tokens) from
    # the shorter one; its time for the full replies from both.
    b_token = (more["chat_s"] - one["chat_s"]) / (more["generated"] - one["generated"])
    b_full = one["chat_s"] + (full - one["generated"]) * b_token
    b_score = one["score_s"] / one["scored"]
    print(f"model {model.name}: {stats.params / 1e9:.2f}B parameters, {stats.weight_bytes / 1e9:.2f} GB; {args.threads} "
          f"threads; {a['scored']} window tokens; {a['prompt']} prompt tokens; {full} generated tokens")
    print(f"{'':34} {'s/scored tok':>12} {'s/prompt tok':>12} {'s/gen tok':>10} {'chat s':>8} {'score s':>8} {'chat/score':>10}")
    print(f"{'now (16-bit batched decode)':34} {a['score_s'] / a['scored']:12.4f} {a['prefill_s'] / a['prompt']:12.4f} "
          f"{a['decode_s'] / full:10.3f} {a['chat_s']:8.1f} {a['score_s']:8.1f} {a['chat_s'] / a['score_s']:10.2f}")
    print(f"{'before (float32 every token)':34} {b_score:12.4f} {one['chat_s'] / one['prompt']:12.4f} {b_token:10.3f} "
          f"{b_full:8.1f} {b_score * a['scored']:8.1f} {b_full / (b_score * a['scored']):10.2f}  "
          f"(extrapolated from {one['generated']} and {more['generated']} tokens)")
    print(f"{'plan (evaluate/reference_time.py)':34} {plan.score_seconds / a['scored']:12.4f} {'':12} {'':10} "
          f"{plan.chat_seconds:8.1f} {plan.score_seconds:8.1f} {plan.chat_seconds / plan.score_seconds:10.2f}")
    print(f"chat turns now vs before: {b_full / a['chat_s']:.1f}x faster; measured/predicted: scoring "
          f"{a['score_s'] / plan.score_seconds:.2f}, chat {a['chat_s'] / plan.chat_seconds:.2f}; "
          f"peak RSS now {a['peak_rss'] / 1e9:.2f} GB, before {more['peak_rss'] / 1e9:.2f} GB")
    print(f"bound: chat turns at most 2x the scoring: {'met' if a['chat_s'] <= 2 * a['score_s'] else 'MISSED'} "
          f"({a['chat_s']:.1f} s vs {a['score_s']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"model": model.name, "params": stats.params, "now": a, "before": [one, more],
                                         "before_s_per_token": b_token, "before_full_chat_s": b_full,
                                         "plan": asdict(plan)}, indent=1))


if __name__ == "__main__":
    main()
