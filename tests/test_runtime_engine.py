"""What the runtimes see (issue 27): each GGUF's template rendered and its tool calls parsed by llama-server, from
the same llama.cpp as the quantizer; a bf16 source kept BF16 by default; the files Ollama and LM Studio expect."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import PROFILES, report, run_cli
from quantkit.evaluate.integrity import folder_facts
from quantkit.formats.gguf.engine_checks import check_file
from quantkit.formats.gguf.llamacpp import tool_version
from quantkit.formats.gguf.metadata import rewrite_metadata
from quantkit.profiles import available_profiles, load_profile

HERE = Path(__file__).parent
# The sample's template with its default system prompt written through jinja2's `format` filter. jinja2 fills in
# '%s'; llama.cpp's engine (common/jinja) has a `format` filter that returns the string unchanged, so the two
# differ in every conversation that does not start with a system message ("tools", "tool response").
FORMAT_FILTER = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named %s, trained by Hugging Face<|im_end|>\\n'"
                 "|format('SmolLM') }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Python's % operator on strings: jinja2 runs it, llama.cpp's engine has no such operator and refuses the template.
PERCENT = ("{% for message in messages %}{{ '<|im_start|>%s\\n' % message['role'] + message['content'] + '<|im_end|>\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def source_with_template(sample_model: Path, folder: Path, template: str) -> Path:
    """The sample with another chat_template.jinja (the weights linked, not copied)."""
    folder.mkdir(parents=True)
    for f in sample_model.iterdir():
        if f.is_file() and f.name != "chat_template.jinja":
            (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.fixture(scope="module")
def format_filter_build(sample_model, module_dir):
    """The converter's file of a source whose template renders differently in llama.cpp's engine."""
    tmp = module_dir("engine")
    src = source_with_template(sample_model, tmp / "src" / "Sample-Format", FORMAT_FILTER)
    proc = run_cli("build", src, "--profile", PROFILES / "convert.yaml", "--out", tmp / "out")
    return {"proc": proc, "dir": tmp / "out" / src.name, "src": src, "tmp": tmp}


def test_a_template_llama_cpp_renders_differently_fails_the_file(format_filter_build):
    proc, folder = format_filter_build["proc"], format_filter_build["dir"]
    assert proc.returncode == 7, proc.stderr[-2000:]  # a failed check: the file is kept, the release is refused
    (row,) = report(folder)["artifacts"]
    assert row["filename"] == "Sample-Format-F16.gguf"
    engine = row["engine"]
    assert engine["engine"].startswith("llama-server ") and engine["engine"].endswith(tool_version("llama-server"))
    # the two conversations without a system message differ, at the first byte of the default system prompt's '%s'
    assert len(engine["template"]) == 2, engine["template"]
    tools = next(f for f in engine["template"] if "'tools'" in f)
    assert "at byte 56 it has b'%s, trained by" in tools and "the source b'SmolLM, trained by" in tools, tools
    assert any("'tool response'" in f for f in engine["template"])
    assert all(f"chat integrity: {f}" in row["failures"] for f in engine["template"])
    md = (folder / "report.md").read_text()
    assert "| Sample-Format-F16.gguf | F16 |" in md and "template DIFFERS" in md and "## Failed checks" in md
    assert "Sample-Format-F16.gguf failed" in proc.stderr


def test_a_template_llama_cpp_rejects_fails_with_the_engine_message(format_filter_build, sample_model):
    """The engine refuses the template when llama-server starts: the file fails with the engine's own words."""
    tmp = format_filter_build["tmp"]
    gguf = tmp / "percent.gguf"
    shutil.copy(format_filter_build["dir"] / "Sample-Format-F16.gguf", gguf)
    (tmp / "percent.jinja").write_text(PERCENT)
    rewrite_metadata(gguf, template_file=tmp / "percent.jinja")
    src = source_with_template(sample_model, tmp / "src" / "Sample-Percent", PERCENT)
    verdict = check_file(gguf, folder_facts(src), None, 2, "llama-server")
    assert verdict.template == ['llama.cpp\'s template engine rejects the template: Unknown operator "%" between '
                                'String and String'], verdict
    assert verdict.tool_calls is False


def test_a_hermes_template_renders_alike_and_its_tool_calls_parse(format_filter_build, sample_model):
    """A ChatML template with Hermes tool calls (tools in the system turn, <tool_call> blocks, tool responses):
    every conversation renders byte for byte as in jinja2, and llama-server's parser reads the call back."""
    tmp = format_filter_build["tmp"]
    template = (HERE / "fixtures" / "hermes_tools.jinja").read_text()
    gguf = tmp / "hermes.gguf"
    shutil.copy(format_filter_build["dir"] / "Sample-Format-F16.gguf", gguf)
    rewrite_metadata(gguf, template_file=HERE / "fixtures" / "hermes_tools.jinja")
    src = source_with_template(sample_model, tmp / "src" / "Sample-Hermes", template)
    verdict = check_file(gguf, folder_facts(src), {"name": "get_weather", "arguments": {"city": "Lyon"}}, 2, "x")
    assert verdict.template == [], verdict.template
    assert verdict.tool_calls is True, verdict.tool_call_detail
    assert verdict.tool_call_detail == 'get_weather({"city": "Lyon"}) came back as tool_calls'
    assert verdict.call_source == "the fp16 source's reply"
    # the sample's own template has no tool-call format: the same call comes back as plain content
    plain = check_file(format_filter_build["dir"] / "Sample-Format-F16.gguf", folder_facts(format_filter_build["src"]),
                       None, 2, "x")
    assert plain.tool_calls is False and plain.tool_call_detail.startswith("no tool_calls; the turn came back as content")


