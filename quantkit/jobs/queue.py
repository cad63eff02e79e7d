"""The job queue: what to build, who is building it, and how it ended. One API and one set of rules (JobQueue)
over two engines: an SQLite file (sqlite_queue.py: the default, one command and no server, for workers on one
machine) and PostgreSQL (postgres_queue.py: a fleet, `--queue postgresql://...`). open_queue picks one.

Workers claim jobs with a lease. A worker renews its leases while it builds; a job whose lease ran out (its worker
died) is claimable again, so a crash costs a retry, never a lost job. Each claim is atomic in either engine (SQLite's
write lock; PostgreSQL's row locks, skipping rows another claim holds): two workers never take the same job. Every
time a rule compares comes from the engine's clock (`_now`): PostgreSQL's server's, so that machines whose clocks
disagree still agree on when a lease ran out.
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import QuantkitError
from ..paths import state_dir

STATES = ("queued", "running", "done", "failed", "cancelled")

# The jobs table's columns besides `id` (whose type each engine gives), in types both engines read alike: BIGINT and
# DOUBLE PRECISION are 8 bytes in PostgreSQL (its INTEGER and REAL are 4) and SQLite's INTEGER and REAL. These are
# the first version's; a later column is added by each engine's own step (ALTER TABLE), never here.
JOB_COLUMNS = """
    repo_id TEXT NOT NULL,
    revision TEXT NOT NULL,
    profile TEXT NOT NULL,
    out TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    needs_gpu INTEGER NOT NULL DEFAULT 0,
    memory_bytes BIGINT NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until DOUBLE PRECISION,
    exit_code INTEGER,
    error TEXT,
    not_before DOUBLE PRECISION,
    kind TEXT NOT NULL DEFAULT 'build',
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    UNIQUE (repo_id, revision, profile)"""


def is_store(out: str | Path) -> bool:
    """Whether a job's `out` is an artifact store URL (file:///..., s3://...): no machine's path, so any worker on
    any machine builds the job (into a folder of its own) and keeps the build there."""
    return "://" in str(out)


def default_queue_path() -> Path:
    """$XDG_STATE_HOME/quantkit/queue.db: state to keep, not a cache to wipe."""
    return state_dir() / "queue.db"


def open_queue(where: str | Path | None = None) -> "JobQueue":
    """The queue at `where` (else $QUANTKIT_QUEUE, else the default SQLite file): a postgresql:// URL, or the path
    of an SQLite file."""
    where = where or os.environ.get("QUANTKIT_QUEUE") or default_queue_path()
    if str(where).startswith(("postgresql://", "postgres://")):
        from .postgres_queue import PostgresQueue

        return PostgresQueue(str(where))
    from .sqlite_queue import SqliteQueue

    return SqliteQueue(Path(where).expanduser())


@dataclass(frozen=True)
class Job:
    id: int
    repo_id: str
    revision: str  # the source commit the job builds; a new commit is a new job
    profile: str  # a profile name, or an absolute path to a profile file
    out: str  # where the build goes: an absolute parent folder (OUT/<Model>/), or an artifact store URL (is_store)
    state: str
    attempts: int
    max_attempts: int
    needs_gpu: bool
    memory_bytes: int  # the estimate a worker checks against its memory before taking the job
    worker: str | None
    lease_until: float | None
    exit_code: int | None
    error: str | None
    not_before: float | None  # a job queued again after a network failure waits until then
    created: float
    updated: float
    # "build": `quantkit build` of the revision. "retemplate": the revision changed only tokenizer or template files
    # since the build in `out` was made: `quantkit retemplate --from` that revision, nothing quantized again.
    kind: str = "build"
    # A profile given as a file: its YAML, so that a worker on another machine builds with it (`profile` is then the
    # file's path where it was queued, a name for the job). None for a profile name.
    profile_text: str | None = None
    fix: str | None = None  # what to do about `error`, as the failed command said it

    def render(self) -> str:
        who = f" on {self.worker}" if self.state == "running" else ""
        if self.state == "queued" and self.not_before and self.not_before > time.time():
            who = f", next attempt at {time.strftime('%H:%M:%S', time.localtime(self.not_before))}"
        why = f": {self.error}" if self.error and self.state in ("failed", "queued") else ""
        why += f" (fix: {self.fix})" if why and self.fix else ""
        what = "  (template and tokenizer only)" if self.kind == "retemplate" else ""
        return (f"#{self.id:<4} {self.state:9} {self.repo_id}@{self.revision[:12]}{what}  profile {self.profile}  "
                f"attempt {self.attempts}/{self.max_attempts}{who}{why}")


class JobQueue:
    """The queue's rules, in SQL both engines run. An engine gives a transaction (`_transaction`: a connection whose
    execute takes `?` placeholders and yields rows by column name), its clock (`_now`), the clause that makes a claim
    skip the rows other claims hold (`_claim_lock`), and where job logs go (`logs`)."""

    where: str  # what --queue names it by, without a password
    logs: Path  # each job's log and status file: on the worker's machine
    _claim_lock = ""

    def _transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        return self._transaction()

    def _now(self, db) -> float:
        return time.time()

    def now(self) -> float:
        """The clock the queue's rules use (PostgreSQL's: the server's), so that a wait is shown as it will be kept."""
        with self._read() as db:
            return self._now(db)

    keeps_logs = False  # whether append_log keeps the logs where every machine reads them

    def log_path(self, job_id: int) -> Path:
        """Where the worker that runs the job writes its log, on its own machine (every attempt appended)."""
        return self.logs / f"{job_id}.log"

    def append_log(self, job_id: int, text: str) -> None:
        """Add to a job's log where every machine reads it (keeps_logs); the SQLite queue's logs are the files."""

    def log_text(self, job_id: int) -> str | None:
        """A job's log: from the queue where it keeps them, else the file on this machine; None if neither has one."""
        path = self.log_path(job_id)
        return path.read_text(errors="replace") if path.exists() else None

    # ------------------------------------------------------------------ adding and reading
    def enqueue(self, repo_id: str, revision: str, profile: str, out: str | Path, *, needs_gpu: bool = False,
                memory_bytes: int = 0, max_attempts: int = 3, kind: str = "build",
                profile_text: str | None = None) -> Job | None:
        """Add a job; None if this (repo, commit, profile) was ever queued before, whatever became of it."""
        where = str(out) if is_store(out) else str(Path(out).absolute())
        with self._transaction() as db:
            now = self._now(db)
            row = db.execute(
                "INSERT INTO jobs (repo_id, revision, profile, out, needs_gpu, memory_bytes, max_attempts, "
                "kind, profile_text, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (repo_id, revision, profile) DO NOTHING RETURNING id",
                (repo_id, revision, profile, where, int(needs_gpu), memory_bytes, max_attempts, kind, profile_text, now,
                 now)).fetchone()
            return self._get(db, row["id"]) if row else None

    def last_done(self, repo_id: str, profile: str) -> Job | None:
        """The newest finished job of this repo and profile: the build a new revision may only need retemplating."""
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE repo_id = ? AND profile = ? AND state = 'done' "
                             "ORDER BY updated DESC, id DESC LIMIT 1", (repo_id, profile)).fetchone()
            return _job(row) if row else None

    def get(self, job_id: int) -> Job:
        with self._read() as db:
            return self._get(db, job_id)

    def list(self, state: str | None = None) -> list[Job]:
        if state and state not in STATES:
            raise QuantkitError(f"unknown job state {state!r}", f"use one of: {', '.join(STATES)}")
        with self._read() as db:
            rows = db.execute("SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY id",
                              (state,) if state else ()).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
            return {r["state"]: r["n"] for r in rows}

    @staticmethod
    def _get(db, job_id: int) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise QuantkitError(f"no job #{job_id}", "see `quantkit jobs list`")
        return _job(row)

    # ------------------------------------------------------------------ workers
    def claim(self, worker: str, lease_s: float, *, gpu: bool = False, memory_bytes: int | None = None) -> Job | None:
        """Take the oldest job this worker can run (GPU jobs only with a GPU; within `memory_bytes`)."""
        with self._transaction() as db:
            now = self._now(db)
            self._expire(db, now)
            row = db.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND (needs_gpu = 0 OR ?) AND (CAST(? AS BIGINT) IS NULL OR memory_bytes <= ?) "
                "AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT 1" + self._claim_lock,
                (bool(gpu), memory_bytes, memory_bytes, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', worker = ?, lease_until = ?, attempts = attempts + 1, "
                       "exit_code = NULL, updated = ? WHERE id = ?", (worker, now + lease_s, now, row["id"]))
            return self._get(db, row["id"])

    def _expire(self, db, now: float) -> None:
        """Jobs whose worker stopped renewing: back to the queue, or failed after their last attempt."""
        db.execute("UPDATE jobs SET state = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END, "
                   "error = 'worker ' || worker || ' stopped renewing its lease (crashed or killed)', "
                   "fix = 'see the end of its log (quantkit jobs show) and that machine''s memory and logs', "
                   "worker = NULL, lease_until = NULL, updated = ? "
                   "WHERE state = 'running' AND lease_until < ?", (now, now))

    def renew(self, job_id: int, worker: str, lease_s: float) -> bool:
        """Extend a lease; False if the job is no longer this worker's (cancelled, or taken after expiry)."""
        with self._transaction() as db:
            now = self._now(db)
            cur = db.execute("UPDATE jobs SET lease_until = ?, updated = ? WHERE id = ? AND worker = ? AND state = 'running'",
                             (now + lease_s, now, job_id, worker))
            return cur.rowcount == 1

    def finish(self, job_id: int, worker: str, exit_code: int, error: str | None = None, *,
               retry_in: float | None = None, fix: str | None = None) -> str | None:
        """Record how a claimed job ended and return its new state; None if it was no longer this worker's.
        `retry_in`: a failure worth another attempt (the network failed) queues the job again, to be taken no
        sooner than that many seconds from now, unless it has had all its attempts."""
        retry = exit_code != 0 and retry_in is not None
        with self._transaction() as db:
            now = self._now(db)
            cur = db.execute(
                "UPDATE jobs SET state = CASE WHEN ? = 0 THEN 'done' WHEN ? AND attempts < max_attempts THEN 'queued' "
                "ELSE 'failed' END, exit_code = ?, error = ?, fix = ?, not_before = ?, worker = NULL, lease_until = NULL, "
                "updated = ? WHERE id = ? AND worker = ? AND state = 'running'",
                (exit_code, retry, exit_code, error, fix, now + retry_in if retry else None, now, job_id, worker))
            return self._get(db, job_id).state if cur.rowcount == 1 else None

    def pending(self) -> int:
        """Jobs that are queued or running (a running one may come back if its worker died)."""
        with self._read() as db:
            return db.execute("SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running')").fetchone()["n"]

    # ------------------------------------------------------------------ people
    def retry(self, job_id: int) -> Job:
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job.state not in ("failed", "cancelled"):
                raise QuantkitError(f"job #{job_id} is {job.state}; only failed or cancelled jobs can be retried",
                                    "see `quantkit jobs show`" if job.state != "done" else
                                    "it is done; delete its build folder and retry it to build it again")
            db.execute("UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, fix = NULL, exit_code = NULL, not_before = NULL, "
                       "updated = ? WHERE id = ?", (self._now(db), job_id))
            return self._get(db, job_id)

    def cancel(self, job_id: int) -> Job:
        """A queued job is never taken; a running one is stopped by its worker at the next lease renewal."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job.state not in ("queued", "running"):
                raise QuantkitError(f"job #{job_id} is already {job.state}", "nothing to cancel")
            db.execute("UPDATE jobs SET state = 'cancelled', worker = NULL, lease_until = NULL, updated = ? WHERE id = ?",
                       (self._now(db), job_id))
            return self._get(db, job_id)


def _job(row) -> Job:
    values = {f.name: row[f.name] for f in fields(Job)}
    values["needs_gpu"] = bool(values["needs_gpu"])
    return Job(**values)
