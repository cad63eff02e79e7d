"""scripts/gpu_check.sh on a machine without CUDA: it refuses clearly, and its dry run plans the whole GPU check
(scripts/gpu_check.yaml, for an 80 GB GPU) without building anything."""

import json
import subprocess

import pytest
import torch

from conftest import REPO


def _check(*args, out):
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_check_refuses_and_says_what_to_do(tmp_path):
    proc = _check(out=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    error, fix = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert error == "error: torch sees no CUDA GPU (torch.cuda.is_available() is False), and every step of this check needs one"
    assert "--dry-run" in fix and not (tmp_path / "gpu").exists()


def test_the_dry_run_plans_every_cuda_step(tmp_path):
    proc = _check("--dry-run", out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["dry_run"] and summary["plan_exit"] == 0 and summary["failures"] == []
    planned = [line.split()[1] for line in summary["plan"] if line.startswith("  ") and len(line.split()) > 2]
    assert {"F16", "Q4_K_M", "4bit-g32", "measurement", "3.0bpw-h6", "4.0bpw-h6", "6.0bpw-h6", "8.0bpw-h8"} <= set(planned)
    assert not (tmp_path / "gpu").exists()  # planned, not built
