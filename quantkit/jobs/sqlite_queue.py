"""The job queue in one SQLite file: the default, with no server. Its workers share one machine: SQLite's WAL mode
needs every process on one host, and SQLite's authors warn against a network filesystem (a fleet uses PostgreSQL)."""

from __future__ import annotations

import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import QueueError
from .queue import JOB_COLUMNS, JobQueue

# Files made before not_before, kind, profile_text and fix existed get them as they open (SqliteQueue.__init__).
_SCHEMA = f"CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, {JOB_COLUMNS})"


class SqliteQueue(JobQueue):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._transaction() as db:
                db.execute(_SCHEMA)
                columns = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
                if "not_before" not in columns:
                    db.execute("ALTER TABLE jobs ADD COLUMN not_before REAL")  # a queue made before retries waited
                if "kind" not in columns:  # a queue made before metadata-only jobs
                    db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'build'")
                if "profile_text" not in columns:  # a queue made before profiles were kept in it
                    db.execute("ALTER TABLE jobs ADD COLUMN profile_text TEXT")
                if "fix" not in columns:  # a queue made before failures kept their fix
                    db.execute("ALTER TABLE jobs ADD COLUMN fix TEXT")
        except (OSError, sqlite3.Error) as e:
            raise QueueError(f"cannot open the job queue {self.path}: {e}",
                                "pass --queue (or set QUANTKIT_QUEUE) to a file in a folder you can write to") from e
        self.logs = self.path.parent / "logs"

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: a worker holds no lock while it builds.
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock at once, so a claim's read and its update are one step.
        with self._read() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
