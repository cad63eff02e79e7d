"""The job queue's rules on both engines: an SQLite file and a real PostgreSQL server (tests/pg_server.py, started
from the installed binaries). The same tests, the same public API (quantkit.jobs.queue.open_queue)."""

import os
import signal
import socket
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import PROFILES, REPO, SAMPLE_REPO, run_cli
from pg_server import PostgresServer
from quantkit.jobs.queue import open_queue


@pytest.fixture(scope="module")
def postgres():
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_at(request, tmp_path):
    """Where a fresh queue is: an SQLite file, or a new database of the module's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "queue.db")
    return _new_database(request.getfixturevalue("postgres"), tmp_path)


def _new_database(server: PostgresServer, tmp_path) -> str:
    name = f"q_{tmp_path.name.lower().replace('-', '_')}"[:60]
    with psycopg.connect(server.url(), autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return server.url(database=name)


_CLAIMER = """
import sys
from quantkit.jobs.queue import open_queue
q = open_queue(sys.argv[1])
while (job := q.claim(sys.argv[2], 60)) is not None:
    print(job.id, flush=True)
"""


def test_claims_are_exclusive_across_processes_and_dead_leases_run_out(queue_at, tmp_path):
    q = open_queue(queue_at)
    ids = [q.enqueue(f"org/model-{i}", "a" * 40, "tiny", tmp_path).id for i in range(40)]
    assert q.enqueue("org/model-0", "a" * 40, "tiny", tmp_path) is None  # the same commit and profile: not again

    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, queue_at, f"w{i}"], stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for i in range(4)]
    claimed = [int(line) for p in procs for line in p.communicate(timeout=120)[0].split()]
    assert sorted(claimed) == ids  # every job taken exactly once
    assert {j.state for j in q.list()} == {"running"}

    job = q.enqueue("org/crashy", "b" * 40, "tiny", tmp_path, max_attempts=2)
    assert q.claim("w1", 0.3).id == job.id
    assert q.claim("w2", 0.3) is None  # still w1's
    time.sleep(0.5)
    assert q.claim("w2", 0.3).id == job.id and q.get(job.id).attempts == 2
    assert not q.renew(job.id, "w1", 60)  # w1 lost it
    time.sleep(0.5)
    assert q.claim("w3", 60) is None  # out of attempts
    gone = q.get(job.id)
    assert gone.state == "failed" and "worker w2 stopped renewing its lease" in gone.error

    # Only a worker with a free GPU takes a GPU job; a worker short of memory leaves a big job to others.
    big = q.enqueue("org/big", "c" * 40, "tiny", tmp_path, memory_bytes=20 << 30)
    gpu = q.enqueue("org/exl2", "d" * 40, "exl2", tmp_path, needs_gpu=True)
    assert q.claim("cpu-worker", 60, memory_bytes=8 << 30) is None
    assert q.claim("gpu-worker", 60, gpu=True, memory_bytes=8 << 30).id == gpu.id
    assert q.claim("roomy-worker", 60, memory_bytes=32 << 30).id == big.id

    # How jobs end, and what people do with them, through the command line on the same queue.
    assert q.finish(gpu.id, "gpu-worker", 0) == "done"
    assert q.finish(big.id, "roomy-worker", 3, "error: the source is gone", retry_in=None) == "failed"
    assert q.finish(big.id, "roomy-worker", 0) is None  # no longer that worker's
    proc = run_cli("jobs", "retry", str(big.id), "--queue", queue_at, check=True)
    assert q.get(big.id).state == "queued" and q.get(big.id).attempts == 0
    proc = run_cli("jobs", "cancel", str(ids[0]), "--queue", queue_at, check=True)
    proc = run_cli("jobs", "list", "--queue", queue_at, check=True)
    assert "1 cancelled, 1 done, 1 failed, 1 queued, 39 running" in proc.stdout
    assert f"#{gpu.id:<4} done      org/exl2@dddddddddddd" in proc.stdout


def test_job_commands_refuse_clearly(tmp_path):
    queue = tmp_path / "queue.db"
    proc = run_cli("jobs", "retry", "7", "--queue", queue)
    assert proc.returncode == 1 and "error: no job #7" in proc.stderr and "quantkit jobs list" in proc.stderr
    proc = run_cli("worker", "--memory", "lots", "--queue", queue)
    assert proc.returncode == 1 and "--memory 'lots' is not a size" in proc.stderr
    proc = run_cli("watch", "alice", "--max-params", "huge", "--queue", queue)
    assert proc.returncode == 1 and "not a parameter count: 'huge'" in proc.stderr
    proc = run_cli("jobs", "list", "--queue", tmp_path)  # a folder, not a database file
    assert proc.returncode == 10 and f"cannot open the job queue {tmp_path}" in proc.stderr and "--queue" in proc.stderr


def test_a_postgresql_url_that_cannot_open_says_why_in_one_line_and_never_shows_the_password(postgres):
    def refused(url: str, *words: str) -> str:
        proc = run_cli("jobs", "list", "--queue", url)
        assert proc.returncode == 10, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[0].startswith("error: cannot open the job queue") or lines[0].startswith("error: the job queue")
        assert all(w in proc.stderr for w in words), proc.stderr
        assert "Traceback" not in proc.stderr and postgres.password not in proc.stderr + proc.stdout
        return proc.stderr

    wrong = postgres.url(password="not-the-password")
    refused(wrong, "password authentication failed", "check the user and password")
    assert "not-the-password" not in refused(wrong)
    with PostgresServer() as stopped:
        port = stopped.port
    refused(f"postgresql://quantkit:{postgres.password}@127.0.0.1:{port}/postgres", "refused", "start PostgreSQL there")
    refused(postgres.url(database="nothere"), '"nothere" does not exist', "createdb")
    refused("postgresql://quantkit@127.0.0.1:5432/x?colour=blue", "is not a PostgreSQL URL", 'parameter: "colour"',
            "write it like postgresql://USER:PASSWORD@HOST")
    refused("postgresql://quantkit@127.0.0.1:notaport/x", 'invalid integer value "notaport"', "write it like")


def test_quantkit_makes_its_postgresql_tables_and_refuses_a_newer_schema(postgres, tmp_path):
    queue_at = _new_database(postgres, tmp_path)
    q = open_queue(queue_at)
    assert q.schema_version() == 4 and open_queue(queue_at).schema_version() == 4  # made once, then kept
    # A queue of the first version (jobs, no logs table) is brought up to date as it opens, its jobs kept.
    job = q.enqueue("org/old", "f" * 40, "tiny", tmp_path)
    with psycopg.connect(queue_at, autocommit=True) as db:
        db.execute("DROP TABLE quantkit.job_logs")
        db.execute("ALTER TABLE quantkit.jobs DROP COLUMN profile_text")
        db.execute("ALTER TABLE quantkit.jobs DROP COLUMN fix")
        db.execute("UPDATE quantkit.schema_version SET version = 1")
    again = open_queue(queue_at)
    assert again.schema_version() == 4 and [(j.id, j.profile_text) for j in again.list()] == [(job.id, None)]
    again.append_log(job.id, "a line\n")
    assert again.log_text(job.id) == "a line\n"
    with psycopg.connect(queue_at, autocommit=True) as db:
        db.execute("UPDATE quantkit.schema_version SET version = 99")
    proc = run_cli("jobs", "list", "--queue", queue_at)
    assert proc.returncode == 10 and "has schema version 99, newer than this quantkit's (4)" in proc.stderr
    assert "upgrade quantkit" in proc.stderr


def test_a_worker_runs_a_job_from_either_queue_and_records_how_it_ended(queue_at, sample_model, tmp_path,
                                                                       monkeypatch):
    """The worker against each engine: it claims the job, runs its build (one that fails at once: offline, the
    source is in no cache), keeps the build's log on its machine and records the build's one-line error."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where a PostgreSQL queue's logs go, here
    q = open_queue(queue_at)
    job = q.enqueue("nobody/Not-A-Model", "e" * 40, "files", tmp_path / "out", max_attempts=1)
    proc = run_cli("worker", "--once", "--poll", "0.2", "--queue", queue_at,
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1 and "worker: 0 job(s) done, 1 failed" in proc.stdout, proc.stdout[-2000:]
    done = q.get(job.id)
    assert done.state == "failed" and done.exit_code == 3 and done.attempts == 1, done
    assert "nobody/Not-A-Model" in done.error and "not in the Hugging Face cache" in done.error, done.error
    assert done.fix and "HF_HUB_OFFLINE" in done.fix, done.fix  # the build's own fix line, kept beside its error
    assert "=== attempt 1/1" in q.log_path(job.id).read_text()
    # A profile queued as a file on another machine: the job keeps its YAML, and the worker builds with that. This
    # one names a format that does not exist, which the build says; without the YAML it would say the file is missing.
    elsewhere = q.enqueue(str(sample_model), "e" * 40, "/machine-a/profiles/broken.yaml", tmp_path / "out",
                          max_attempts=1, profile_text="name: broken\nformats:\n  nosuchformat: {}\n")
    run_cli("worker", "--once", "--poll", "0.2", "--queue", queue_at)
    ran = q.get(elsewhere.id)
    assert (ran.state, ran.exit_code) == ("failed", 4) and "unknown format 'nosuchformat'" in ran.error, ran
    # `jobs show` on another machine (no log file of its own): a PostgreSQL queue has the log; an SQLite queue's
    # logs sit next to its file, on its one machine.
    shown = run_cli("jobs", "show", str(job.id), "--queue", queue_at, env={"XDG_STATE_HOME": str(tmp_path / "other")},
                    check=True).stdout
    assert "=== attempt 1/1" in shown and "not in the Hugging Face cache" in shown
    assert ("log           in the queue" in shown) == queue_at.startswith("postgresql://")


# A worker on a machine whose clock is off by argv[1] seconds: the process's time.time() is, nothing else.
_SKEWED_WORKER = """
import sys, time
real, offset = time.time, float(sys.argv[1])
time.time = lambda: real() + offset
sys.argv = ["quantkit", *sys.argv[2:]]
from quantkit.cli import main
main()
"""


def test_a_killed_workers_job_is_taken_over_once_by_the_servers_clock_whatever_the_workers_clocks_say(
        postgres, hub, tmp_path, monkeypatch):
    """Worker A (its clock an hour slow) is killed with kill -9 mid-job; worker B (an hour fast) waits while A lives,
    then takes the job over once A's lease has run out by the server's clock, and finishes it. With each worker's
    own clock, B would have taken A's live job at once, and a slow worker's expired lease would look alive."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # both workers' logs: this machine's
    queue_at, out = _new_database(postgres, tmp_path), tmp_path / "out"
    q = open_queue(queue_at)
    job = q.enqueue(SAMPLE_REPO, hub.commit, str(PROFILES / "files.yaml"), out)  # files only: leases, not scores
    env = {**os.environ, **hub.env}

    def worker(offset: float, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _SKEWED_WORKER, str(offset), "worker", "--queue", queue_at,
                                 "--lease", "2", "--poll", "0.2", *args], env=env, cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    first = worker(-3600)
    second = None
    manifest = out / "SmolLM2-135M-Instruct" / ".quantkit" / "manifest.json"
    try:
        deadline = time.monotonic() + 300
        while q.get(job.id).state != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        second = worker(3600, "--once")
        # Mid-job (the F16 conversion recorded) and at least two lease periods after B started: still A's.
        time.sleep(4)
        while "artifact:SmolLM2-135M-Instruct-F16.gguf" not in (manifest.read_text() if manifest.exists() else ""):
            assert time.monotonic() < deadline, "the first worker never finished the F16 conversion"
            time.sleep(0.2)
        held = q.get(job.id)
        assert (held.state, held.attempts, held.worker) == ("running", 1, f"{socket.gethostname()}:{first.pid}")
        first.send_signal(signal.SIGKILL)
        first.wait()
        output = second.communicate(timeout=600)[0]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert second.returncode == 0, output[-3000:]
    done = q.get(job.id)
    assert (done.state, done.attempts, done.exit_code) == ("done", 2, 0), done
    assert "(attempt 2/3)" in output and output.count("started (attempt") == 1
    log = q.log_path(job.id).read_text()
    assert log.count("=== attempt") == 2 and f"=== attempt 2/3 on {socket.gethostname()}:{second.pid}" in log
    assert "✓ SmolLM2-135M-Instruct-F16.gguf (up to date)" in log.split("=== attempt 2")[1]  # A's conversion kept
    # The queue's copy: what A shipped before it was killed, then B's whole attempt.
    kept = q.log_text(job.id)
    assert kept.count("=== attempt") == 2 and kept.index("=== attempt 1/3") < kept.index("=== attempt 2/3")
    assert "✓ SmolLM2-135M-Instruct-F16.gguf (up to date)" in kept.split("=== attempt 2")[1]


def test_a_job_kept_in_a_store_names_no_machine_and_any_machine_resumes_or_serves_it(postgres, sample_model, tmp_path):
    """A job whose `out` is an artifact store URL: the row holds the URL, not a path. A worker (machine B: its own
    state folder) builds it in scratch of its own, keeps it in the store and drops the scratch; machine C resumes the
    build from the store alone, and `quantkit serve --builds URL` shows it."""
    import json
    import urllib.request

    from quantkit.fsutil import sha256_file
    from quantkit.jobs.worker import _local_out

    queue_at, store = _new_database(postgres, tmp_path), f"file://{tmp_path}/store"
    q = open_queue(queue_at)
    profile = PROFILES / "files.yaml"  # kept in the job as YAML, as watch keeps a profile file
    job = q.enqueue(str(sample_model), "e" * 40, str(profile), store, max_attempts=1, profile_text=profile.read_text())
    assert job.out == store
    proc = run_cli("worker", "--once", "--poll", "0.2", "--queue", queue_at,
                   env={"XDG_STATE_HOME": str(tmp_path / "machine-b")})
    done = q.get(job.id)
    assert (proc.returncode, done.state) == (0, "done"), (q.log_text(job.id) or "")[-3000:]
    assert not (_local_out(done) / sample_model.name).exists()  # B's scratch is gone; the store has the build
    name = sample_model.name
    kept = tmp_path / "store" / "builds" / name
    report = json.loads((kept / "report.json").read_text())
    stored = json.loads((kept / ".quantkit" / "manifest.json").read_text())["stored"]
    assert sorted(stored) == sorted(a["filename"] for a in report["artifacts"]) and len(stored) == 2
    for artifact in report["artifacts"]:  # each file's bytes, by the digest its report gives
        tree = json.loads((tmp_path / "store" / "trees" / f"{stored[artifact['filename']]}.json").read_text())
        blob = tmp_path / "store" / "objects" / tree["files"][0]["sha256"]
        assert blob.stat().st_size == artifact["size_bytes"] and sha256_file(blob) == artifact["sha256"]

    # Machine C: an empty folder and the store. Everything is up to date; nothing is made again.
    again = run_cli("build", sample_model, "--profile", PROFILES / "files.yaml", "--out", tmp_path / "machine-c",
                    "--store", store, check=True)
    assert f"resuming {name} from the manifest in {store}" in again.stderr
    assert "built 0, evaluated 0" in again.stdout, again.stdout[-2000:]
    assert sha256_file(tmp_path / "machine-c" / name / f"{name}-Q8_0.gguf") == next(
        a["sha256"] for a in report["artifacts"] if a["variant"] == "Q8_0")

    # The dashboard reads the store like a folder of builds.
    serve = subprocess.Popen([sys.executable, "-m", "quantkit", "serve", "--queue", queue_at, "--builds", store,
                              "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        url = serve.stdout.readline().split("at ", 1)[1].split()[0]
        page = urllib.request.urlopen(f"{url}builds/{name}", timeout=30).read().decode()
        jobs = json.loads(urllib.request.urlopen(f"{url}api/jobs", timeout=30).read())
    finally:
        serve.terminate()
        serve.wait(10)
    assert f'data-file="{name}-Q8_0.gguf"' in page and str(tmp_path) not in page
    assert [(j["id"], j["state"], j["build"]) for j in jobs["jobs"]] == [(job.id, "done", name)]
