"""The reference's chat turns: prompts read in float32, replies decoded as one batch in the stored 16-bit dtype
(evaluate/hf_runner.py generate_batch), with the sample's verdicts those of the float32 decode; and the plan's
prediction of their time against the scoring's (evaluate/reference_time.py)."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np

from conftest import CHILD_TIMEOUT, REPO, run_cli
from quantkit.evaluate.integrity import folder_facts
from quantkit.evaluate.probes import compare_replies, prompts
from quantkit.evaluate.text import load_text
from quantkit.procs import run_python
from quantkit.profiles import ChatChecks, SmokeOptions

WORKER = "quantkit.evaluate.hf_runner"


def test_16bit_batched_replies_keep_the_sample_verdicts(sample_model, tmp_path):
    (tmp_path / "text.txt").write_text(load_text("builtin:botchan"), encoding="utf-8")
    run_python(["-m", WORKER, "tokenize", str(sample_model), str(tmp_path / "text.txt"), str(tmp_path / "all.npy"),
                str(tmp_path / "bos.json")])
    np.save(tmp_path / "tokens.npy", np.load(tmp_path / "all.npy")[:1024])
    checks = ChatChecks()
    # The profile's defaults: a 48-token smoke test and two 96-token probes, on the prompts a build renders.
    # A thread each, both at once (2 cores): the two decodes take turns with nothing else.
    base = {"tokens": str(tmp_path / "tokens.npy"), "bos": json.loads((tmp_path / "bos.json").read_text())["bos"],
            "ctx": 512, "threads": 1, "reference": True, "windows": 1,
            "smoke": {k: v for k, v in asdict(SmokeOptions()).items() if k != "allow_failures"},
            "probes": prompts(folder_facts(sample_model), checks), "probe_tokens": checks.max_tokens}
    procs = {}
    for name, extra in (("float32", {"generate": "float32"}), ("batched", {})):
        (tmp_path / f"{name}.spec.json").write_text(json.dumps({**base, **extra}))
        procs[name] = subprocess.Popen([sys.executable, "-m", WORKER, "evaluate", str(sample_model),
                                        str(tmp_path / f"{name}.spec.json"), str(tmp_path / f"{name}.json")],
                                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
        assert proc.returncode == 0, out[-3000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    old, new = runs["float32"], runs["batched"]
    # The verdicts a build reports: the smoke test's, and each probe's parsed / valid / value.
    assert new["smoke"] == old["smoke"]
    assert new["smoke"]["passed"] and "Paris" in new["smoke"]["reply"] and new["smoke"]["end_token"] == "<|im_end|>"
    verdicts = {name: compare_replies(run["probes"], checks, None) for name, run in runs.items()}
    assert verdicts["batched"] == verdicts["float32"]
    # What the sample's source does (docs/evaluation.md): no tool call; a JSON object that misses the required keys.
    assert not verdicts["batched"]["tool_call"]["parsed"]
    assert verdicts["batched"]["json_mode"]["parsed"] and not verdicts["batched"]["json_mode"]["valid"]
    # The same replies, to the letter: the short smoke reply ended its row of the batch early, the probes ran on.
    assert new["probes"] == old["probes"]
    chat = new["chat_stats"]
    assert chat["prompt_tokens"] == old["chat_stats"]["prompt_tokens"] > 400
    assert chat["generated_tokens"] == old["chat_stats"]["generated_tokens"]
    assert chat["prefill_seconds"] > 0 and chat["decode_seconds"] > 0 and old["chat_stats"]["prefill_seconds"] == 0
    assert new["perplexity"] == old["perplexity"]  # the scoring is untouched


def test_plan_times_the_reference_and_says_when_its_chat_turns_dominate(sample_model, tmp_path):
    # 512 scored tokens and the default chat turns (240 tokens at most): the turns take longer than the scoring.
    chatty = tmp_path / "chatty.yaml"
    chatty.write_text("name: chatty\nformats: {gguf: {types: [Q8_0]}}\nevaluation: {ctx: 256, max_tokens: 512}\n")
    proc = run_cli("plan", sample_model, "--profile", chatty, "--out", tmp_path, check=True)
    lines = proc.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if "reference time:" in line)
    assert "scoring 512 tokens" in lines[i] and "432 prompt tokens" in lines[i], lines[i]
    assert "up to 240 generated: smoke 48, tool call 96, json mode 96" in lines[i], lines[i]
    advice = lines[i + 1]
    assert "the chat turns would take" in advice and "x the reference's scoring" in advice, advice
    for fix in ("smoke.max_tokens", "chat_checks.max_tokens", "chat_checks.enabled: false", "evaluation.reference: streamed"):
        assert fix in advice, advice
    # A 4-token smoke test and no probes: the scoring takes longer again, and the plan has nothing to advise.
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text(chatty.read_text() + "chat_checks: {enabled: false}\nsmoke: {max_tokens: 4}\n")
    proc = run_cli("plan", sample_model, "--profile", quiet, "--out", tmp_path, check=True)
    line = next(line for line in proc.stdout.splitlines() if "reference time:" in line)
    assert "up to 4 generated: smoke 4)" in line, line
    assert "the chat turns would take" not in proc.stdout
