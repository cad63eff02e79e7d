"""GGUF beyond plain k-quants, on the sample: an importance matrix from llama.cpp's llama-imatrix, an
i-quant, the _L variant, a tensor-pattern override, a split Q8_0, and exact size planning."""

import json

import pytest
from gguf import GGUFReader

from conftest import PROFILES, run_cli, seed
from quantkit.build import make_plan

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def depth_build(sample_model, tiny_seed, module_dir):
    out = module_dir("depth")
    seed(tiny_seed, out)  # the same evaluation settings: the F16 file and the reference are taken as they are
    proc = run_cli("build", sample_model, "--profile", PROFILES / "depth.yaml", "--out", out, check=True)
    folder = out / MODEL
    report = json.loads((folder / "report.json").read_text())
    return {"dir": folder, "report": report, "by": {a["variant"]: a for a in report["artifacts"]}, "proc": proc}


def _types(path):
    files = sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    return {t.name: t.tensor_type.name for f in files for t in GGUFReader(f).tensors}


def _field(path, key):
    return GGUFReader(path).fields[key].contents()


def test_imatrix_improves_q3_k_m(depth_build):
    by = depth_build["by"]
    assert by["Q3_K_M-imat"]["uses"] == [f"{MODEL}.imatrix.gguf"] and by["Q3_K_M"]["uses"] == []
    with_im, without = by["Q3_K_M-imat"]["evaluation"]["kld_mean"], by["Q3_K_M"]["evaluation"]["kld_mean"]
    assert with_im < without, (with_im, without)
    md = (depth_build["dir"] / "report.md").read_text()
    assert "## Importance matrix" in md and "Quantized with it: IQ4_XS, Q3_K_M-imat" in md


def test_imatrix_file_is_llama_cpp_s_format_and_names_no_local_path(depth_build):
    folder = depth_build["dir"]
    imatrix = folder / f"{MODEL}.imatrix.gguf"
    assert _field(imatrix, "general.type") == "imatrix"
    assert _field(imatrix, "imatrix.datasets") == ["botchan-calibration.txt"]
    assert _field(imatrix, "imatrix.chunk_count") == 16
    names = {t.name for t in GGUFReader(imatrix).tensors}
    assert "blk.0.ffn_down.weight.in_sum2" in names and "blk.29.attn_q.weight.counts" in names
    # llama.cpp took it: the quantized file records which imatrix it was made with, by file name only.
    assert _field(folder / f"{MODEL}-Q3_K_M-imat.gguf", "quantize.imatrix.file") == imatrix.name
    assert "quantize.imatrix.file" not in GGUFReader(folder / f"{MODEL}-Q3_K_M.gguf").fields


def test_overrides_embeddings_output_and_patterns(depth_build):
    folder = depth_build["dir"]
    l_types = _types(folder / f"{MODEL}-Q4_K_L.gguf")
    assert l_types["token_embd.weight"] == "Q8_0"  # tied embeddings: there is no separate output.weight
    ffn8 = _types(folder / f"{MODEL}-Q4_K_M-ffn8.gguf")
    downs = {n: t for n, t in ffn8.items() if n.endswith("ffn_down.weight")}
    assert len(downs) == 30 and set(downs.values()) == {"Q8_0"}
    plain = _types(folder / f"{MODEL}-Q3_K_M.gguf")
    assert set(t for n, t in plain.items() if n.endswith("ffn_down.weight")) != {"Q8_0"}


