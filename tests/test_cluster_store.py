"""A cluster that shares no filesystem: a head started with `ray start --head`, and two nodes, each started with
`ray start --address ... --block` inside `unshare --mount`, with a tmpfs mounted over the driver's folder (its
build folder and its source) and over the folder of its Hugging Face cache and the nodes' caches. Each node sees the
driver's paths, empty, as a second machine would; only the artifact store (a file:// URL) is shared, as an object
store would be. Root is needed to mount; the tests are skipped without it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_REPO, report, run_cli, seed

RAY = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.skipif(not RAY.exists() or shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="the ray extra, and root for unshare --mount")
GIB = 1 << 30
NAME = "SmolLM2-135M-Instruct"
# tests/profiles/tiny.yaml with Q4_K_M, and smoke failures allowed (at 4 bits the sample often answers in French).
PROFILE = """name: unshared
formats:
  gguf:
    types: [Q4_K_M, Q8_0]
evaluation:
  window: 256
  max_tokens: 512
smoke:
  allow_failures: true
chat_checks:
  engine: false
  enabled: false
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class UnsharedCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.driver = root / "driver"  # the build folder and the source: the nodes see it empty
        self.hidden = root / "caches"  # the driver's Hugging Face cache, and each node's own caches
        self.store = root / "store"
        for p in (self.driver, self.hidden, self.store):
            p.mkdir(parents=True)
        self.temp = tempfile.mkdtemp(prefix="qku", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HOME": str(self.hidden / "hf")}
        subprocess.run([RAY, "start", "--head", f"--port={self.port}", "--num-cpus=0", f"--temp-dir={self.temp}",
                        "--include-dashboard=false", "--object-store-memory=100000000"], env=self.env, check=True,
                       capture_output=True, timeout=120)
        self.nodes: dict[str, subprocess.Popen] = {}

    def add(self, name: str) -> None:
        mounts = f"mount -t tmpfs tmpfs {self.driver} && mount -t tmpfs tmpfs {self.hidden}"
        # 2 logical CPUs on this 2-core machine: each step runs with the threads a local build uses here.
        # Two nodes of one machine: each its own ports (Ray's defaults are fixed numbers).
        ports = " ".join(f"--{option}={_free_port()}" for option in (
            "node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port"))
        start = (f"exec {RAY} start --address={self.address} --block --num-cpus=2 --memory={4 * GIB} "
                 f"--node-name={name} --object-store-memory=100000000 {ports}")
        env = {**self.env, "QUANTKIT_NODE_CACHE": str(self.hidden / "node")}
        with open(self.root / f"{name}.log", "w") as log:
            self.nodes[name] = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                                 f"{mounts} && {start}"], env=env, start_new_session=True,
                                                stdout=log, stderr=subprocess.STDOUT)

    def wait_for(self, count: int) -> None:
        probe = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                 "print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')))" % self.address)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True, timeout=60)
            if out.stdout.strip() == str(count):
                return
            time.sleep(1)
        logs = "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in self.root.glob("*.log"))
        raise AssertionError(f"the cluster never had {count} nodes; the nodes' logs:\n{logs}")

    def kill(self, name: str) -> None:
        """Every process of the node's mount namespace, with SIGKILL: a machine gone."""
        ns = _mount_ns(self.nodes[name].pid)
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and _mount_ns(int(proc.name)) == ns:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.nodes.pop(name).wait(timeout=60)

    def shutdown(self) -> None:
        for name in list(self.nodes):
            self.kill(name)
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def unshared(module_dir, sample_model):
    cluster = UnsharedCluster(module_dir("unshared"))
    try:
        # The source: a local folder of the driver's, so under its masked folder (the store carries it to the nodes).
        shutil.copytree(sample_model, cluster.driver / "src" / NAME)
        (cluster.root / "profile.yaml").write_text(PROFILE)
        for count, name in enumerate(("node-1", "node-2"), 1):
            cluster.add(name)
            cluster.wait_for(count)  # one at a time: two `ray start`s of one machine at once raced in their sockets
        yield cluster
    finally:
        cluster.shutdown()


def _build(cluster: UnsharedCluster, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantkit", "build", str(cluster.driver / "src" / NAME), "--profile",
            str(cluster.root / "profile.yaml"), "--out", str(cluster.driver / "out"), "--ray", cluster.address, *extra]


def test_the_shared_folder_mode_refuses_a_cluster_that_shares_no_folder(unshared):
    proc = subprocess.run(_build(unshared), env=unshared.env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("error:"))
    assert lines[start] == "error: 2 of 2 Ray node(s) cannot run this build:"
    for line in lines[start + 1:start + 3]:
        assert line.startswith("  node-"), line
        assert f"does not see the driver's build folder {unshared.driver / 'out' / NAME} (its probe file is missing here)" in line
        assert f"does not see the source folder {unshared.driver / 'src' / NAME}" in line
    assert "Ray task submitted" not in proc.stderr


