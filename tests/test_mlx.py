"""MLX through mlx-lm on the sample: 4-bit, 8-bit and a mixed recipe, built with mlx-lm's converter, loaded
with mlx_lm.load, measured with MLX against the same reference as the GGUF file in the same report, and
published as mlx-community publishes them: a repo per variant."""

import json
import subprocess
import sys

import pytest
from huggingface_hub import HfApi, ModelCard

from conftest import PROFILES, REPO, TOKEN, run_cli, seed

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed (QUANTKIT_EXTRAS without mlx)")


@pytest.fixture(scope="module")
def mlx_build(sample_model, tiny_seed, module_dir):
    out = module_dir("mlx")
    seed(tiny_seed, out)  # the same evaluation settings: its F16 file and the reference are taken as they are
    proc = run_cli("build", sample_model, "--profile", PROFILES / "mlx.yaml", "--out", out, check=True)
    folder = out / sample_model.name
    return {"dir": folder, "report": json.loads((folder / "report.json").read_text()), "proc": proc}


def _mlx(report):
    return {a["variant"]: a for a in report["artifacts"] if a["backend"] == "mlx"}


def test_mlx_folders_are_built_load_and_are_measured(mlx_build):
    from mlx_lm import load

    arts = _mlx(mlx_build["report"])
    assert set(arts) == {"4bit", "8bit", "mixed_3_6"}
    for variant, a in arts.items():
        folder = mlx_build["dir"] / a["filename"]
        assert a["filename"] == f"SmolLM2-135M-Instruct-MLX-{variant}"
        model, tok = load(str(folder))  # as mlx-lm users load it
        assert tok.eos_token_ids and model.args.vocab_size == 49152
        # Planned exactly: mlx-lm's own quantization applied to the lazily loaded model.
        assert abs(a["size_bytes"] - a["predicted_bytes"]) <= 0.02 * a["size_bytes"], variant
        e = a["evaluation"]
        assert e["tokens_scored"] == 2 * 127 and a["integrity"] == []
    assert arts["8bit"]["evaluation"]["kld_mean"] < 0.01 and arts["8bit"]["evaluation"]["top1_agreement"] > 0.9
    assert arts["4bit"]["evaluation"]["kld_mean"] < 0.8
    assert arts["4bit"]["evaluation"]["kld_mean"] > arts["8bit"]["evaluation"]["kld_mean"]
    assert arts["8bit"]["evaluation"]["smoke_passed"]  # "Paris", and the turn ends with <|im_end|>
    # mlx-lm states its rate: 4 bits plus a 16-bit scale and bias per 64 weights, about 4.5.
    assert 4.4 < arts["4bit"]["stated_bits"] < 4.6 and 8.4 < arts["8bit"]["stated_bits"] < 8.6
    assert arts["mixed_3_6"]["tensor_types"].keys() == {"3-bit", "6-bit"}
    assert arts["4bit"]["tensor_types"] == {"4-bit": 211}  # 30 layers x 7 linear layers + the embedding


def test_one_report_says_how_mlx_was_measured(mlx_build):
    md = (mlx_build["dir"] / "report.md").read_text()
    assert "| MLX 4bit |" in md and "| MLX 8bit |" in md and "| Q8_0 |" in md
    assert "## MLX" in md and "the token embedding" in md and "the head is quantized with it" in md
    assert "MLX dequantizes each folder's layers" in md and "mlx-lm vs transformers on the same weights: KLD 0.000" in md


def test_mlx_is_published_a_repo_per_variant(mlx_build, hub, tmp_path):
    run_cli("publish", mlx_build["dir"], env=hub.env, check=True)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    for variant, a in _mlx(mlx_build["report"]).items():
        repo = f"alice/SmolLM2-135M-Instruct-MLX-{variant}"
        files = set(api.list_repo_files(repo))
        assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= files
        assert {p.name for p in (mlx_build["dir"] / a["filename"]).iterdir()} <= files
        card = ModelCard.load(api.hf_hub_download(repo, "README.md"))
        assert card.data.library_name == "mlx" and "mlx" in card.data.tags
        assert card.data.base_model_relation == "quantized"
        assert f'model, tokenizer = load("{repo}")' in card.text and "from mlx_lm import load, generate" in card.text
        assert f"| MLX {variant} |" in card.text
    assert "alice/SmolLM2-135M-Instruct-GGUF" in {m.id for m in api.list_models(author="alice")}


