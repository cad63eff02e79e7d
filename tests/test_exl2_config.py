"""The source as exllamav2 reads it (CPU): transformers 5 keeps the RoPE base in rope_parameters, exllamav2
reads a top-level rope_theta and silently falls back to 10000 without it. And the parity bounds that
refuse a runtime which cannot reproduce the fp16 source."""

import json
import os

from quantkit.config_view import source_view, transformers4_config
from quantkit.evaluate.parity import Parity


def test_the_samples_config_gets_its_rope_base_at_the_top_level(sample_model):
    config = json.loads((sample_model / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0  # transformers 5
    out = transformers4_config(config)
    assert out["rope_theta"] == 100000.0
    assert "rope_scaling" not in out  # default RoPE: nothing to scale
    assert out["torch_dtype"] == "float16" and out["tie_word_embeddings"] is True
    assert {k: v for k, v in out.items() if k not in ("rope_theta", "torch_dtype")} == config  # nothing else moves


def test_scaled_rope_becomes_rope_scaling():
    llama3 = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    out = transformers4_config(llama3)
    assert out["rope_theta"] == 500000.0
    assert out["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    yarn = transformers4_config({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}})
    assert yarn["rope_scaling"]["rope_type"] == "yarn" and yarn["rope_scaling"]["factor"] == 4.0
    # A config that already has the old keys keeps them as they are.
    old = {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}}
    assert transformers4_config(old)["rope_scaling"] == {"type": "linear", "factor": 2.0}


def test_rope_per_attention_type_takes_the_full_attention_base():
    gemma3 = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                  "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}}
    out = transformers4_config(gemma3)
    assert out["rope_theta"] == 1e6 and out["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


def test_the_view_links_the_weights_and_translates_the_config(sample_model, tmp_path):
    view = source_view(sample_model, tmp_path / "view")
    names = sorted(p.name for p in view.iterdir())
    assert names == sorted(p.name for p in sample_model.iterdir() if p.is_file())
    weights = view / "model.safetensors"
    assert weights.is_symlink() and os.path.samefile(weights, sample_model / "model.safetensors")
    assert not (view / "config.json").is_symlink()
    assert json.loads((view / "config.json").read_text())["rope_theta"] == 100000.0
    assert json.loads((sample_model / "config.json").read_text()).get("rope_theta") is None  # the source is untouched
    (view / "stale.txt").write_text("x")
    assert not (source_view(sample_model, view) / "stale.txt").exists()  # made anew each time


def test_parity_bounds_name_what_disagrees():
    good = Parity("llama.cpp, F16 GGUF", 4e-5, 1.0, 1530)
    assert good.passed and good.problems() == "" and "agrees" in good.render()
    # What exllamav2 0.3.2 scored on the sample with the default RoPE base (issue 14): far outside.
    bad = Parity("exllamav2, fp16 source", 2.9, 0.21, 1530)
    assert not bad.passed and bad.problems() == "KLD 2.9000 > 0.01; top-1 21.0% < 97%"
    assert not Parity("x", 0.005, 0.95, 10).passed and Parity("x", 0.005, 0.95, 10).problems() == "top-1 95.0% < 97%"


def test_a_rate_can_carry_its_own_head_bits(sample_model):
    """The seeds' EXL2 repos: 3.0-6.0 bpw with a 6-bit head, 8.0 bpw with an 8-bit one."""
    from quantkit.formats.exl2 import EXL2Format
    from quantkit.source import resolve

    exl2, source = EXL2Format(), resolve(str(sample_model))
    items = exl2.plan(source, exl2.read_options({"bits": [6.0, 4.0, {"bits": 8.0, "head_bits": 8}, 4.0]}))
    assert [i.variant for i in items] == ["measurement", "4.0bpw-h6", "6.0bpw-h6", "8.0bpw-h8"]
    assert [i.options.get("head_bits") for i in items[1:]] == [6, 6, 8]
    # The 8-bit head costs what its 2 more bits do on the sample's tied 28M-value head.
    assert items[3].predicted_bytes - exl2.plan(source, exl2.read_options({"bits": [8.0]}))[1].predicted_bytes \
        == 49152 * 576 * 2 // 8
