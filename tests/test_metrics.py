"""The scoring math on arrays small enough to check by hand."""

import math

import numpy as np
import pytest

from quantkit.errors import ProfileError
from quantkit.evaluate.metrics import Accumulator, log_softmax, scored_range, windows
from quantkit.profiles import parse_profile


def test_log_softmax_normalizes():
    lp = log_softmax(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0)
    assert lp[1, 0] == pytest.approx(-math.log(3))


def test_kl_top1_and_perplexity_by_hand():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    art = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.7, 0.2]]))
    acc = Accumulator()
    acc.add(art, np.array([0, 1]), ref)
    s = acc.summary()
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    kl1 = 0.8 * math.log(0.8 / 0.7) + 0.1 * math.log(0.1 / 0.2)
    assert s["kld_mean"] == pytest.approx((kl0 + kl1) / 2)
    assert s["top1_agreement"] == 0.5  # row 0 disagrees (0 vs 1), row 1 agrees
    assert s["perplexity"] == pytest.approx(math.exp(-(math.log(0.25) + math.log(0.7)) / 2))


def test_windows_follow_llama_perplexity_layout():
    assert windows(1100, 512) == [(0, 512), (512, 1024)]
    assert scored_range(512) == (256, 511)


def test_profile_errors_name_the_key():
    with pytest.raises(ProfileError, match="unknown key"):
        parse_profile({"formats": {"gguf": {}}, "smoke": {"expected": "Paris"}})
    with pytest.raises(ProfileError, match="window must be int"):
        parse_profile({"formats": {"gguf": {}}, "evaluation": {"window": "512"}})
    # The window's old name is read, with a warning for the plan to print; both names at once are refused.
    old = parse_profile({"formats": {"gguf": {}}, "evaluation": {"ctx": 256}})
    assert old.evaluation.window == 256
    assert old.deprecated == ("<dict>: evaluation: 'ctx:' is the old name of 'window:'; rename it (it is still read)",)
    with pytest.raises(ProfileError, match="both 'window' and 'ctx' are given"):
        parse_profile({"formats": {"gguf": {}}, "evaluation": {"ctx": 256, "window": 256}})
    with pytest.raises(ProfileError, match="formats"):
        parse_profile({"name": "x"})
