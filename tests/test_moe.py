"""A Mixtral-shaped checkpoint (8 experts, top-2 routing, Mixtral's tensor names) through GGUF with an
importance matrix, a k-quant and an i-quant, through GPTQ, and through the evaluation. The router of
this checkpoint never picks experts 6 and 7, as calibration leaves experts without data in real MoE
models: llama-imatrix keeps partial data, the build names those experts, and the quantizer still works."""

import json
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader

from conftest import PROFILES, REPO, run_cli

sys.path.insert(0, str(REPO / "scripts"))
from make_synthetic_model import make  # noqa: E402 (a script, not a package)

pytest.importorskip("gptqmodel", reason="the gptq extra is not installed (QUANTKIT_EXTRAS without gptq)")


@pytest.fixture(scope="module")
def moe_build(module_dir):
    model = make("moe-tiny", dead_experts=2)
    out = module_dir("moe")
    proc = run_cli("build", model, "--profile", PROFILES / "moe.yaml", "--out", out, check=True)
    folder = out / model.name
    return {"model": model, "dir": folder, "report": json.loads((folder / "report.json").read_text()), "proc": proc}


def _artifact(report, variant):
    return next(a for a in report["artifacts"] if a["variant"] == variant)


def test_gguf_keeps_the_experts_as_expert_tensors(moe_build):
    folder, name = moe_build["dir"], moe_build["model"].name
    f16 = {t.name: t for t in GGUFReader(folder / f"{name}-F16.gguf").tensors}
    # llama.cpp stacks each layer's 8 experts into one tensor per projection.
    assert [int(d) for d in f16["blk.0.ffn_gate_exps.weight"].shape] == [256, 512, 8]
    assert "blk.3.ffn_down_exps.weight" in f16 and "blk.0.ffn_gate_inp.weight" in f16
    kinds = _artifact(moe_build["report"], "IQ4_XS")["tensor_types"]
    assert "IQ4_XS" in kinds
    meta = GGUFReader(folder / f"{name}-IQ4_XS.gguf").fields
    assert bytes(meta["llama.expert_count"].parts[-1]).hex() and int(meta["llama.expert_count"].parts[-1][0]) == 8
    assert int(meta["llama.expert_used_count"].parts[-1][0]) == 2


def test_imatrix_names_the_experts_calibration_never_reached(moe_build):
    imatrix = next(a for a in moe_build["report"]["artifacts"] if a["role"] == "imatrix")
    idle = imatrix["details"]["experts_without_data"]
    assert sorted(idle) == ["0", "1", "2", "3"]
    assert all({6, 7} <= set(experts) for experts in idle.values())  # the dead experts, in every layer
    assert all(len(experts) < 8 for experts in idle.values())  # the router did reach the others
    log = moe_build["proc"].stdout + moe_build["proc"].stderr
    assert "saw no calibration token" in log and "6, 7" in log
    md = (moe_build["dir"] / "report.md").read_text()
    assert "Calibration routed no token to" in md
    # The i-quant and the k-quant were still made with the importance matrix (llama.cpp's partial-data path).
    assert all(imatrix["filename"] in _artifact(moe_build["report"], v)["uses"] for v in ("IQ4_XS", "Q4_K_M"))


def test_every_format_is_evaluated_against_the_fp16_source(moe_build):
    report = moe_build["report"]
    ref = report["evaluation"]["reference_result"]
    assert ref["tokens_scored"] == 4 * 127 and ref["peak_rss_bytes"] > 0
    f16 = _artifact(report, "F16")["evaluation"]
    assert f16["kld_mean"] < 1e-3 and f16["top1_agreement"] > 0.99 and abs(f16["ppl_delta_pct"]) < 0.1
    # The synthetic head spreads logits as a trained model's do, so broken weights show: transformers
    # loading the GPTQ folder with its experts left unset scored KLD 0.77 and top-1 14% here.
    for variant in ("Q4_K_M", "IQ4_XS", "4bit-g128"):
        e = _artifact(report, variant)["evaluation"]
        assert e["tokens_scored"] == ref["tokens_scored"]
        assert e["kld_mean"] < 0.15 and e["top1_agreement"] > 0.5, (variant, e)
        assert e["peak_rss_bytes"] > 0 and e["predicted_peak_bytes"] > 0