@pytest.fixture(scope="module")
def bf16_build(sample_model, module_dir):
    """The sample as a bfloat16 checkpoint (config.json says so), through the GGUF defaults."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = module_dir("bf16")
    src = tmp / "src" / "SmolLM2-135M-Instruct-bf16"
    src.mkdir(parents=True)
    for f in sample_model.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, src / f.name)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(sample_model / "model.safetensors").items()},
              src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((sample_model / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    proc = run_cli("build", src, "--profile", PROFILES / "bf16.yaml", "--out", tmp / "out")
    return {"proc": proc, "dir": tmp / "out" / src.name}


def test_a_bf16_source_is_quantized_from_a_bf16_intermediate(bf16_build):
    from gguf import GGUFReader

    proc, folder = bf16_build["proc"], bf16_build["dir"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {a["variant"]: a for a in report(folder)["artifacts"]}
    assert set(rows) == {"BF16", "Q4_K_M"}
    inter = folder / "SmolLM2-135M-Instruct-bf16-BF16.gguf"
    types = {t.tensor_type.name for t in GGUFReader(inter).tensors}
    assert types == {"BF16", "F32"}, types  # the weights stay bf16 (norms are F32 in every llama.cpp file)
    assert rows["Q4_K_M"]["made_from"] == inter.name
    bf16 = rows["BF16"]  # 2 bytes a weight, as F16; the plan knew its size before converting
    assert abs(bf16["predicted_bytes"] - 270_886_272) < 1_000_000 and abs(bf16["size_bytes"] - bf16["predicted_bytes"]) < 300_000
    # within the bounds of bf16.yaml, and measured: a BF16 copy of a bf16 source scores as the source does
    assert rows["BF16"]["evaluation"]["kld_mean"] < 0.001 and rows["BF16"]["evaluation"]["top1_agreement"] > 0.99
    assert rows["Q4_K_M"]["evaluation"]["kld_mean"] < 0.10
    md = (folder / "report.md").read_text()
    assert f"| SmolLM2-135M-Instruct-bf16-Q4_K_M.gguf | {inter.name} |" in md
    assert f"`{inter.name}` is llama.cpp's conversion of the source checkpoint (convert_hf_to_gguf.py, BF16)" in md
    assert "(LlamaForCausalLM, bfloat16)" in md


def test_every_builtin_gguf_profile_has_q4_k_m():
    """`ollama run hf.co/REPO:Q4_K_M` and LM Studio's default pick expect one in every GGUF repo."""
    for name in available_profiles():
        gguf = load_profile(name).formats.get("gguf")
        if gguf is not None:
            names = [t if isinstance(t, str) else t.get("name") or t["type"] for t in gguf.get("types", [])]
            assert "Q4_K_M" in names, (name, names)


def test_retemplate_refuses_bad_templates_and_changes_nothing(format_filter_build, sample_model, tmp_path):
    """A template llama.cpp's engine refuses, one jinja2 cannot parse, a revision without one: exit 4, one line,
    the build as it was."""
    folder = format_filter_build["dir"]
    gguf = folder / "Sample-Format-F16.gguf"
    before = (gguf.stat().st_mtime_ns, (folder / "report.json").read_text(), (folder / ".quantkit" / "manifest.json").read_text())
    (tmp_path / "percent.jinja").write_text(PERCENT)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.role }")
    no_template = tmp_path / "no-template"
    no_template.mkdir()
    (no_template / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    cases = [(["--chat-template", tmp_path / "percent.jinja"], 'rejects the template: Unknown operator "%" between String'),
             (["--chat-template", tmp_path / "broken.jinja"], "does not render in jinja2: unexpected '}'"),
             (["--from", no_template], "no-template has no chat template"),
             ([], "give exactly one of --from and --chat-template")]
    for args, message in cases:
        proc = run_cli("retemplate", folder, *args)
        assert proc.returncode == 4 and message in proc.stderr and "fix:" in proc.stderr, (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr
    assert (gguf.stat().st_mtime_ns, (folder / "report.json").read_text(),
            (folder / ".quantkit" / "manifest.json").read_text()) == before
    assert not list(folder.glob("*.partial"))


def test_a_folder_artifact_takes_the_template_in_its_tokenizer_files(sample_model, tmp_path):
    """GPTQ, AWQ, EXL2 and MLX folders (Format.retemplate's default): chat_template.jinja, and tokenizer_config's
    chat_template where it keeps one; from a revision, its tokenizer files."""
    from quantkit.formats import get

    folder = tmp_path / "variant"
    folder.mkdir()
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(sample_model / name, folder / name)
    config = json.loads((sample_model / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "old"}))
    new = tmp_path / "new.jinja"
    new.write_text(FORMAT_FILTER)
    get("gptq").retemplate(folder, new, {}, {})
    assert (folder / "chat_template.jinja").read_text() == FORMAT_FILTER
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == FORMAT_FILTER
    assert folder_facts(folder).template == FORMAT_FILTER
    revision = {"tokenizer_config.json": json.dumps({**config, "eos_token": "<|endoftext|>"}).encode(),
                "chat_template.jinja": PERCENT.encode(), "special_tokens_map.json": b"{}"}
    get("mlx").retemplate(folder, new, {}, revision)
    assert folder_facts(folder).template == PERCENT and folder_facts(folder).tokens["eos"] == 0
    assert not (folder / "special_tokens_map.json").exists()  # only the files the folder has, and the template
