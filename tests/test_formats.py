"""GGUF, GPTQ and AWQ of the sample in one build: one report, folders that plain transformers loads,
no local paths in any output, and a publish with one branch per GPTQ/AWQ variant."""

import json
import re

import pytest
from huggingface_hub import HfApi, ModelCard

from conftest import PROFILES, run_cli
from hub_server import HubServer, client_env, isolate_client
from quantkit.evaluate.text import CALIBRATION
from quantkit.report import label

pytest.importorskip("gptqmodel", reason="the gptq extra is not installed (QUANTKIT_EXTRAS without gptq)")

TOKEN = "qk-test-token-formats-0123456789"


@pytest.fixture(scope="module")
def formats_build(sample_model, tmp_path_factory):
    """The formats profile, with GPTQ calibrated on a Hub dataset (`hf:`) served by the test Hub."""
    out = tmp_path_factory.mktemp("formats")
    tmp = tmp_path_factory.mktemp("calib-hub")
    server = HubServer(tmp / "hub", {TOKEN: {"alice"}}, names={TOKEN: "alice"})
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        isolate_client(mp, tmp / "hf_home_tests")
        api = HfApi(endpoint=server.endpoint, token=TOKEN)
        api.create_repo("alice/calibration", repo_type="dataset")
        api.upload_file(path_or_fileobj=str(CALIBRATION["botchan"]), path_in_repo="calibration.txt",
                        repo_id="alice/calibration", repo_type="dataset")
    try:
        env = {**client_env(server.endpoint, tmp / "hf_home"), "HF_TOKEN": TOKEN}
        profile = tmp / "formats-hf.yaml"
        profile.write_text((PROFILES / "formats.yaml").read_text().replace(
            "calibration: {text: builtin:botchan, samples: 4", "calibration: {text: 'hf:alice/calibration', samples: 4"))
        assert "hf:alice/calibration" in profile.read_text()
        run_cli("build", sample_model, "--profile", profile, "--out", out, env=env, check=True)
        calibration_downloads = [r for r in server.requests if "calibration.txt" in r.path and r.method == "GET"]
    finally:
        server.stop()
    folder = out / sample_model.name
    return {"dir": folder, "out": out, "report": json.loads((folder / "report.json").read_text()),
            "calibration_downloads": calibration_downloads}


def test_gptq_calibrates_on_a_hub_dataset(formats_build):
    assert formats_build["calibration_downloads"], "the GPTQ worker did not fetch the hf: calibration text"
    assert all(r.status == 200 for r in formats_build["calibration_downloads"])
    gptq = next(a for a in formats_build["report"]["artifacts"] if a["backend"] == "gptq")
    assert gptq["peak_rss_bytes"] > 100e6  # measured, for the memory estimates in docs/profiles.md


def test_one_table_across_formats(formats_build):
    report = formats_build["report"]
    by = {a["backend"]: a for a in report["artifacts"] if a["variant"] != "F16"}
    assert set(by) == {"gguf", "gptq", "awq"}
    assert by["gptq"]["filename"] == "SmolLM2-135M-Instruct-GPTQ-4bit-g32"
    assert by["awq"]["filename"] == "SmolLM2-135M-Instruct-AWQ-4bit-g32"
    for a in report["artifacts"]:
        e = a["evaluation"]
        assert 1 < e["perplexity"] < 1000 and e["kld_mean"] >= 0 and 0 < e["top1_agreement"] <= 1, a["filename"]
        assert e["tokens_scored"] == report["artifacts"][0]["evaluation"]["tokens_scored"]  # same tokens for all
        assert e["smoke_reply"], a["filename"]
    # 4-bit in any format is further from the fp16 source than the F16 GGUF is.
    f16 = next(a for a in report["artifacts"] if a["variant"] == "F16")["evaluation"]["kld_mean"]
    assert all(a["evaluation"]["kld_mean"] > f16 for a in by.values())
    md = (formats_build["dir"] / "report.md").read_text()
    assert all(f"| {a['filename']} |" in md for a in report["artifacts"])


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
        assert f"- **{label(a)}**: template and stop tokens match; Tool call: " in md
    assert "| Tool call | JSON mode |" in md


def test_gptq_and_awq_folders_load_with_plain_transformers(formats_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for backend, method in (("gptq", "gptq"), ("awq", "awq")):
        folder = formats_build["dir"] / f"SmolLM2-135M-Instruct-{backend.upper()}-4bit-g32"
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


def test_publish_puts_each_variant_on_its_own_branch(formats_build, tmp_path, monkeypatch):
    isolate_client(monkeypatch, tmp_path / "hf_home_tests")
    server = HubServer(tmp_path / "hub", {TOKEN: {"alice"}}, names={TOKEN: "alice"})
    server.start()
    try:
        env = {**client_env(server.endpoint, tmp_path / "hf_home"), "HF_TOKEN": TOKEN}
        run_cli("publish", formats_build["dir"], env=env, check=True)
        api = HfApi(endpoint=server.endpoint, token=TOKEN)
        for fmt in ("GPTQ", "AWQ"):
            repo = f"alice/SmolLM2-135M-Instruct-{fmt}"
            assert {b.name for b in api.list_repo_refs(repo).branches} == {"main", "4bit-g32"}
            assert sorted(api.list_repo_files(repo)) == [".gitattributes", "README.md", "size-vs-kld.png"]
            files = api.list_repo_files(repo, revision="4bit-g32")
            assert "config.json" in files and "quantize_config.json" in files and "model.safetensors" in files
            card = ModelCard.load(api.hf_hub_download(repo, "README.md"))
            assert card.data.base_model_relation == "quantized"
            assert f"hf download {repo} --revision 4bit-g32" in card.text
            # The card carries the chat verdicts, the fp16 source's replies and this format's.
            assert "## Chat template, tool calls and JSON mode" in card.text and "fp16 source, Tool call:" in card.text
            assert f"- **{fmt} 4bit-g32**: template and stop tokens match; Tool call: " in card.text
        gguf = api.list_repo_files("alice/SmolLM2-135M-Instruct-GGUF")
        assert "SmolLM2-135M-Instruct-Q4_K_M.gguf" in gguf and "SmolLM2-135M-Instruct-GPTQ-4bit-g32" not in str(gguf)
    finally:
        server.stop()