@pytest.mark.parametrize("variant, code, message", [
    ("{bits: 7}", 4, "mlx.variants[0]: 7-bit is not a width MLX quantizes to"),
    ("{bits: 4, group_size: 48}", 4, "mlx.variants[0]: group size 48 is not one MLX supports"),
    ("{recipe: mixed_1_9}", 4, "mlx: mlx-lm has no recipe 'mixed_1_9'"),
])
def test_bad_mlx_options_are_refused_at_plan_time(sample_model, tmp_path, variant, code, message):
    profile = tmp_path / "p.yaml"
    profile.write_text(f"formats:\n  mlx:\n    variants: [{variant}]\n")
    proc = run_cli("plan", sample_model, "--profile", profile)
    assert proc.returncode == code and f"error: {message}" in proc.stderr and "fix: " in proc.stderr


def test_an_architecture_mlx_lm_cannot_convert_is_refused(sample_model, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for p in sample_model.iterdir():
        (src / p.name).symlink_to(p)
    (src / "config.json").unlink()
    cfg = json.loads((sample_model / "config.json").read_text()) | {"model_type": "frobnicator"}
    (src / "config.json").write_text(json.dumps(cfg))
    profile = tmp_path / "p.yaml"
    profile.write_text("formats:\n  mlx:\n    variants: [{bits: 4}]\n")
    proc = run_cli("plan", src, "--profile", profile)
    assert proc.returncode == 3 and "mlx-lm cannot convert m: Model type frobnicator not supported" in proc.stderr


def test_planning_never_imports_mlx(sample_model, tmp_path):
    """mlx-lm runs only in MLX's child processes (tool.py, runner.py): the plan asks a child for the sizes,
    the recipes and whether the architecture converts."""
    profile = tmp_path / "p.yaml"
    profile.write_text("formats:\n  mlx:\n    variants: [{bits: 4}, {recipe: mixed_3_6}]\n")
    code = ("import sys; from quantkit.build import make_plan; "
            f"p = make_plan({str(sample_model)!r}, {str(profile)!r}, {str(tmp_path)!r}); "
            "assert [a.variant for a in p.artifacts] == ['4bit', 'mixed_3_6'], p.artifacts; "
            "from quantkit import formats; [formats.get(n).requirements() for n in formats.names()]; "
            "assert not {'mlx', 'mlx_lm'} & set(sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_backends_lists_mlx():
    out = run_cli("formats", check=True).stdout
    assert any(l.startswith("mlx ") and "available (package mlx 0.32.4, package mlx-lm 0.32.2)" in l
               for l in out.splitlines())


def test_a_folder_mlx_lm_would_misread_stops_the_build(mlx_build, tmp_path):
    """The converter is given the source's RoPE base where mlx-lm reads it (config_view); a folder whose
    config.json only has transformers 5's rope_parameters runs with mlx-lm's default base of 10000 instead of
    100000, and the runtime check refuses it before any score is taken."""
    import shutil
    import subprocess
    import sys

    good = mlx_build["dir"] / "SmolLM2-135M-Instruct-MLX-8bit"
    assert json.loads((good / "config.json").read_text())["rope_theta"] == 100000.0
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["rope_theta"]
    (bad / "config.json").write_text(json.dumps(cfg))
    shutil.copy(mlx_build["dir"] / ".quantkit" / "eval-tokens.npy", tmp_path / "tokens.npy")
    (tmp_path / "spec.json").write_text(json.dumps({"tokens": str(tmp_path / "tokens.npy"), "bos": None, "ctx": 512}))
    proc = subprocess.run([sys.executable, "-m", "quantkit.formats.mlx.runner", "evaluate", str(bad),
                           str(tmp_path / "spec.json"), str(tmp_path / "out.json")], capture_output=True, text=True)
    assert proc.returncode == 1 and not (tmp_path / "out.json").exists()
    assert "error: mlx-lm does not reproduce its own folder's weights as transformers runs them" in proc.stderr
