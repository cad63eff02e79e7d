"""compressed-tensors folders made by llm-compressor (in its own environment, .venv/envs/llmcompressor), scored here
through transformers' compressed-tensors loader: FP8_DYNAMIC of the sample (resuming tiny_seed's reference), W4A16
g32 of the dense synthetic checkpoint (the sample's 30 layers take minutes of GPTQ on CPU), a refusal at plan time,
and a publish as vLLM users find such repos."""

import json
import sys

import pytest
from huggingface_hub import HfApi, ModelCard

from conftest import PROFILES, REPO, TOKEN, run_cli, seed

sys.path.insert(0, str(REPO / "scripts"))
from make_synthetic_model import make  # noqa: E402 (a script, not a package)

pytest.importorskip("compressed_tensors", reason="the ctensors extra is not installed")


@pytest.fixture(scope="module")
def fp8_build(tiny_seed, sample_model, module_dir):
    out = module_dir("ctensors")
    seed(tiny_seed, out)
    proc = run_cli("build", sample_model, "--profile", PROFILES / "ctensors.yaml", "--out", out, check=True)
    folder = out / sample_model.name
    return {"dir": folder, "report": json.loads((folder / "report.json").read_text()), "stderr": proc.stderr}


@pytest.fixture(scope="module")
def w4_build(module_dir):
    model = make("tiny")
    out = module_dir("ctensors-w4")
    run_cli("build", model, "--profile", PROFILES / "ctensors-w4.yaml", "--out", out, check=True)
    folder = out / model.name
    return {"dir": folder, "report": json.loads((folder / "report.json").read_text())}


def _loads_every_weight(folder):
    """The folder through plain transformers (with compressed-tensors installed): nothing missing, nothing extra."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def test_fp8_dynamic_of_the_sample_is_vllms_format_within_its_bounds(fp8_build):
    [a] = fp8_build["report"]["artifacts"]
    folder = fp8_build["dir"] / a["filename"]
    assert a["filename"] == "SmolLM2-135M-Instruct-FP8-Dynamic" and a["backend"] == "compressed_tensors"
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"]) == (8, "float", "channel")
    assert q["config_groups"]["group_0"]["input_activations"]["dynamic"] is True and q["ignore"] == ["lm_head"]
    assert "F8_E4M3" in a["tensor_types"]
    assert abs(a["size_bytes"] - a["predicted_bytes"]) / a["size_bytes"] < 0.02, (a["size_bytes"], a["predicted_bytes"])
    assert "llmcompressor" in a["tools"] and "QuantizationModifier" in a["details"]["recipe"]
    e = a["evaluation"]
    assert e["kld_mean"] < 0.06 and e["top1_agreement"] > 0.80, e  # measured 0.028 / 87.8% (Q8_0 of it: 0.004)
    assert e["smoke_reply"].strip() and e["tokens_scored"] > 0
    assert a["integrity"] == [] and a["failures"] == []
    model = _loads_every_weight(folder)
    assert any("float8" in str(p.dtype) for p in model.parameters()) or model.config.quantization_config


def test_w4a16_of_a_dense_model_is_within_gptqs_bounds(w4_build):
    [a] = w4_build["report"]["artifacts"]
    folder = w4_build["dir"] / a["filename"]
    assert a["variant"] == "W4A16-g32"
    weights = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["group_size"]) == (4, "int", 32)
    assert abs(a["size_bytes"] - a["predicted_bytes"]) / a["size_bytes"] < 0.02, (a["size_bytes"], a["predicted_bytes"])
    assert "GPTQModifier" in a["details"]["recipe"]
    e = a["evaluation"]
    assert e["kld_mean"] < 0.40 and e["top1_agreement"] > 0.52, e  # GPTQModel's GPTQ g32 of it: 0.18 / 65%
    _loads_every_weight(folder)


def test_a_scheme_a_group_size_or_a_calibration_the_model_cannot_take_is_refused_at_plan_time(sample_model, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nformats:\n  compressed_tensors:\n    schemes: [{scheme: W4A16, group_size: 128}]\n")
    proc = run_cli("plan", sample_model, "--profile", bad)
    assert proc.returncode == 4, proc.stderr
    assert "W4A16 with group size 128 does not divide the layer widths [576] of SmolLM2-135M-Instruct" in proc.stderr
    assert "fix: use a group size that divides all of [576, 1536]: [32, 64]" in proc.stderr
    bad.write_text("name: bad\nformats:\n  compressed_tensors:\n    schemes: [{scheme: W3A5}]\n")
    proc = run_cli("plan", sample_model, "--profile", bad)
    assert proc.returncode == 4 and "has no scheme 'W3A5'" in proc.stderr, proc.stderr
    assert "FP8_DYNAMIC, W4A16, W8A8, NVFP4A16" in proc.stderr
    bad.write_text("name: bad\nformats:\n  compressed_tensors:\n    schemes: [{scheme: W4A16, group_size: 64}]\n"
                   "    calibration: {text: builtin:botchan, samples: 100, seq_len: 512}\n")
    proc = run_cli("plan", sample_model, "--profile", bad)
    assert proc.returncode == 4, proc.stderr
    assert "builtin:botchan has 34569 tokens, 67 window(s) of 512, fewer than the 100 samples asked" in proc.stderr
    assert "fix: lower calibration.samples to 67" in proc.stderr


def test_publish_makes_a_repo_per_scheme_as_vllm_users_find_them(fp8_build, hub):
    run_cli("publish", fp8_build["dir"], env=hub.env, check=True)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    repo = "alice/SmolLM2-135M-Instruct-FP8-Dynamic"
    files = api.list_repo_files(repo)
    assert {"config.json", "model.safetensors", "recipe.yaml", "README.md"} <= set(files)
    card = ModelCard.load(api.hf_hub_download(repo, "README.md"))
    data = card.data.to_dict()
    assert data["base_model_relation"] == "quantized" and "compressed-tensors" in data["tags"]
    assert f"vllm serve {repo}" in card.text and f'LLM(model="{repo}")' in card.text
    assert "not through vLLM's kernels" in card.text and "QuantizationModifier" in card.text