def test_a_store_build_loses_a_node_and_equals_a_local_build(unshared, hub, tmp_path):
    # The source is the test Hub's: the driver's copy is in its Hugging Face cache, which the nodes see empty, so
    # each node that reads the source downloads the same commit into its own.
    env = {**unshared.env, **hub.env, "HF_HOME": str(unshared.hidden / "hf")}
    source = ["build", SAMPLE_REPO, "--revision", hub.commit, "--profile", str(unshared.root / "profile.yaml")]
    run_cli(*source, "--out", tmp_path, env={**hub.env, "HF_HOME": str(tmp_path / "hf")}, check=True)
    local = report(tmp_path / NAME)

    folder = unshared.driver / "out" / NAME
    build = subprocess.Popen([sys.executable, "-m", "quantkit", *source, "--out", str(unshared.driver / "out"),
                              "--ray", unshared.address, "--store", f"file://{unshared.store}"],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and build.poll() is None:
            try:
                steps = json.loads((folder / ".quantkit" / "manifest.json").read_text())["steps"]
            except (OSError, ValueError, KeyError):
                steps = {}
            if f16 := steps.get(f"artifact:{NAME}-F16.gguf"):
                killed = f16["facts"]["ran_on"]["node"].split()[0]  # the node that made it, and has it in its cache
                unshared.kill(killed)
            time.sleep(0.2)
        stdout, stderr = build.communicate(timeout=900)
        assert killed, f"the F16 file was never recorded: {stderr[-3000:]}"
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, stderr[-5000:]
    remote = report(folder)
    # The same files, byte for byte, and the same scores, as the local build's.
    assert [(a["filename"], a["sha256"]) for a in remote["artifacts"]] == \
        [(a["filename"], a["sha256"]) for a in local["artifacts"]]
    scores = ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "tokens_scored", "smoke_passed", "smoke_reply")
    for mine, theirs in zip(remote["artifacts"], local["artifacts"]):
        assert {k: mine["evaluation"][k] for k in scores} == {k: theirs["evaluation"][k] for k in scores}, mine["filename"]
    assert remote["evaluation"]["reference_result"]["perplexity"] == local["evaluation"]["reference_result"]["perplexity"]
    # The driver never had an artifact: they are in the store, whole, and nowhere in its build folder.
    assert not [p for p in folder.iterdir() if p.name.startswith(NAME)]
    assert not list(unshared.store.rglob("*.partial"))
    manifest = json.loads((folder / ".quantkit" / "manifest.json").read_text())
    for a in remote["artifacts"]:
        assert manifest["stored"][a["filename"]] == a["sha256"]
        assert (unshared.store / "objects" / a["sha256"]).is_file()
    ran = {name.removeprefix("artifact:"): rec["facts"]["ran_on"] for name, rec in manifest["steps"].items()
           if name.startswith("artifact:")}
    assert not any(r["node"].startswith(killed) for n, r in ran.items() if not n.endswith("-F16.gguf")), ran
    assert sum(f"✓ {NAME}-F16.gguf (Ray" in line for line in stderr.splitlines()) == 1
    print(f"killed {killed} after the F16 was recorded; ran: {json.dumps(ran)}")

    # Another coordinator, with an empty folder of its own: the store's manifest says everything is done.
    other = tmp_path / "other-coordinator"
    again = subprocess.run([sys.executable, "-m", "quantkit", *source, "--out", str(other), "--ray", unshared.address,
                            "--store", f"file://{unshared.store}"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {NAME} from the manifest in file://{unshared.store}" in again.stderr
    assert "built 0, evaluated 0" in again.stdout and "Ray task submitted" not in again.stderr
    assert [a["sha256"] for a in report(other / NAME)["artifacts"]] == [a["sha256"] for a in remote["artifacts"]]


def test_no_task_argument_names_a_path_of_the_driver(tiny_seed, tmp_path):
    """What the store-mode executor gives its tasks, pickled as Ray pickles them: the driver's folders appear
    nowhere (tasks get references; their nodes have none of those paths)."""
    from ray import cloudpickle  # what Ray pickles task arguments with

    from quantkit.cluster.executor import RayExecutor
    from quantkit.cluster.stored import SourceRef
    from quantkit.build import make_plan
    from quantkit.evaluate.protocol import EvalSpec
    from quantkit.executors import HelperRun
    from quantkit.formats import BuildContext
    from quantkit.manifest import Manifest
    from quantkit.sample import ensure_sample
    from quantkit.store import ArtifactStore

    folder = seed(tiny_seed, tmp_path / "out")
    source = tmp_path / "src" / NAME
    shutil.copytree(ensure_sample(), source)
    plan = make_plan(str(source), str(Path(__file__).parent / "profiles" / "tiny.yaml"), tmp_path / "out")
    manifest = Manifest(folder)
    executor = object.__new__(RayExecutor)  # its task arguments, without a cluster
    executor.store_url = f"file://{tempfile.mkdtemp(prefix='qkstore')}"  # the one path they share: not under tmp_path
    executor.store = ArtifactStore(executor.store_url)
    executor.manifest, executor._where = manifest, {}
    executor._source = SourceRef.of(plan.source, executor.store)
    tokens = folder / ".quantkit" / "eval-tokens.npy"
    context = BuildContext(source=plan.source, out_dir=folder, reporter=None, threads=2,
                           evaluation=EvalSpec(tokens=str(tokens), window=256))
    q8 = next(i for i in plan.artifacts if i.variant == "Q8_0")
    spec = folder / ".quantkit" / "eval-x.spec.json"
    spec.write_text(json.dumps(replace(EvalSpec(tokens=str(tokens), window=256),
                                       ref_read=str(folder / ".quantkit" / "reference-logprobs.npy")).to_json()))
    helper = HelperRun("evaluate Q8_0", ("-m", "quantkit.evaluate.hf_runner", "evaluate", str(folder / q8.filename),
                                         str(spec), str(folder / ".quantkit" / "eval-x.result.json")), folder / ".quantkit")
    pickled = cloudpickle.dumps(([q8], executor._recipe([q8], context))) + cloudpickle.dumps(executor._stored_eval(helper))
    # A Path pickles as its parts: the test's own folder name is in every path of the driver's here.
    assert tmp_path.name.encode() in cloudpickle.dumps(context.out_dir)
    assert tmp_path.name.encode() not in pickled
    shutil.rmtree(executor.store.root, ignore_errors=True)
