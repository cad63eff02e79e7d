"""`quantkit plan` and the Python API: a plan is printed, nothing is built."""

import json
import sys

from quantkit import formats
from quantkit.build import make_plan
from quantkit.source import safetensors_header

from conftest import PROFILES, REPO, run_cli

sys.path.insert(0, str(REPO / "scripts"))
from make_synthetic_model import make, write_header_only  # noqa: E402 (a script, not a package)


def test_plan_command_lists_every_artifact_and_builds_nothing(sample_model, tmp_path):
    proc = run_cli("plan", "--sample", "--out", tmp_path / "out", check=True)
    for variant in ("F16", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"):
        assert f"SmolLM2-135M-Instruct-{variant}.gguf" in proc.stdout
    assert "profile  sample" in proc.stdout and "disk needed" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_python_api_plan(sample_model, tmp_path):
    plan = make_plan(str(sample_model), "gguf-standard", tmp_path)
    assert plan.out_dir == tmp_path / "SmolLM2-135M-Instruct"
    assert make_plan(str(sample_model), "gguf-standard", "builds").out_dir.is_absolute()
    assert [a.variant for a in plan.artifacts] == ["F16", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    ref = plan.artifacts[0]
    assert ref.role == "intermediate" and all(a.depends_on == ref.filename for a in plan.artifacts[1:])
    assert plan.source.architecture == "LlamaForCausalLM" and plan.source.license == "apache-2.0"
    assert ref.predicted_bytes == 270_886_272  # exact: the converter's own skeleton of the file
    assert plan.predicted_bytes > sum(a.predicted_bytes for a in plan.artifacts)  # + evaluation scratch


def test_backends_command_lists_gguf():
    assert "gguf" in formats.names()
    listed = [line.split()[0] for line in run_cli("formats", check=True).stdout.splitlines()]
    assert listed == formats.names()


def test_plan_refuses_a_moe_whose_router_transformers_does_not_know(tmp_path):
    """A Mixtral whose layer-1 router is stored as `router`, not `gate`: transformers would leave the gate
    random and the evaluation would score it. The plan reads headers only, so the checkpoint has no data."""
    good = make("moe-tiny", out=tmp_path / "Mixtral-Good", header_only=True)
    assert run_cli("plan", good, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path / "out").returncode == 0
    bad = tmp_path / "Mixtral-Renamed"
    bad.mkdir()
    for f in good.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    rename = {"model.layers.1.block_sparse_moe.gate.weight": "model.layers.1.block_sparse_moe.router.weight"}
    for f in good.glob("*.safetensors"):
        header = {k: v for k, v in safetensors_header(f).items() if k != "__metadata__"}
        write_header_only(bad / f.name, {rename.get(k, k): tuple(t["shape"]) for k, t in header.items()}, "F16")
    index = json.loads((good / "model.safetensors.index.json").read_text())
    index["weight_map"] = {rename.get(k, k): v for k, v in index["weight_map"].items()}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = run_cli("plan", bad, "--profile", PROFILES / "tiny.yaml", "--out", tmp_path / "out")
    assert proc.returncode == 3, proc.stderr
    assert "transformers' mixtral loader would leave 2 weight(s) of Mixtral-Renamed unread" in proc.stderr
    assert "model.layers.1.mlp.gate.weight (unset)" in proc.stderr
    assert "model.layers.1.block_sparse_moe.router.weight (in the files, not in the model)" in proc.stderr
    assert "name the tensors as transformers' mixtral checkpoints do" in proc.stderr
    assert not (tmp_path / "out").exists()
