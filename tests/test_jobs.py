"""Unattended builds end to end: `quantkit watch` against a real HTTP Hub (tests/hub_server.py), the SQLite
queue, `quantkit worker` processes (killed with SIGKILL mid-job in one test), and the same job on a Ray cluster whose
nodes share no filesystem (tests/unshared.py), one of them killed mid-job. A simulated cluster with a shared folder:
tests/test_cluster.py."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from conftest import PROFILES, REPO, SAMPLE_REPO as SOURCE, TOKEN, report, run_cli
from quantkit.jobs.queue import open_queue
from unshared import UnsharedCluster, available

PROFILE = PROFILES / "jobs.yaml"
NAME = "SmolLM2-135M-Instruct"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def hub(module_hub):
    """The tests of this module share the Hub's state: the worker's first build publishes, later watches see it."""
    return module_hub


def _cli(hub, queue, *args, **kw):
    return run_cli(*args, "--queue", queue, env=hub.env, **kw)


@pytest.fixture(scope="module")
def built_by_worker(hub, module_dir):
    """One watch pass and one worker run, as cron would do them."""
    tmp = module_dir("jobs-local")
    queue, out = tmp / "queue.db", tmp / "out"
    first = _cli(hub, queue, "watch", "alice", "--profile", PROFILE, "--out", out, check=True)
    work = _cli(hub, queue, "worker", "--once", "--poll", "0.2", check=True)
    second = _cli(hub, queue, "watch", "alice", "--profile", PROFILE, "--out", out, check=True)
    return {"queue": queue, "out": out, "first": first, "work": work, "second": second}


def test_watch_queues_once_worker_builds_and_publishes(hub, built_by_worker):
    first, second, queue = built_by_worker["first"], built_by_worker["second"], built_by_worker["queue"]
    assert "1 new job(s), 0 already queued or built" in first.stdout
    assert f"{SOURCE}@{hub.commit[:12]}" in first.stdout

    [job] = open_queue(queue).list()
    assert (job.state, job.attempts, job.exit_code, job.revision) == ("done", 1, 0, hub.commit)
    assert "1 job(s) done, 0 failed" in built_by_worker["work"].stdout

    # The worker's build published (publish.auto), byte for byte.
    folder = built_by_worker["out"] / "SmolLM2-135M-Instruct"
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    published = api.model_info("alice/SmolLM2-135M-Instruct-GGUF", files_metadata=True)
    lfs = {s.rfilename: s.lfs.sha256 for s in published.siblings if s.rfilename.endswith(".gguf")}
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    assert ggufs == sorted(lfs) and len(ggufs) == 3
    assert all(lfs[name] == _sha(folder / name) for name in ggufs)
    assert json.loads((folder / "report.json").read_text())["source"]["revision"] == hub.commit

    # The second pass: nothing new; the quant repo the worker published is recognised, not queued.
    assert "0 new job(s), 1 already queued or built" in second.stdout
    assert "skipped  alice/SmolLM2-135M-Instruct-GGUF: already a quantized model" in second.stdout
    assert len(open_queue(queue).list()) == 1


@pytest.fixture(scope="module")
def unshared(module_dir, sample_model):
    """Two nodes that share no filesystem with the driver (tests/unshared.py), and a local source folder of the
    driver's, under its masked folder."""
    if not available():
        pytest.skip("the ray extra, and root for unshare --mount")
    cluster = UnsharedCluster(module_dir("unshared"))
    try:
        shutil.copytree(sample_model, cluster.driver / "src" / NAME)
        for count, name in enumerate(("node-1", "node-2"), 1):
            cluster.add(name)
            cluster.wait_for(count)  # one at a time: two `ray start`s of one machine at once raced in their sockets
        yield cluster
    finally:
        cluster.shutdown()


def test_the_shared_folder_mode_refuses_a_cluster_that_shares_no_folder(unshared):
    proc = subprocess.run([sys.executable, "-m", "quantkit", "build", str(unshared.driver / "src" / NAME), "--profile",
                           str(PROFILE), "--out", str(unshared.driver / "out"), "--ray", unshared.address],
                          env=unshared.env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("error:"))
    assert lines[start] == "error: 2 of 2 Ray node(s) cannot run this build:"
    for line in lines[start + 1:start + 3]:
        assert line.startswith("  node-"), line
        assert f"does not see the driver's build folder {unshared.driver / 'out' / NAME} (its probe file is missing here)" in line
        assert f"does not see the source folder {unshared.driver / 'src' / NAME}" in line
    assert "Ray task submitted" not in proc.stderr


