import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.sample import ensure_sample

TESTS = Path(__file__).parent
PROFILES = TESTS / "profiles"
REPO = TESTS.parent


def run_cli(*args, env=None, check=False, timeout=1800):
    """The real command line, in a child process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"quantkit {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def sample_model() -> Path:
    return ensure_sample()


@pytest.fixture(scope="session")
def sample_build(sample_model, tmp_path_factory):
    """One full build of the sample with every default type, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("builds")
    proc = run_cli("build", sample_model, "--profile", PROFILES / "fast.yaml", "--out", out, check=True)
    folder = out / sample_model.name
    return {"dir": folder, "out": out, "report": json.loads((folder / "report.json").read_text()), "proc": proc}
