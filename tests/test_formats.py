"""GGUF, GPTQ and AWQ of one model in one build: one report, absolute quality bounds for every format, folders
that plain transformers loads, no local paths in any output, and a publish with one branch per GPTQ/AWQ
variant. The model is a small dense Llama-shaped checkpoint with random weights and the sample's tokenizer
(scripts/make_synthetic_model.py tiny): GPTQModel's GPTQ and AWQ run on it in seconds, where the sample's 30
layers take minutes; its head spreads logits as a trained model's do, so broken weights show in KLD and top-1."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from huggingface_hub import HfApi, ModelCard

from conftest import PROFILES, REPO, TOKEN, run_cli
from quantkit.evaluate.text import CALIBRATION
from quantkit.gates import bound_failures
from quantkit.results import Judged
from quantkit.profiles import load_profile
from quantkit.report import label

sys.path.insert(0, str(REPO / "scripts"))
from make_synthetic_model import make  # noqa: E402 (a script, not a package)

pytest.importorskip("gptqmodel", reason="the gptq extra is not installed (QUANTKIT_EXTRAS without gptq)")

MODEL = "Synthetic-Llama-Tiny"
# What each 4-bit file of this model must measure against its fp16 source, on 4 windows of 256 tokens: (max KLD,
# min top-1), as tests/profiles/formats.yaml bounds them. Measured: Q4_K_M 0.24 / 68%, GPTQ 0.18 / 65%, AWQ 0.26 /
# 63%; a GPTQ folder with one matrix scrambled scored KLD 4.2 / 7% (test_a_scrambled_matrix_fails_its_bound).
BOUNDS = {"gguf": (0.35, 0.55), "gptq": (0.40, 0.52), "awq": (0.40, 0.52)}
SMOKE_TOKENS = 8  # tests/profiles/formats.yaml: smoke.max_tokens


@pytest.fixture(scope="module")
def formats_build(module_hub, module_dir):
    """The formats profile, with GPTQ and AWQ calibrated on a Hub dataset (`hf:`) served by the test Hub."""
    model = make("tiny")
    out = module_dir("formats")
    tmp = module_dir("calib-hub")
    api = HfApi(endpoint=module_hub.endpoint, token=TOKEN)
    api.create_repo("alice/calibration", repo_type="dataset")
    api.upload_file(path_or_fileobj=str(CALIBRATION["botchan"]), path_in_repo="calibration.txt",
                    repo_id="alice/calibration", repo_type="dataset")
    profile = tmp / "formats-hf.yaml"
    profile.write_text((PROFILES / "formats.yaml").read_text().replace(
        "calibration: {text: builtin:botchan, samples: 8", "calibration: {text: 'hf:alice/calibration', samples: 8"))
    assert "hf:alice/calibration" in profile.read_text()
    since = len(module_hub.requests)
    run_cli("build", model, "--profile", profile, "--out", out, env=module_hub.env, check=True)
    calibration_downloads = [r for r in module_hub.requests[since:] if "calibration.txt" in r.path and r.method == "GET"]
    folder = out / model.name
    return {"dir": folder, "out": out, "report": json.loads((folder / "report.json").read_text()),
            "calibration_downloads": calibration_downloads, "model": model}


def test_gptq_calibrates_on_a_hub_dataset(formats_build):
    assert formats_build["calibration_downloads"], "the GPTQ worker did not fetch the hf: calibration text"
    assert all(r.status == 200 for r in formats_build["calibration_downloads"])
    gptq = next(a for a in formats_build["report"]["artifacts"] if a["backend"] == "gptq")
    assert gptq["peak_rss_bytes"] > 100e6  # measured, for the memory estimates in docs/profiles.md


def test_one_table_across_formats(formats_build):
    report = formats_build["report"]
    by = {a["backend"]: a for a in report["artifacts"] if a["variant"] != "F16"}
    assert set(by) == {"gguf", "gptq", "awq"}
    assert by["gptq"]["filename"] == f"{MODEL}-GPTQ-4bit-g32"
    assert by["awq"]["filename"] == f"{MODEL}-AWQ-4bit-g32"
    tokens = report["evaluation"]["reference_result"]["tokens_scored"]
    assert tokens == 4 * 127
    for a in report["artifacts"]:
        assert a["evaluation"]["tokens_scored"] == tokens, a["filename"]  # the same tokens for all
    md = (formats_build["dir"] / "report.md").read_text()
    assert all(f"| {a['filename']} |" in md for a in report["artifacts"])


def test_every_format_is_within_absolute_bounds(formats_build):
    """Absolute numbers, not an ordering: a file of noise is further from the source than F16 too."""
    report = formats_build["report"]
    ref = report["evaluation"]["reference_result"]
    f16 = next(a for a in report["artifacts"] if a["variant"] == "F16")["evaluation"]
    assert f16["kld_mean"] < 1e-3 and f16["top1_agreement"] > 0.99 and abs(f16["ppl_delta_pct"]) < 0.5
    assert f16["smoke_reply"] == ref["smoke_reply"]  # llama.cpp's greedy reply on the F16 file is transformers' own
    for a in report["artifacts"]:
        if a["variant"] == "F16":
            continue
        e, (max_kld, min_top1) = a["evaluation"], BOUNDS[a["backend"]]
        assert 0 < e["kld_mean"] < max_kld and e["top1_agreement"] > min_top1, (a["filename"], e["kld_mean"],
                                                                                e["top1_agreement"])
        assert a["failures"] == [], (a["filename"], a["failures"])
        # Random weights never end a turn: each runtime decodes exactly the capped number of tokens, as the source.
        assert e["smoke_reason"] == ref["smoke_reason"] == f"no end-of-turn token within {SMOKE_TOKENS} tokens"
        assert len(_tokens(formats_build["model"], e["smoke_reply"])) in range(SMOKE_TOKENS - 1, SMOKE_TOKENS + 2), \
            (a["filename"], e["smoke_reply"])  # its text tokenized again: within one token of what was generated
    assert report["bounds"], "the profile's own bounds were judged too"


def test_a_scrambled_matrix_fails_its_bound(formats_build, tmp_path):
    """The bounds are far from garbage: the GPTQ folder with one of its matrices replaced by noise, scored by the
    GPTQ runner as the build scores it, is outside them, and the profile's gate says so."""
    import torch
    from safetensors.torch import load_file, save_file

    gptq = next(a for a in formats_build["report"]["artifacts"] if a["backend"] == "gptq")
    broken = tmp_path / gptq["filename"]
    shutil.copytree(formats_build["dir"] / gptq["filename"], broken)
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.qweight"
    weights[name] = torch.randint(-2**31, 2**31 - 1, weights[name].shape, dtype=torch.int32,
                                  generator=torch.Generator().manual_seed(0))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    state = formats_build["dir"] / ".quantkit"
    spec = {"tokens": str(state / "eval-tokens.npy"), "bos": None, "ctx": 256, "chat": False,
            "ref_read": str(state / "reference-logprobs.npy")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "quantkit.formats.gptq.runner", "evaluate", str(broken),
                    str(tmp_path / "spec.json"), str(tmp_path / "out.json")], check=True, capture_output=True, cwd=REPO)
    scored = json.loads((tmp_path / "out.json").read_text())
    max_kld, min_top1 = BOUNDS["gptq"]
    assert scored["kld_mean"] > 4 * max_kld and scored["top1_agreement"] < min_top1 / 2, scored
    # The report's entry, with the scrambled folder's scores in place of its own.
    built = Judged.from_dict(gptq)
    rescored = replace(built.evaluation, **{k: scored[k] for k in ("kld_mean", "kld_p99", "top1_agreement")})
    failures = bound_failures(replace(built, evaluation=rescored), load_profile(str(PROFILES / "formats.yaml")).bounds)
    assert [f.split(" ")[0] for f in failures] == ["KLD", "top-1"], failures


