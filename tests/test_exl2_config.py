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


def test_the_view_gives_exllamav2_its_shapes_of_the_transformers_5_fields():
    """exllamav2 0.3.2 (config.py) reads partial_rotary_factor only at the top level, asserts that rope_scaling has
    `type` or `rope_type` but not both, reads yarn's and llama3's original_max_position_embeddings inside
    rope_scaling, reads the rope fields of a text_config too, and refuses a list for bos/pad."""
    phi = transformers4_config({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.4}})
    assert phi["partial_rotary_factor"] == 0.4 and "rope_scaling" not in phi
    both = transformers4_config({"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4.0},
                                 "original_max_position_embeddings": 4096})
    assert both["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    llama3 = transformers4_config({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0}, "original_max_position_embeddings": 8192})
    assert llama3["rope_scaling"]["original_max_position_embeddings"] == 8192
    longrope = transformers4_config({"rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope", "long_factor": [1.0],
                                                         "short_factor": [1.0], "original_max_position_embeddings": 4096}})
    assert longrope["original_max_position_embeddings"] == 4096
    multimodal = transformers4_config({"bos_token_id": [1, 2], "pad_token_id": [], "eos_token_id": [2, 3], "text_config": {
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 2.0}, "bos_token_id": [1]}})
    assert multimodal["bos_token_id"] == 1 and multimodal["pad_token_id"] is None and multimodal["eos_token_id"] == [2, 3]
    assert multimodal["text_config"]["rope_theta"] == 1e6 and multimodal["text_config"]["bos_token_id"] == 1
    assert multimodal["text_config"]["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0}


# exllamav2 compiles its CUDA extension on import; a stand-in module lets its config and attention modules import
# on a CPU (../shared/gpu/README.md), so what it reads, and which attention it would run, show here.
EXLLAMA_READS = '''
import json, sys, types
sys.modules["exllamav2_ext"] = types.ModuleType("exllamav2_ext")
from exllamav2.config import ExLlamaV2Config
from quantkit.formats.exl2.runner import attention_backend
for folder in sys.argv[1:]:
    c = ExLlamaV2Config()
    c.model_dir = folder
    c.prepare(no_tensors=True)
    print(json.dumps({"base": c.rotary_embedding_base, "head_dim": c.head_dim, "norm_eps": c.norm_eps,
                      "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size,
                      "bos": c.bos_token_id, "partial_rotary_factor": c.partial_rotary_factor,
                      "scaling": c.alt_rope_method, "yarn": [getattr(c, "yarn_rope_factor", None),
                                                             getattr(c, "yarn_rope_original_max_position_embeddings", None)],
                      "head": c.arch.lm.keys["lm_head"], "no_sdpa": c.no_sdpa, "attention": attention_backend(c)}))
'''


def _exllamav2_reads(*folders, env=None) -> list[dict]:
    """What ExLlamaV2Config reads from each folder, in one child process with `env` (exllamav2 reads its
    EXLLAMA_* variables there)."""
    from quantkit.procs import run_python

    done = run_python(["-c", EXLLAMA_READS, *map(str, folders)], env=env, what="exllamav2's config")
    return [json.loads(line) for line in done.lines if line.startswith("{")]


def test_exllamav2_reads_the_view_as_transformers_does_and_runs_causal_attention_in_quantkits_children(sample_model, tmp_path):
    from quantkit.formats.exl2 import CHILD_ENV, EXL2Format

    view = source_view(sample_model, tmp_path / "view")
    config = json.loads((sample_model / "config.json").read_text())
    # A yarn-scaled copy with a partial rotary factor and a list of BOS ids, as transformers 5 may write one.
    yarn = dict(config, bos_token_id=[config["bos_token_id"], 7], rope_parameters={
        "rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
        "partial_rotary_factor": 0.5})
    source = tmp_path / "yarn"
    source.mkdir()
    for f in sample_model.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f, source / f.name)
    (source / "config.json").write_text(json.dumps(yarn))
    seen, scaled, raw = _exllamav2_reads(view, source_view(source, tmp_path / "yarn-view"), sample_model, env=CHILD_ENV)
    assert seen["base"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert (seen["head_dim"], seen["norm_eps"], seen["heads"], seen["kv_heads"], seen["vocab"]) == (
        config["hidden_size"] // config["num_attention_heads"], config["rms_norm_eps"], config["num_attention_heads"],
        config["num_key_value_heads"], config["vocab_size"])
    assert seen["head"] == "model.embed_tokens"  # the tied head is read from the embedding
    assert scaled["base"] == 1e6 and scaled["scaling"] == "yarn" and scaled["yarn"] == [4.0, 2048]
    assert scaled["partial_rotary_factor"] == 0.5 and scaled["bos"] == config["bos_token_id"]
    # The sample as transformers 5 wrote it: the base exllamav2 falls back to (issue 14's perplexity 202).
    assert raw["base"] == 10000.0
    # What every exllamav2 process quantkit starts (converter, preflight, evaluation) gets, as exllamav2 reads it.
    assert EXL2Format.evaluation.env == CHILD_ENV == {"EXLLAMA_NO_SDPA": "1"}
    assert seen["no_sdpa"] is True and seen["attention"] == "torch matmul (causal mask)"
    # Without it, exllamav2 0.3.2 picks torch's SDPA path, whose decoder mask is None outside packed batches.
    [plain] = _exllamav2_reads(view)
    assert plain["no_sdpa"] is False and plain["attention"] == "torch SDPA (no causal mask)"


def test_the_attention_setting_is_in_every_exl2_key(sample_model, tmp_path, monkeypatch):
    """Measurements and folders made before exllamav2 ran with causal attention (and their evaluations) are made
    again: the setting is part of each resume key and each evaluation key."""
    from quantkit import formats
    from quantkit.build import _artifact_key
    from quantkit.formats import exl2
    from quantkit.manifest import Manifest
    from quantkit.progress import Reporter
    from quantkit.source import resolve

    fmt = formats.get("exl2")
    source = resolve(str(sample_model))
    items = fmt.plan(source, fmt.read_options({"bits": [4.0]}))
    context = formats.BuildContext(source=source, out_dir=tmp_path, reporter=Reporter(quiet=True), threads=1)
    assert [fmt.inputs(i, context)["attention"] for i in items] == ["EXLLAMA_NO_SDPA=1"] * 2

    def key(item):
        return _artifact_key(item, context, {}, Manifest(tmp_path), "source", {})

    now = key(items[0])
    monkeypatch.setitem(exl2.CHILD_ENV, "EXLLAMA_NO_SDPA", "0")
    assert key(items[0]) != now


def test_an_evaluation_runner_gets_its_formats_environment(tmp_path):
    """The evaluator hands a format's Evaluation.env to its runner's process (HelperRun.env), locally and on Ray."""
    from quantkit.executors import HelperRun, LocalExecutor
    from quantkit.formats.exl2 import EXL2Format
    from quantkit.progress import Reporter

    seen = "import os, pathlib; pathlib.Path('env.txt').write_text(os.environ.get('EXLLAMA_NO_SDPA', 'unset'))"
    run = HelperRun("env", ("-c", seen), tmp_path, env=tuple(sorted(EXL2Format.evaluation.env.items())))
    assert list(LocalExecutor().run_helpers([run], Reporter(quiet=True))) == [run]
    assert (tmp_path / "env.txt").read_text() == "1"