def test_gptq_quantized_the_experts(moe_build):
    gptq = _artifact(moe_build["report"], "4bit-g128")
    folder = moe_build["dir"] / gptq["filename"]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["architectures"] == ["MixtralForCausalLM"]
    from quantkit.source import safetensors_header

    names = {n for f in folder.glob("*.safetensors") for n in safetensors_header(f) if n != "__metadata__"}
    assert any(".experts." in n and n.endswith(".qweight") for n in names), sorted(names)[:20]
    # GPTQModel writes one module per expert; plain transformers 5 reads them fused and leaves them unset. With the
    # experts kept per module (quantkit/evaluate/experts.py), transformers reads every weight of the folder, so it is
    # measured as its users load it, with no fallback to GPTQModel's loader.
    assert not gptq["evaluation"].get("note"), gptq["evaluation"]["note"]
    assert "cannot load this folder" not in (moe_build["dir"] / "report.md").read_text()


def _python_blocks(lines: list[str]) -> list[str]:
    text, blocks = "\n".join(lines), []
    for part in text.split("```python\n")[1:]:
        blocks.append(part.split("```")[0])
    return blocks


def test_the_cards_transformers_snippet_loads_every_weight_of_the_moe_gptq_folder(moe_build):
    """The card's "Run" section, followed as written (the folder in place of the repo id): transformers reads every
    weight. Without its defuser line, transformers' own load report lists the experts as MISSING."""
    from quantkit import formats
    from quantkit.procs import run_python
    from quantkit.results import Judged

    gptq = _artifact(moe_build["report"], "4bit-g128")
    folder = str(moe_build["dir"] / gptq["filename"])
    usage = formats.get("gptq").card.usage("org/model-GPTQ", folder, Judged.from_dict(gptq))
    assert any("vllm serve org/model-GPTQ --revision 4bit-g128" in line for line in usage)
    snippet = next(b for b in _python_blocks(usage) if "transformers" in b)
    assert 'replace_fused_blocks("mixtral")' in snippet
    snippet = snippet.replace('"org/model-GPTQ"', repr(folder)) + "print('loaded', type(model).__name__)\n"
    out = "\n".join(run_python(["-c", snippet], what="the card's snippet").lines)
    assert "loaded MixtralForCausalLM" in out
    assert "MISSING" not in out and "UNEXPECTED" not in out, out[-3000:]
    plain = "\n".join(l for l in snippet.splitlines() if "replace_fused_blocks" not in l)
    out = "\n".join(run_python(["-c", plain], what="the snippet without defuser").lines)
    assert "mlp.experts.gate_up_proj" in out and "MISSING" in out, out[-3000:]


def test_mlx_4bit_keeps_the_experts_stacked_and_is_scored_on_them(moe_build):
    pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")
    mlx = _artifact(moe_build["report"], "4bit")
    from quantkit.source import safetensors_header

    folder = moe_build["dir"] / mlx["filename"]
    names = {n for f in folder.glob("*.safetensors") for n in safetensors_header(f)}
    assert "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight" in names  # mlx-lm's layout: [experts, out, in]
    assert not any(".experts." in n for n in names)
    # Its exact weights were split back into the source's per-expert names (a name transformers did not read would
    # have stopped the evaluation), and mlx-lm reproduced transformers on them.
    e = mlx["evaluation"]
    assert e["tokens_scored"] == 4 * 127
    assert e["kld_mean"] < 0.6 and e["top1_agreement"] > 0.45, e
    runtime = float(e["note"].split("mlx-lm vs transformers on the same weights: KLD ")[1].split(",")[0])
    assert runtime < 0.01


def _hf_evaluate(folder: Path, tmp: Path, name: str, **spec) -> dict:
    from quantkit.procs import run_python

    (tmp / f"{name}.spec.json").write_text(json.dumps({"ctx": 256, "reference": True, **spec}))
    run_python(["-m", "quantkit.evaluate.hf_runner", "evaluate", str(folder), str(tmp / f"{name}.spec.json"),
                str(tmp / f"{name}.json")])
    return json.loads((tmp / f"{name}.json").read_text())


# Float32 log-probabilities of the reference's model as hf_runner loads it (the scored rows of the report are
# stored as float16, whose rounding, KLD ~4e-5, would hide a difference of 1e-6), and how much anonymous memory
# the load added (a fused copy is anonymous; weights left in the memory-mapped files are not). At this size the
# whole run's peak is the output head's activations, so the copy shows in the load, not in the peak.
_LOGPROBS = """
import sys, numpy as np, torch, defuser.defuser, transformers.models.mixtral.modeling_mixtral
from transformers import AutoModelForCausalLM
from quantkit.evaluate.hf_runner import load_model
def anonymous():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
before = anonymous()
model, _, _ = load_model(sys.argv[1], {"reference": True, "experts": sys.argv[2]})
print("load-anonymous", anonymous() - before)
ids = torch.from_numpy(np.load(sys.argv[3])[:4 * 256].astype(np.int64)).reshape(4, 256)
with torch.inference_mode():
    np.save(sys.argv[4], torch.log_softmax(model(ids).logits.float(), -1).numpy())
"""