def _tokens(model, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"]


def test_every_format_carries_integrity_and_probe_verdicts(formats_build):
    """GPTQ and AWQ folders are checked from the tokenizer files transformers reads, and answer the tool-call and
    JSON-mode probes through transformers and GPTQModel's kernels, as GGUF files do through llama.cpp."""
    report = formats_build["report"]
    md = (formats_build["dir"] / "report.md").read_text()
    for a in report["artifacts"]:
        assert a["integrity"] == [], (a["filename"], a["integrity"])
        probes = a["evaluation"]["probes"]
        assert set(probes) == {"tool_call", "json_mode"}, a["filename"]
        assert all(r["reply"] and isinstance(r["agrees"], bool) for r in probes.values()), (a["filename"], probes)
        assert f"- **{label(Judged.from_dict(a))}**: template and stop tokens match; Tool call: " in md
    assert "| Tool call | JSON mode |" in md


def test_gptq_and_awq_folders_load_with_plain_transformers(formats_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for backend, method in (("gptq", "gptq"), ("awq", "awq")):
        folder = formats_build["dir"] / f"{MODEL}-{backend.upper()}-4bit-g32"
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == method
        assert (folder / "chat_template.jinja").exists() or "chat_template" in json.loads(
            (folder / "tokenizer_config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > ids.shape[1]
        assert tok.decode(out[0][ids.shape[1]:]).strip()


def test_no_output_file_holds_an_absolute_local_path(formats_build):
    folder = formats_build["dir"]
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix not in (".gguf", ".safetensors", ".png", ".npy"):  # .quantkit/ too
            text = path.read_text(errors="replace")
            assert not re.search(r"(/tmp/|/root/|/home/|/work/)", text), path


def test_publish_puts_each_variant_on_its_own_branch(formats_build, hub):
    run_cli("publish", formats_build["dir"], env=hub.env, check=True)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    for fmt in ("GPTQ", "AWQ"):
        repo = f"alice/{MODEL}-{fmt}"
        assert {b.name for b in api.list_repo_refs(repo).branches} == {"main", "4bit-g32"}
        assert sorted(api.list_repo_files(repo)) == [".gitattributes", "README.md", "size-vs-kld.png"]
        files = api.list_repo_files(repo, revision="4bit-g32")
        assert "config.json" in files and "quantize_config.json" in files and "model.safetensors" in files
        card = ModelCard.load(api.hf_hub_download(repo, "README.md"))
        # A local folder with no base model named in it: the card claims none (the sample's cards name theirs).
        assert not {"base_model", "base_model_relation"} & set(card.data.to_dict())
        assert f"hf download {repo} --revision 4bit-g32" in card.text
        # The card carries the chat verdicts, the fp16 source's replies and this format's.
        assert "## Chat template, tool calls and JSON mode" in card.text and "fp16 source, Tool call:" in card.text
        assert f"- **{fmt} 4bit-g32**: template and stop tokens match; Tool call: " in card.text
    gguf = api.list_repo_files(f"alice/{MODEL}-GGUF")
    assert f"{MODEL}-Q4_K_M.gguf" in gguf and f"{MODEL}-GPTQ-4bit-g32" not in str(gguf)