def test_split_q8_0_is_llama_cpp_shards(depth_build):
    shards = sorted((depth_build["dir"] / f"{MODEL}-Q8_0").glob("*.gguf"))
    assert [s.name for s in shards] == [f"{MODEL}-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(_field(s, "split.count") == 3 for s in shards)
    # The card marks it: Ollama cannot pull a split file (ollama#5245); its Run lines merge it first.
    from quantkit import formats
    from quantkit.publish.card import model_card
    from quantkit.results import Report

    report = Report.read(depth_build["dir"] / "report.json")
    q8 = next(a for a in report.models if a.variant == "Q8_0")
    assert q8.details["shards"] == [s.name for s in shards]
    card = str(model_card(report, "alice/M-GGUF", formats.get("gguf")))
    assert "split in 3 files: llama.cpp and LM Studio load it from the first; Ollama cannot (ollama#5245)" in card
    run = "\n".join(formats.get("gguf").card.usage("alice/M-GGUF", ".", q8))
    assert f"llama-cli -m {MODEL}-Q8_0/{shards[0].name} -cnv" in run and "ollama run" not in run
    assert f"llama-gguf-split --merge {MODEL}-Q8_0/{shards[0].name} {MODEL}-Q8_0.gguf" in run
    # The limit applies to tensor data, as in llama-gguf-split; the first shard also holds the metadata.
    assert all(sum(int(t.n_bytes) for t in GGUFReader(s).tensors) <= 60_000_000 for s in shards)
    assert depth_build["by"]["Q8_0"]["evaluation"]["kld_mean"] < 0.01


def test_every_artifact_loads_and_generates_in_llama_cpp_python(depth_build):
    from llama_cpp import Llama

    folder = depth_build["dir"]
    for a in depth_build["report"]["artifacts"]:
        if a["role"] == "imatrix":
            continue
        path = folder / a["filename"]
        model = sorted(path.glob("*-00001-of-*.gguf"))[0] if path.is_dir() else path
        llm = Llama(model_path=str(model), n_ctx=128, verbose=False)
        out = llm("The capital of France is", max_tokens=4, temperature=0)
        assert out["choices"][0]["text"].strip(), a["filename"]
        del llm


def test_planned_sizes_match_the_built_files(depth_build, sample_model):
    plan = make_plan(str(sample_model), str(PROFILES / "depth.yaml"), depth_build["dir"].parent)
    folder = depth_build["dir"]
    for item in plan.artifacts:
        path = folder / item.filename
        actual = sum(p.stat().st_size for p in path.glob("*.gguf")) if path.is_dir() else path.stat().st_size
        assert abs(item.predicted_bytes - actual) / actual < 0.02, (item.filename, item.predicted_bytes, actual)
    proc = run_cli("plan", sample_model, "--profile", PROFILES / "depth.yaml", "--out", folder.parent, check=True)
    assert "3 shards of at most 60.0 MB" in proc.stdout and "+ SmolLM2-135M-Instruct.imatrix.gguf" in proc.stdout
    # imatrix.from: q8_0 runs llama-imatrix on the Q8_0 shards, which are made first and without an imatrix.
    by = {i.variant: i for i in plan.artifacts}
    assert by["imatrix"].depends_on == f"{MODEL}-Q8_0" and by["Q8_0"].uses == () and by["IQ4_XS"].uses == (by["imatrix"].filename,)
    assert [i.variant for i in plan.artifacts].index("Q8_0") < [i.variant for i in plan.artifacts].index("imatrix")
    # It maps the 145 MB Q8_0 file, not the 271 MB F16 one, and goes through it once per chunk.
    assert by["imatrix"].predicted_mapped_bytes == by["Q8_0"].predicted_bytes < by["F16"].predicted_bytes
    assert by["imatrix"].passes == 16


def test_iquant_without_imatrix_is_refused_at_plan_time(sample_model, tmp_path):
    profile = tmp_path / "iq2.yaml"
    profile.write_text("formats:\n  gguf:\n    types: [IQ2_XXS]\n")
    proc = run_cli("plan", sample_model, "--profile", profile)
    assert proc.returncode == 4
    err = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert err[0] == "error: gguf: IQ2_XXS needs an importance matrix, and IQ2_XXS has none"
    assert "imatrix" in err[1]


@pytest.mark.parametrize("backend_yaml, message", [
    ("types: [{type: Q4_K_M, overrides: {ffn_down: Q9_9}}]", "unknown tensor type 'Q9_9'"),
    ("types: [{type: Q4_K_M, split_max_size: 10K}]", "is below 1M"),
    ("types: [{type: Q4_K_M, split_max_size: lots}]", "is not a size"),
    ("types: [Q4_K_M, {type: Q4_K_M, imatrix: true}]", "two entries are named 'Q4_K_M'"),
    ("{intermediate: q8_0, types: [Q4_K_M]}", "no other type can be made"),
    ("{imatrix: {from: q8_0}, types: [IQ4_XS, {type: Q8_0, output: Q6_K}]}", "needs a plain Q8_0 entry in gguf.types"),
    ("{imatrix: {from: f32}, types: [IQ4_XS]}", "'f32' is not a file it can be computed from"),
    ("types: [{type: Q4_K_M, overrides: {'ffn_(': Q8_0}}]", "is not a regular expression"),
])
def test_bad_gguf_options(sample_model, tmp_path, backend_yaml, message):
    profile = tmp_path / "bad.yaml"
    body = backend_yaml if backend_yaml.startswith("{") else "{" + backend_yaml + "}"
    profile.write_text(f"formats:\n  gguf: {body}\n")
    proc = run_cli("plan", sample_model, "--profile", profile)
    assert proc.returncode == 4 and message in proc.stderr, proc.stderr


