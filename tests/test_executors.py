"""The Hub token of a Ray build task (cluster/tasks.py: with_hub_token): passed as the task's argument, set only while the
task runs, and written to none of Ray's files (a runtime_env's env_vars would be, in runtime_env_agent.log). A real
local Ray instance."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from quantkit.cluster.tasks import HubToken

SECRET = "hf_qk-test-secret-4711"

_TASKS = textwrap.dedent(f"""
    import os, sys
    from pathlib import Path
    import ray
    import quantkit
    from quantkit.cluster.tasks import HubToken, with_hub_token

    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="WARNING",
             runtime_env={{"py_modules": [str(Path(quantkit.__file__).parent)]}})
    task = ray.remote(with_hub_token)
    token = HubToken({SECRET!r})
    first = ray.get(task.remote(token, os.getpid))
    print(ray.get(task.remote(token, os.getenv, "HF_TOKEN")))
    print(ray.get(task.remote(None, os.getenv, "HF_TOKEN")))  # a later task of the same worker: nothing left
    print(ray.get(task.remote(None, os.getpid)) == first)
    ray.shutdown()
""")


@pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None, reason="the ray extra")
def test_a_ray_task_gets_the_hub_token_and_no_ray_file_keeps_it():
    temp = tempfile.mkdtemp(prefix="qkray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    # A new local ray.init() otherwise writes ~/.ray/auth_token, and every `ray start` after it requires the token.
    env["RAY_AUTH_MODE"] = "disabled"
    try:
        proc = subprocess.run([sys.executable, "-c", _TASKS, temp], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split() == [SECRET, "None", "True"], proc.stdout
        kept = [p for p in Path(temp).rglob("*") if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()]
        assert not kept
        assert SECRET not in proc.stdout.replace(SECRET, "", 1) + proc.stderr
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_the_token_never_shows_in_a_repr():
    assert SECRET not in repr(HubToken(SECRET)) and SECRET not in str(HubToken(SECRET))