def test_the_reference_keeps_experts_as_stored_and_agrees_with_the_fused_load(moe_build, tmp_path):
    import numpy as np
    from dataclasses import asdict

    from quantkit.evaluate.experts import FUSED
    from quantkit.evaluate.text import load_text
    from quantkit.procs import run_python
    from quantkit.profiles import SmokeOptions
    from quantkit.source import tensor_stats

    model = moe_build["model"]
    (tmp_path / "text.txt").write_text(load_text("builtin:botchan"), encoding="utf-8")
    run_python(["-m", "quantkit.evaluate.hf_runner", "tokenize", str(model), str(tmp_path / "text.txt"),
                str(tmp_path / "tokens.npy"), str(tmp_path / "bos.json")])
    logprobs, loaded = {}, {}
    for how in (FUSED, "stored"):
        done = run_python(["-c", _LOGPROBS, str(model), how, str(tmp_path / "tokens.npy"), str(tmp_path / f"{how}.npy")])
        logprobs[how] = np.load(tmp_path / f"{how}.npy").astype(np.float64)
        loaded[how] = int(next(l for l in done.lines if l.startswith("load-anonymous ")).split()[1])
    p, q = logprobs[FUSED], logprobs["stored"]
    kld = float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))
    top1 = float(np.mean(p.argmax(-1) == q.argmax(-1)))

    common = {"tokens": str(tmp_path / "tokens.npy"), "bos": json.loads((tmp_path / "bos.json").read_text())["bos"],
              "windows": 4, "smoke": asdict(SmokeOptions(max_tokens=8))}
    fused = _hf_evaluate(model, tmp_path, "fused", experts=FUSED, **common)
    stored = _hf_evaluate(model, tmp_path, "stored", **common)
    delta = abs(stored["perplexity"] / fused["perplexity"] - 1)
    experts = tensor_stats(model).expert_bytes
    print(f"fused PPL {fused['perplexity']:.6f}, per-expert PPL {stored['perplexity']:.6f}, float32 KLD {kld:.2e}, "
          f"top-1 {top1:.4f}; anonymous memory of the load {loaded[FUSED] / 1e6:.0f} MB -> {loaded['stored'] / 1e6:.0f} MB, "
          f"the run's peak {fused['peak_rss_bytes'] / 1e6:.0f} MB -> {stored['peak_rss_bytes'] / 1e6:.0f} MB "
          f"(experts {experts / 1e6:.0f} MB)", file=sys.stderr)
    assert kld < 1e-6 and top1 > 0.999
    assert stored["tokens_scored"] == fused["tokens_scored"] == 4 * 127 and delta < 1e-5
    assert stored["smoke"]["reply"] == fused["smoke"]["reply"]
    # The fused load's copy of the experts is gone.
    assert loaded[FUSED] - loaded["stored"] > 0.8 * experts
    assert stored["peak_rss_bytes"] <= fused["peak_rss_bytes"] + 0.05 * experts


def test_a_checkpoint_with_weights_the_model_does_not_read_is_refused(moe_build, tmp_path):
    """Renamed expert weights: transformers would leave them at random values. The reference refuses, naming them."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = moe_build["model"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    for f in broken.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({n.replace(".experts.3.w1.", ".experts.3.w9."): v for n, v in tensors.items()}, f,
                  metadata={"format": "pt"})
    from quantkit.procs import run_python

    (tmp_path / "tokens.npy").write_bytes((moe_build["dir"] / ".quantkit" / "eval-tokens.npy").read_bytes())
    (tmp_path / "spec.json").write_text(json.dumps({"tokens": str(tmp_path / "tokens.npy"), "bos": None, "ctx": 256,
                                                    "reference": True, "windows": 1}))
    from quantkit.errors import ToolError

    with pytest.raises(ToolError) as failed:
        run_python(["-m", "quantkit.evaluate.hf_runner", "evaluate", str(broken), str(tmp_path / "spec.json"),
                    str(tmp_path / "out.json")], what="the reference")
    message = str(failed.value)
    assert "transformers leaves 8 weight(s) of broken unread, so scoring it would measure random weights" in message, message
    # The renamed expert's projection is unset in each of the 4 layers (and its 4 tensors have no place in the model).
    assert "model.layers.0.mlp.experts.3.gate_proj.weight (unset)" in message, message
    assert not (tmp_path / "out.json").exists()
