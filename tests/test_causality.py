"""The causality probe (quantkit/evaluate/causality.py): a runtime whose positions see later tokens is stopped,
whatever its KLD. The sample through transformers passes it exactly; the same model with its attention made
bidirectional fails it by whole nats; every runner's loop runs it on its first round."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from quantkit.errors import ToolError
from quantkit.evaluate import causality
from quantkit.evaluate.metrics import scored_range
from quantkit.evaluate.protocol import EvalSpec, run
from test_eval_protocol import CTX, SMOKE, VOCAB, ToyRuntime

WINDOW = 64


@pytest.fixture(scope="module")
def sample_lm(sample_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(sample_model, dtype=torch.float32)


def _scored(model, first, last, kwargs):
    def forward(window: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(window.astype(np.int64))[None], **kwargs(window)).logits[0, first:last].numpy()
    return forward


def test_transformers_passes_and_the_same_model_made_bidirectional_fails(sample_lm):
    first, last = scored_range(WINDOW)
    window = (np.arange(WINDOW) * 37 + 5) % sample_lm.config.vocab_size
    causal = causality.measure("transformers", _scored(sample_lm, first, last, lambda w: {}), window, first, last,
                               sample_lm.config.vocab_size)
    assert causal.check() is causal and causal.max_delta == 0.0 and causal.positions == causal.cut - first == 15
    # A mask of zeros lets every position attend to every other: the runtime exllamav2 0.3.2's SDPA path is.
    no_mask = _scored(sample_lm, first, last, lambda w: {"attention_mask": torch.zeros(1, 1, len(w), len(w))})
    leak = causality.measure("bidirectional transformers", no_mask, window, first, last, sample_lm.config.vocab_size)
    assert leak.max_delta > 100 * causality.MAX_DELTA and not leak.passed
    with pytest.raises(ToolError, match=r"^bidirectional transformers attends to future tokens: changing a window's "
                                        r"tokens from position 47 on moved its predictions before that by up to"):
        leak.check()
    assert leak.to_dict() | {"max_delta": 0} == {"runtime": "bidirectional transformers", "max_delta": 0, "cut": 47,
                                                "positions": 15, "passed": False, "bound": causality.MAX_DELTA}


class LeakyRuntime(ToyRuntime):
    """The toy runtime, with every prediction nudged by the window's last token: it sees the future."""

    name = "leaky toy"

    def forward(self, window):
        return super().forward(window) + 0.5 * np.eye(VOCAB, dtype=np.float32)[window[-1]]


def test_a_parity_runs_loop_probes_its_runtime_on_the_first_round_only(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(5 * CTX + 3, dtype=np.int32) % VOCAB)
    spec = EvalSpec(tokens=str(tmp_path / "tokens.npy"), window=CTX, bos=6, threads=1, smoke=SMOKE, causality=True)
    toy = ToyRuntime()
    out = run(toy, replace(spec, reference=True, windows=3, state=str(tmp_path / "state.npz")))
    assert out.causality == {"runtime": "ToyRuntime", "max_delta": 0.0, "cut": 11, "positions": 3, "passed": True,
                             "bound": causality.MAX_DELTA}
    # The probe's twin is scored first, in prepare's order, then the windows; it costs one window.
    assert len(toy.seen) == 4 and list(toy.seen[0][:11]) == list(toy.seen[1][:11])
    assert list(toy.seen[0][11:]) == list((toy.seen[1][11:] + 1) % VOCAB) and len(toy.prepared) == 4
    later = run(ToyRuntime(), replace(spec, reference=True, state=str(tmp_path / "state.npz"), chat=False))
    assert later.windows == 5 and later.causality is None
    with pytest.raises(ToolError, match="^leaky toy attends to future tokens"):
        run(LeakyRuntime(), replace(spec, reference=True))