def test_the_same_job_on_nodes_that_share_nothing_loses_a_node_and_makes_the_same_files(hub, built_by_worker, unshared,
                                                                                         tmp_path):
    """The worker's job again, through `quantkit worker --ray --store`: the driver's Hugging Face cache is in the folder
    the nodes see empty, so each node that reads the source downloads the commit from the test Hub itself. The node
    that made the F16 is killed as soon as the F16 is recorded."""
    queue, out, store = tmp_path / "queue.db", unshared.driver / "out", f"file://{unshared.store}"
    env = {**unshared.env, **hub.env, "HF_HOME": str(unshared.hidden / "hf"),
           "QUANTKIT_NODE_CACHE": str(tmp_path / "driver-cache")}  # publish fetches the files here, not into ~/.cache
    run_cli("watch", "alice", "--profile", PROFILE, "--out", out, "--queue", queue, env=env, check=True)
    worker = subprocess.Popen([sys.executable, "-m", "quantkit", "worker", "--once", "--poll", "0.2", "--queue", str(queue),
                               "--ray", unshared.address, "--store", store], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder, killed = out / NAME, None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and worker.poll() is None:
            try:
                steps = json.loads((folder / ".quantkit" / "manifest.json").read_text())["steps"]
            except (OSError, ValueError, KeyError):
                steps = {}
            if f16 := steps.get(f"artifact:{NAME}-F16.gguf"):
                killed = f16["facts"]["ran_on"]["node"].split()[0]  # the node that made it, and has it in its cache
                unshared.kill(killed)
            time.sleep(0.2)
        stdout, stderr = worker.communicate(timeout=900)
    finally:
        if worker.poll() is None:
            worker.kill()
    [job] = open_queue(queue).list()
    log = open_queue(queue).log_path(job.id).read_text()
    assert killed, f"the F16 file was never recorded: {log[-3000:]}"
    assert (worker.returncode, job.state) == (0, "done"), log[-5000:]
    local, remote = report(built_by_worker["out"] / NAME), report(folder)
    # The same files, byte for byte, and the same scores, as the worker's local build of the job.
    assert [(a["filename"], a["sha256"]) for a in remote["artifacts"]] == \
        [(a["filename"], a["sha256"]) for a in local["artifacts"]]
    scores = ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "tokens_scored", "smoke_passed", "smoke_reply")
    for mine, theirs in zip(remote["artifacts"], local["artifacts"]):
        assert {k: mine["evaluation"][k] for k in scores} == {k: theirs["evaluation"][k] for k in scores}, mine["filename"]
        # llama-server's checks, run on a node that fetched the file: the verdicts of the local build's
        assert [mine["engine"][k] for k in ("template", "tool_calls")] == [theirs["engine"][k] for k in ("template", "tool_calls")]
    assert remote["evaluation"]["reference_result"]["perplexity"] == local["evaluation"]["reference_result"]["perplexity"]
    # The build kept every artifact in the store, whole; publishing (publish.auto) fetched them into the folder.
    assert not list(unshared.store.rglob("*.partial"))
    manifest = json.loads((folder / ".quantkit" / "manifest.json").read_text())
    for a in remote["artifacts"]:
        assert manifest["stored"][a["filename"]] == a["sha256"] == _sha(folder / a["filename"])
        assert (unshared.store / "objects" / a["sha256"]).is_file()
    ran = {name.removeprefix("artifact:"): rec["facts"]["ran_on"] for name, rec in manifest["steps"].items()
           if name.startswith("artifact:")}
    assert not any(r["node"].startswith(killed) for n, r in ran.items() if not n.endswith("-F16.gguf")), ran
    assert sum(f"✓ {NAME}-F16.gguf (Ray" in line for line in log.splitlines()) == 1
    assert "alice/SmolLM2-135M-Instruct-GGUF@main: " in log  # it published, as the profile says
    print(f"killed {killed} after the F16 was recorded; ran: {json.dumps(ran)}")

    # Another coordinator, with an empty folder of its own: the store's manifest says everything is done.
    other = tmp_path / "other-coordinator"
    again = run_cli("build", SOURCE, "--revision", hub.commit, "--profile", PROFILE, "--out", other, "--ray",
                    unshared.address, "--store", store, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {NAME} from the manifest in {store}" in again.stderr
    assert "built 0, evaluated 0" in again.stdout and "Ray task submitted" not in again.stderr
    assert [a["sha256"] for a in report(other / NAME)["artifacts"]] == [a["sha256"] for a in remote["artifacts"]]


def test_a_new_commit_is_a_new_job_and_filters_apply(hub, built_by_worker, tmp_path):
    queue = built_by_worker["queue"]
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    commit = api.upload_file(path_or_fileobj=b"notes\n", path_in_repo="NOTES.md", repo_id=SOURCE).oid
    filtered = _cli(hub, queue, "watch", "alice", "--profile", PROFILE, "--out", built_by_worker["out"],
                    "--architecture", "Qwen2ForCausalLM", check=True)
    assert "0 new job(s)" in filtered.stdout
    assert f"skipped  {SOURCE}: architecture LlamaForCausalLM is not one of Qwen2ForCausalLM" in filtered.stdout
    too_big = _cli(hub, queue, "watch", "alice", "--profile", PROFILE, "--max-params", "100M", check=True)
    assert "parameters, more than 100,000,000" in too_big.stdout and "0 new job(s)" in too_big.stdout

    proc = _cli(hub, queue, "watch", "alice", "--profile", PROFILE, "--out", built_by_worker["out"],
                "--architecture", "LlamaForCausalLM", "--license", "apache-2.0", "--match", "SmolLM2-*", check=True)
    assert "1 new job(s)" in proc.stdout and f"{SOURCE}@{commit[:12]}" in proc.stdout
    new = open_queue(queue).list("queued")
    assert [j.revision for j in new] == [commit]
    assert "cancelled" in _cli(hub, queue, "jobs", "cancel", str(new[0].id), check=True).stdout
    assert "queued" in _cli(hub, queue, "jobs", "retry", str(new[0].id), check=True).stdout
    _cli(hub, queue, "jobs", "cancel", str(new[0].id), check=True)
    listed = _cli(hub, queue, "jobs", "list", check=True).stdout
    assert "1 cancelled, 1 done" in listed


def test_a_template_only_commit_is_a_retemplate_job(hub, built_by_worker, sample_model):
    """A commit that changes only the chat template (and docs) after a finished build is queued as a metadata-only
    job: the worker retemplates the built files from that revision, quantizes nothing, and publishes them."""
    from gguf import GGUFReader

    from quantkit.formats.gguf.chat_facts import gguf_facts

    queue, out = built_by_worker["queue"], built_by_worker["out"]
    folder = out / "SmolLM2-135M-Instruct"
    q4 = folder / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    tensors = [t.data.tobytes() for t in GGUFReader(q4).tensors]
    fixed = (sample_model / "chat_template.jinja").read_text().replace("named SmolLM, trained", "named SmolLM2, trained")
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    commit = api.upload_file(path_or_fileobj=fixed.encode(), path_in_repo="chat_template.jinja", repo_id=SOURCE).oid

    watch = _cli(hub, queue, "watch", "alice", "--profile", PROFILE, "--out", out, check=True)
    assert "1 new job(s)" in watch.stdout and f"{SOURCE}@{commit[:12]}  (template and tokenizer only)" in watch.stdout
    [job] = open_queue(queue).list("queued")
    assert (job.kind, job.revision, job.out, job.memory_bytes) == ("retemplate", commit, str(out.absolute()), 0)

    work = _cli(hub, queue, "worker", "--once", "--poll", "0.2", check=True)
    assert "1 job(s) done, 0 failed" in work.stdout
    log = open_queue(queue).log_path(job.id).read_text()
    assert "retemplated 3 file(s)" in log and "quantize" not in log
    assert [t.data.tobytes() for t in GGUFReader(q4).tensors] == tensors
    assert gguf_facts(q4).template == fixed
    report = json.loads((folder / "report.json").read_text())
    assert f"from {SOURCE}@{commit[:12]} in 3 file(s)" in report["changelog"][-1]
    published = api.model_info("alice/SmolLM2-135M-Instruct-GGUF", files_metadata=True)
    lfs = {s.rfilename: s.lfs.sha256 for s in published.siblings if s.rfilename.endswith(".gguf")}
    assert lfs == {a["filename"]: a["sha256"] for a in report["artifacts"]} == {
        p.name: _sha(p) for p in folder.glob("*.gguf")}


def test_a_killed_workers_job_is_taken_over_after_its_lease(hub, tmp_path):
    queue, out = tmp_path / "queue.db", tmp_path / "out"
    # Leases and resume, not scores: the files-only profile.
    _cli(hub, queue, "watch", "alice", "--profile", PROFILES / "files.yaml", "--out", out, check=True)
    env = {**os.environ, **hub.env}
    cmd = [sys.executable, "-m", "quantkit", "worker", "--queue", str(queue), "--lease", "4", "--poll", "0.2"]
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest = out / "SmolLM2-135M-Instruct" / ".quantkit" / "manifest.json"
    try:
        # Mid-job: the intermediate GGUF is built and recorded, the quantizations are not all done.
        _wait(lambda: manifest.exists() and "artifact:SmolLM2-135M-Instruct-F16.gguf" in manifest.read_text(), 600,
              "the first worker to finish the F16 conversion")
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    [job] = open_queue(queue).list()
    assert job.state == "running" and job.attempts == 1

    # Had the killed worker's build outlived it, it would still hold the build folder's lock and this would fail.
    second = _cli(hub, queue, "worker", "--once", "--lease", "4", "--poll", "0.2", check=True)
    [job] = open_queue(queue).list()
    assert (job.state, job.attempts, job.exit_code) == ("done", 2, 0)
    assert "(attempt 2/3)" in second.stdout
    log = open_queue(queue).log_path(job.id).read_text()
    assert log.count("=== attempt") == 2
    # The second attempt resumed: the first worker's conversion was kept, not redone.
    assert "✓ SmolLM2-135M-Instruct-F16.gguf (up to date)" in log.split("=== attempt 2")[1]
    assert (out / "SmolLM2-135M-Instruct" / "report.json").exists()
