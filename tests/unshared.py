"""A Ray cluster whose nodes share no filesystem with the driver, on one machine: a head started with
`ray start --head`, and nodes each started with `ray start --address ... --block` inside `unshare --mount`, with a
tmpfs mounted over the driver's folder (its build folder and its source) and over the folder of its Hugging Face
cache and the nodes' caches. Each node sees the driver's paths, empty, as a second machine would; only the artifact
store (a file:// URL) is shared, as an object store would be. Root is needed to mount (`available`)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
GIB = 1 << 30


def available() -> bool:
    return RAY.exists() and shutil.which("unshare") is not None and os.geteuid() == 0


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
