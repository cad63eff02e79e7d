"""A build spread over a simulated Ray cluster (ray.cluster_utils.Cluster, real raylets): a head with no CPU, two
1-CPU nodes and one with a logical GPU and little memory, each with a Hugging Face cache and a temp folder of its
own (per-node environment). The build folder is one folder of this machine, which every node sees: a shared
filesystem. On it: placement per node, the preflight, and a node killed while it runs a step.

The GPU step is the test plugin's `tinygpu` (tests/fixtures/tinyformat): it asks Ray for a GPU and copies the
source, so it runs where the GPU is only a resource."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, TESTS, run_cli
from quantkit.fsutil import sha256_file

pytestmark = pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None,
                                reason="the ray extra")

PROFILE = """name: cluster
formats:
  gguf:
    types: [Q4_K_M, Q8_0]
  tinygpu:
    peak_bytes: {peak}
evaluation:
  enabled: false
chat_checks:
  engine: false
"""
GIB = 1 << 30


@pytest.fixture(scope="module")
def plugin(module_dir):
    """The test plugin installed into a folder every node (and the driver) has on PYTHONPATH."""
    target, source = module_dir("cluster-plugin"), module_dir("cluster-plugin-src") / "tinyformat"
    shutil.copytree(TESTS / "fixtures" / "tinyformat", source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return str(target)


class SimulatedCluster:
    def __init__(self, root: Path, plugin: str) -> None:
        from ray._common.utils import get_default_ray_temp_dir
        from ray.cluster_utils import Cluster

        # Cluster writes the head's address into Ray's default temp folder (/tmp/ray) without making it, and a
        # machine where Ray never ran has none (ray 2.60, ray._private.utils.write_ray_address).
        os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
        os.environ["RAY_AUTH_MODE"] = "disabled"  # else a local ray.init() writes ~/.ray/auth_token for every later start
        self.root, self.plugin = root, plugin
        self.temp = tempfile.mkdtemp(prefix="qkc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": self.temp, "include_dashboard": False, "node_name": "head"})
        self.nodes = {}

    def add(self, name: str, cpus: int = 1, gpus: int = 0, memory: int = 4 * GIB, **env: str) -> None:
        own = self.root / name
        env = {"PYTHONPATH": self.plugin, "HF_HOME": str(own / "hf"), "TMPDIR": str(own / "tmp"), **env}
        Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        self.nodes[name] = self.cluster.add_node(num_cpus=cpus, num_gpus=gpus, memory=memory, node_name=name,
                                                 env_vars=env)

    def remove(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)
        self.cluster.wait_for_nodes()  # until Ray's GCS no longer lists it as alive

    def node_running(self, marker: str) -> str | None:
        """The node whose process tree runs a process with `marker` in its command line."""
        raylets = {n.all_processes["raylet"][0].process.pid: name for name, n in self.nodes.items()}
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or marker not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    continue
                pid = int(proc.name)
                while pid > 1:
                    if pid in raylets:
                        return raylets[pid]
                    pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return None

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(module_dir, plugin):
    sim = SimulatedCluster(module_dir("cluster-nodes"), plugin)
    try:
        sim.add("cpu-a")
        sim.add("cpu-b")
        sim.add("gpu", gpus=1, memory=GIB // 2)  # room for a quantization (~280 MB), not for the F16 conversion (~940 MB)
        yield sim
    finally:
        sim.shutdown()


def _profile(tmp_path: Path, peak: int) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(PROFILE.format(peak=peak))
    return path


def _build_args(sample_model, profile, out, cluster):
    return ["build", sample_model, "--profile", profile, "--out", out, "--ray", cluster.cluster.address]


def _env(cluster):
    return {"PYTHONPATH": cluster.plugin, "RAY_AUTH_MODE": "disabled"}


def test_a_step_that_fits_no_single_node_is_refused_before_anything_runs(cluster, sample_model, tmp_path):
    # The GPU node has the GPU and too little memory; the CPU nodes have the memory and no GPU. Taken resource by
    # resource over all nodes it would pass, and wait forever.
    proc = run_cli(*_build_args(sample_model, _profile(tmp_path, GIB), tmp_path / "out", cluster), env=_env(cluster))
    assert proc.returncode == 9, proc.stderr[-3000:]
    error = next(l for l in proc.stderr.splitlines() if l.startswith("error:"))
    assert error == ("error: SmolLM2-135M-Instruct-tinygpu needs 1 GPU(s), 1.1 GB of memory and a CPU on one node, and no "
                     "node of the Ray cluster has them together (the largest node, gpu (192.0.2.2): 1 CPU(s), 1 GPU(s), "
                     "536.9 MB of memory)").replace("192.0.2.2", error.split("gpu (")[1].split(")")[0])
    assert "Ray task submitted" not in proc.stderr
    assert not list((tmp_path / "out").rglob("*.gguf"))


def test_the_preflight_names_a_node_that_cannot_run_the_build(cluster, sample_model, tmp_path):
    # A node whose llama.cpp checkout is not there: it would fail the F16 conversion, or make it with another
    # converter than the build's key records.
    cluster.add("cpu-bad", QUANTKIT_LLAMA_CPP=str(tmp_path / "no-llama.cpp"))
    try:
        proc = run_cli(*_build_args(sample_model, _profile(tmp_path, 1 << 20), tmp_path / "out", cluster),
                       env=_env(cluster))
    finally:
        cluster.remove("cpu-bad")
    assert proc.returncode == 9, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("error:"))
    assert lines[start] == "error: 1 of 4 Ray node(s) cannot run this build:"
    assert lines[start + 1].startswith("  cpu-bad (") and "SmolLM2-135M-Instruct-F16.gguf: " in lines[start + 1]
    assert f"{tmp_path / 'no-llama.cpp'} is not a llama.cpp checkout" in lines[start + 1]
    assert lines[start + 2].startswith("  fix: ")
    assert "Ray task submitted" not in proc.stderr
    assert not list((tmp_path / "out").rglob("*.gguf"))


def test_a_step_that_waits_past_the_pending_limit_fails_the_build(cluster, sample_model, tmp_path):
    # The only GPU is held by another job's task: the GPU step fits the cluster, and waits.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import ray, time; ray.init(address=%r, logging_level='ERROR')\n"
        "@ray.remote(num_gpus=1, num_cpus=0)\ndef hold():\n    print('holding', flush=True); time.sleep(600)\n"
        "ref = hold.remote(); time.sleep(600)") % cluster.cluster.address],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "holding" in holder.stdout.readline()
        profile = tmp_path / "gpu.yaml"
        profile.write_text("name: gpu\nformats:\n  tinygpu: {}\nevaluation:\n  enabled: false\n"
                           "chat_checks:\n  engine: false\n")
        proc = run_cli(*_build_args(sample_model, profile, tmp_path / "out", cluster),
                       env={**_env(cluster), "QUANTKIT_RAY_PENDING_S": "3"})
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    assert proc.returncode == 9, proc.stderr[-3000:]
    error = next(l for l in proc.stderr.splitlines() if l.startswith("error:"))
    assert error.startswith("error: SmolLM2-135M-Instruct-tinygpu waited ") and error.endswith(
        "s and never started: no node had its 1 CPU(s), 1 GPU(s) and 268.4 MB of memory free"), error
    assert "QUANTKIT_RAY_PENDING_S sets how long a step may wait" in proc.stderr


def test_a_node_killed_mid_step_and_the_build_still_finishes_as_a_local_build(cluster, sample_model, files_seed,
                                                                               sample_build, tmp_path):
    out = tmp_path / "out"
    build = subprocess.Popen([sys.executable, "-m", "quantkit", *map(str, _build_args(
        sample_model, _profile(tmp_path, 1 << 20), out, cluster))], cwd=REPO, env={**os.environ, **_env(cluster)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and build.poll() is None:
            killed = cluster.node_running("convert_hf_to_gguf")
            time.sleep(0.1)
        assert killed, "the F16 conversion never started on a node"
        cluster.remove(killed)  # its raylet, workers and the converter they started: a machine gone
        stdout, stderr = build.communicate(timeout=600)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, stderr[-3000:]
    folder = out / sample_model.name
    steps = json.loads((folder / ".quantkit" / "manifest.json").read_text())["steps"]
    ran = {name.removeprefix("artifact:"): rec["facts"]["ran_on"] for name, rec in steps.items()
           if name.startswith("artifact:")}
    f16 = ran["SmolLM2-135M-Instruct-F16.gguf"]
    # The conversion was taken over by the CPU node left (the GPU node has too little memory for it), as a retry.
    assert f16["node"].startswith("cpu-") and not f16["node"].startswith(killed) and f16["attempt"] >= 1, ran
    assert ran["SmolLM2-135M-Instruct-tinygpu"]["node"].startswith("gpu ("), ran
    assert len({r["node"] for r in ran.values()}) >= 2, ran
    assert sum("✓ SmolLM2-135M-Instruct-F16.gguf (Ray" in l for l in stderr.splitlines()) == 1  # recorded once
    assert not list(out.rglob("*.partial"))
    for name, local in [("F16", files_seed), ("Q8_0", files_seed), ("Q4_K_M", sample_build["dir"])]:
        filename = f"SmolLM2-135M-Instruct-{name}.gguf"
        assert sha256_file(folder / filename) == sha256_file(local / filename), filename
    copied = folder / "SmolLM2-135M-Instruct-tinygpu"
    assert sha256_file(copied / "model.safetensors") == sha256_file(sample_model / "model.safetensors")
    print(f"killed {killed} during the F16 conversion; ran: {json.dumps(ran)}")
