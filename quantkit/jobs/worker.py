"""Run queued jobs: each is a `quantkit build` child process, so a job is exactly what a person would run.

The worker takes jobs while it has free slots, memory (by each job's estimate) and, for jobs that
need one, a free GPU; it renews their leases while they run and records how each ended. Builds are
resumable, so a job taken over from a dead worker continues from the files that worker finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import network
from ..cpus import usable_cpus
from ..exits import STATUS_ENV, read_status
from ..fsutil import write_text_atomic
from ..memory import machine_memory
from ..paths import cache_dir
from ..procs import child_env, die_with_parent, stop
from .queue import Job, JobQueue, is_store


@dataclass
class WorkerOptions:
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    max_jobs: int = 1
    lease_s: float = 60.0  # a dead worker's job is taken over this long after its last renewal
    poll_s: float = 5.0
    once: bool = False  # exit when no job is queued or running, instead of waiting for new ones
    threads: int = 0  # per job; 0: the machine's cores shared among max_jobs
    memory_bytes: int = 0  # what the jobs' estimates may add up to; 0: 90% of the machine's memory
    gpus: int | None = None  # None: as many as torch sees
    ray: str | None = None  # run each job's build steps on this Ray cluster
    store: str | None = None  # ...keeping the artifacts in this store (docs/cluster.md)


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    log: object
    started: float
    shipped: int  # how much of the log file the queue has (JobQueue.append_log)


@dataclass
class WorkerSummary:
    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


class Worker:
    def __init__(self, queue: JobQueue, options: WorkerOptions, log: Callable[[str], None] = print) -> None:
        self.q, self.o, self.log = queue, options, log
        self.running: dict[int, _Running] = {}
        self.stopping = False
        if self.o.gpus is None:
            from ..gpus import cuda_devices

            self.o.gpus = cuda_devices()
        self.memory = self.o.memory_bytes or int(0.9 * machine_memory())
        self.threads = self.o.threads or max(1, usable_cpus() // self.o.max_jobs)

    def run(self) -> WorkerSummary:
        summary = WorkerSummary()
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        self.log(f"worker {self.o.name}: queue {self.q.where}, up to {self.o.max_jobs} job(s), {self.threads} threads each, "
                 f"{self.o.gpus} GPU(s)" + (f", build steps on Ray at {self.o.ray}" if self.o.ray else ""))
        try:
            next_renewal = 0.0
            while not self.stopping:
                self._reap(summary)
                while not self.stopping and len(self.running) < self.o.max_jobs and (job := self._claim()):
                    self._start(job)
                if time.monotonic() >= next_renewal:
                    self._renew()
                    next_renewal = time.monotonic() + self.o.lease_s / 3
                if self.o.once and not self.running and self.q.pending() == 0:
                    break
                time.sleep(min(self.o.poll_s, self.o.lease_s / 3) if not self.running else 0.5)
        finally:
            for r in list(self.running.values()):
                self._kill(r, "the worker is stopping")
                self.q.finish(r.job.id, self.o.name, 130, "stopped with its worker",
                              fix=f"quantkit jobs retry {r.job.id} queues it again")
            for s, handler in previous.items():
                signal.signal(s, handler)
        return summary

    def _stop(self, signum, frame) -> None:
        self.log(f"worker {self.o.name}: stopping (signal {signum}); running jobs are stopped and marked failed")
        self.stopping = True

    def _claim(self) -> Job | None:
        used = sum(r.job.memory_bytes for r in self.running.values())
        gpu_free = self.o.gpus > sum(r.job.needs_gpu for r in self.running.values())
        # Alone, a job may exceed the estimate budget: better to try it than to leave it queued forever.
        # On Ray the steps run on the cluster, which places them by their own needs.
        room = self.memory - used if self.running and self.memory and not self.o.ray else None
        return self.q.claim(self.o.name, self.o.lease_s, gpu=gpu_free or bool(self.o.ray), memory_bytes=room)

    def _start(self, job: Job) -> None:
        log_path = self.q.log_path(job.id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a")
        shipped = log.tell()  # earlier attempts' lines (this machine's), which their workers shipped
        log.write(f"\n=== attempt {job.attempts}/{job.max_attempts} on {self.o.name} at {time.ctime()}\n")
        log.flush()
        profile = self._profile(job)
        if job.kind == "retemplate":  # the build in `out` takes the revision's template; published if it was
            folder = Path(job.out) / job.repo_id.split("/")[-1]
            args = [sys.executable, "-m", "quantkit", "retemplate", str(folder), "--from", f"{job.repo_id}@{job.revision}",
                    "--threads", str(self.threads)] + (["--publish"] if _publishes(profile) else [])
        else:
            # A job whose `out` is a store is built in a folder of this worker's and kept in the store (the build
            # uploads as it goes): its row names no machine's path, so any worker of the fleet can take it.
            out, store = (str(_local_out(job)), job.out) if is_store(job.out) else (job.out, self.o.store)
            args = [sys.executable, "-m", "quantkit", "build", job.repo_id, "--revision", job.revision, "--profile",
                    profile, "--out", out, "--threads", str(self.threads)]
            args += (["--ray", self.o.ray] if self.o.ray else []) + (["--store", store] if store else [])
        status = _status_path(self.q, job.id)
        status.unlink(missing_ok=True)
        # hub=True: the build downloads its source (and any Hub dataset it calibrates or evaluates on), and
        # publishes when the profile says publish.auto; its own helpers get no token (procs.run_program).
        # die_with_parent's contract holds: this thread (run's, the main one, as its signal handlers require)
        # polls the child and stops it before run returns, so the forking thread outlives it.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env({"PYTHONUNBUFFERED": "1", STATUS_ENV: str(status)}, hub=True),
                                preexec_fn=die_with_parent())
        self.running[job.id] = _Running(job, proc, log, time.monotonic(), shipped)
        self.log(f"#{job.id} {job.repo_id}@{job.revision[:12]}: started (attempt {job.attempts}/{job.max_attempts}), "
                 f"log {log_path}")

    def _profile(self, job: Job) -> str:
        """The job's profile: its name, or the YAML the job keeps, written beside its log (the file it was queued
        from may be on another machine)."""
        if job.profile_text is None:
            return job.profile
        path = self.q.logs / f"{job.id}.profile.yaml"
        write_text_atomic(path, job.profile_text)
        return str(path)

    def _renew(self) -> None:
        for r in list(self.running.values()):
            self._ship_log(r)
            if not self.q.renew(r.job.id, self.o.name, self.o.lease_s):
                self._kill(r, "it was cancelled or its lease was taken over")
                del self.running[r.job.id]

    def _reap(self, summary: WorkerSummary) -> None:
        for job_id, r in list(self.running.items()):
            code = r.proc.poll()
            if code is None:
                continue
            del self.running[job_id]
            r.log.close()
            self._ship_log(r, final=True)
            seconds = time.monotonic() - r.started
            status = read_status(_status_path(self.q, job_id)) if code else None
            if code == 0:
                error = fix = None
                if is_store(r.job.out):  # the store has the build now; this machine's copy was scratch
                    shutil.rmtree(_local_out(r.job) / r.job.repo_id.split("/")[-1], ignore_errors=True)
            elif status:
                error, fix = status.error, status.hint or None
            else:  # a build that could not write its status file: its log's "error:" and "  fix:" lines
                error, fix = _last_error(self.q.log_path(job_id))
                error = error or f"exit code {code}"
            # A build the network failed may work later: queued again, after a pause that doubles each attempt.
            retry_in = 30 * network.backoff_s() * 2 ** (r.job.attempts - 1) if status and status.retryable else None
            state = self.q.finish(job_id, self.o.name, code, error, retry_in=retry_in, fix=fix)
            if state == "queued":
                self.log(f"#{job_id} {r.job.repo_id}@{r.job.revision[:12]}: failed (exit {code}): {error}; queued again, "
                         f"attempt {r.job.attempts + 1}/{r.job.max_attempts} in {retry_in:.0f}s or later")
                continue
            (summary.done if code == 0 else summary.failed).append(job_id)
            state = "done" if code == 0 else f"failed (exit {code}): {error}"
            self.log(f"#{job_id} {r.job.repo_id}@{r.job.revision[:12]}: {state} after {seconds:.0f}s")

    def _kill(self, r: _Running, why: str) -> None:
        self.log(f"#{r.job.id}: stopping its build: {why}")
        stop(r.proc, grace_s=20)
        r.log.close()
        self._ship_log(r, final=True)

    def _ship_log(self, r: _Running, final: bool = False) -> None:
        """The log's new lines into the queue, where every machine reads them (a PostgreSQL queue keeps them):
        whole lines only until the build has ended, so that no character is cut in two."""
        if not self.q.keeps_logs:
            return
        try:
            with open(self.q.log_path(r.job.id), "rb") as f:
                f.seek(r.shipped)
                chunk = f.read()
        except OSError:
            return
        if not final:
            chunk = chunk[:chunk.rfind(b"\n") + 1]
        if chunk:
            self.q.append_log(r.job.id, chunk.decode("utf-8", errors="replace"))
            r.shipped += len(chunk)


def _publishes(profile: str) -> bool:
    """The profile's publish.auto (a profile that no longer loads: no; the job's own command says why)."""
    from ..errors import QuantkitError
    from ..profiles import load_profile

    try:
        return load_profile(profile).publish.auto
    except QuantkitError:
        return False


def _local_out(job: Job) -> Path:
    """Where this machine builds a job kept in a store: one folder per store, so that a job that failed here and
    is taken again here resumes from what it left (elsewhere, it resumes from the store)."""
    return cache_dir() / "store-builds" / hashlib.sha256(job.out.encode()).hexdigest()[:16]


def _status_path(q: JobQueue, job_id: int) -> Path:
    return q.logs / f"{job_id}.status.json"


def _last_error(log: Path) -> tuple[str | None, str | None]:
    """The build's own one-line cause ("error: ...") from the end of its log, and the fix printed after it."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None, None
    at = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("error: ")), None)
    if at is None:
        return None, None
    after = lines[at + 1] if at + 1 < len(lines) else ""
    return lines[at][7:].strip(), after.strip()[5:].strip() if after.startswith("  fix: ") else None
