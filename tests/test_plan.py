"""`quantkit plan` and the Python API: a plan is printed, nothing is built."""

from quantkit import formats
from quantkit.build import make_plan

from conftest import run_cli


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
    listed = [line.split()[0] for line in run_cli("backends", check=True).stdout.splitlines()]
    assert listed == formats.names()
