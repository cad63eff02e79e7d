"""The runner protocol (quantkit/evaluate/protocol.py) on a runtime small enough to check by hand: the spec's JSON
and key as the manifests have them, the output's validation, the shared loop, one parity for every runtime, and a
third-party runner module run as the build runs it."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from quantkit.evaluate.metrics import Accumulator, Windows, log_softmax
from quantkit.evaluate.parity import Parity
from quantkit.evaluate.protocol import EvalOutput, EvalSpec, run
from quantkit.evaluate.stats import Precision

VOCAB, CTX = 7, 16
SMOKE = {"system": "s", "question": "capital?", "expect": "Paris", "max_tokens": 8}


class ToyRuntime:
    """Logits that depend on each position's token and the window's first one (so BOS shows)."""

    vocab_size = VOCAB

    def __init__(self, noise: float = 0.0, template: bool = True) -> None:
        self.noise, self.prepared, self.seen = noise, None, []
        self.render = (lambda messages: "|".join(m["content"] for m in messages)) if template else None

    def prepare(self, windows):
        self.prepared = [w.copy() for w in windows]

    def forward(self, window):
        self.seen.append(window.copy())
        rows = np.arange(CTX // 2, CTX - 1)
        logits = np.zeros((len(rows), VOCAB), np.float32)
        logits[np.arange(len(rows)), (window[rows] + window[0]) % VOCAB] = 3.0
        return logits + self.noise * np.sin(np.arange(VOCAB) * (1 + window[rows, None]))

    def generate(self, turns):
        return [("It is Paris.", "<end>") for _ in turns]


@pytest.fixture
def tokens(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(5 * CTX + 3, dtype=np.int32) % VOCAB)
    return str(tmp_path / "tokens.npy")


def test_the_spec_json_and_key_are_the_ones_manifests_hold(tokens):
    # The build's spec as runner.py wrote it as a dict before protocol.py; its key is made of this JSON.
    old = {"tokens": tokens, "bos": 1, "ctx": 512, "threads": 2, "smoke": SMOKE, "generate": "stored",
           "probes": {"tool_call": "p"}, "probe_tokens": 96, "precision": {"relative": 0.03, "confidence": 0.95}}
    spec = EvalSpec.from_json(old)
    assert spec.precision == Precision(0.03, 0.95) and spec.chat and not spec.reference
    assert spec.window == 512  # the Python name; the JSON key stays "ctx", of which the manifests' keys are made
    assert spec.to_json() == old
    keyed = {k: v for k, v in old.items() if k not in ("tokens", "threads")}
    assert spec.key_json() == json.dumps(keyed, sort_keys=True)
    # Per-run keys are written only when set; chat only when false (a later round).
    assert replace(spec, chat=False, windows=8).to_json() == old | {"chat": False, "windows": 8}
    # A newer quantkit's key is kept and written back; a spec without tokens or ctx is refused.
    newer = EvalSpec.from_json(old | {"from_the_future": [1]})
    assert newer.extra == {"from_the_future": [1]} and newer.to_json()["from_the_future"] == [1]
    with pytest.raises(ValueError, match="lacks ctx"):
        EvalSpec.from_json({"tokens": tokens})
    with pytest.raises(ValueError, match="ctx is '512'"):
        EvalSpec.from_json({"tokens": tokens, "ctx": "512"})
    # A runner written against the dict reads it as one.
    assert spec["ctx"] == 512 and spec.get("bos") == 1 and spec.get("ref_read") is None and {**spec} == old


def test_the_output_is_validated_and_keeps_a_runners_own_facts():
    out = EvalOutput.of({"perplexity": 11.5, "tokens_scored": 254, "windows": 2, "precise": False, "mine": "x"})
    assert out.extra == {"mine": "x"} and out["mine"] == "x" and out.kld_mean is None
    assert {**out, "note": "n"}["note"] == "n"
    with pytest.raises(ValueError, match="lacks windows"):
        EvalOutput.of({"perplexity": 11.5, "tokens_scored": 254})


def test_the_loop_scores_windows_with_bos_against_the_reference_and_runs_the_chat_turns(tokens, tmp_path):
    spec = EvalSpec(tokens=tokens, window=CTX, bos=6, threads=1, smoke=SMOKE)
    ref = ToyRuntime()
    written = run(ref, replace(spec, reference=True, ref_write=str(tmp_path / "ref.npy")))
    assert written.windows == 5 and written.tokens_scored == 5 * 7 and written.kld_mean is None
    assert [w[0] for w in ref.seen] == [6] * 5 and ref.prepared is not None and len(ref.prepared) == 5
    assert written.causality is None  # only a parity run asks for the probe (tests/test_causality.py)
    assert written.smoke["passed"] and written.smoke["prompt"] == "s|capital?"
    # The same runtime against its own rows: KLD at the float16 rows' rounding, every top-1 the same.
    same = run(ToyRuntime(), replace(spec, ref_read=str(tmp_path / "ref.npy")))
    assert same.kld_mean < 1e-4 and same.top1_agreement == 1.0 and same.perplexity == pytest.approx(written.perplexity, 1e-3)
    # Two rounds (3 windows, then the rest from the kept state) give one run's numbers; the second runs no chat turns.
    noisy = replace(spec, ref_read=str(tmp_path / "ref.npy"))
    whole = run(ToyRuntime(noise=1.0), noisy)
    state = str(tmp_path / "state.npz")
    first = run(ToyRuntime(noise=1.0), replace(noisy, windows=3, state=state))
    second = run(ToyRuntime(noise=1.0), replace(noisy, state=state, chat=False))
    assert first.windows == 3 and second.windows == 5 and second.smoke is None
    assert second.kld_mean == whole.kld_mean and second.top1_agreement == whole.top1_agreement
    # No template: the smoke test fails saying so.
    bare = run(ToyRuntime(template=False), noisy)
    assert not bare.smoke["passed"] and bare.smoke["reason"] == "the artifact has no chat template"


def test_a_precision_target_stops_the_loop(tmp_path):
    np.save(tmp_path / "long.npy", np.arange(200 * CTX, dtype=np.int32) % VOCAB)
    spec = EvalSpec(tokens=str(tmp_path / "long.npy"), window=CTX, threads=1)
    run(ToyRuntime(), replace(spec, reference=True, ref_write=str(tmp_path / "ref.npy"), chat=False))
    out = run(ToyRuntime(noise=0.5), replace(spec, ref_read=str(tmp_path / "ref.npy"), chat=False,
                                             precision=Precision(0.5, 0.9)))
    assert out.precise and out.tokens_scored >= 1000 and out.windows < 200


def test_one_parity_formula_for_every_runtime():
    rng = np.random.default_rng(0)
    ref, other = (log_softmax(rng.normal(size=(40, 50)).astype(np.float32)) for _ in range(2))
    acc = Accumulator()
    acc.add(other, np.zeros(40, dtype=int), ref)
    parity = Parity.measure("toy", [ref[:20], ref[20:]], [other[:20], other[20:]])
    assert parity.kld_mean == acc.summary()["kld_mean"] and parity.top1_agreement == acc.summary()["top1_agreement"]
    assert parity.tokens_scored == 40 and not parity.passed and "KLD" in parity.problems()
    assert Parity.measure("same", [ref], [ref]).passed
    assert Parity.of("gguf", acc.summary()) == replace(parity, runtime="gguf")


def test_windows_put_bos_first_as_every_runner_reads_them():
    text = Windows(np.arange(40, dtype=np.int32), CTX, 99)
    assert len(text) == 2 and text[1][0] == 99 and list(text[1][1:4]) == [17, 18, 19]
    assert Windows(np.arange(40, dtype=np.int32), CTX, None)[1][0] == 16


RUNNER = '''
import sys
import numpy as np
from quantkit.evaluate.protocol import run, runner_main
from test_eval_protocol import ToyRuntime

def evaluate(target, spec):
    return run(ToyRuntime(), spec)

if __name__ == "__main__":
    sys.exit(runner_main(sys.argv[1:], {"evaluate": evaluate}))
'''


def test_a_third_party_runner_speaks_the_protocol(tokens, tmp_path):
    from pathlib import Path

    (tmp_path / "toyrunner.py").write_text(RUNNER)
    spec = EvalSpec(tokens=tokens, window=CTX, bos=None, threads=1, smoke=SMOKE, reference=True,
                    ref_write=str(tmp_path / "ref.npy"))
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_json()))
    path = f"{tmp_path}:{Path(__file__).parent}:{Path(__file__).parent.parent}"
    subprocess.run([sys.executable, "-m", "toyrunner", "evaluate", "toy", str(tmp_path / "spec.json"),
                    str(tmp_path / "out.json")], check=True, env={"PYTHONPATH": path}, cwd=tmp_path)
    written = json.loads((tmp_path / "out.json").read_text())
    out = EvalOutput.from_json(written)
    assert out.windows == 5 and out.smoke["passed"] and out.peak_rss_bytes > 0 and "seconds" in written
    (tmp_path / "bad.json").write_text(json.dumps({"ctx": CTX}))
    bad = subprocess.run([sys.executable, "-m", "toyrunner", "evaluate", "toy", str(tmp_path / "bad.json"),
                          str(tmp_path / "out2.json")], env={"PYTHONPATH": path}, cwd=tmp_path, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "an evaluation spec lacks tokens" in bad.stderr
