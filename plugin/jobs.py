# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""Durable job store: one SQLite table (WAL) with leases.

A job is keyed by ``(StudyInstanceUID, model version)``. The plugin (inside
Orthanc) only ever calls :meth:`JobStore.enqueue`; worker processes call
:meth:`JobStore.claim`, :meth:`JobStore.heartbeat`, :meth:`JobStore.complete`,
:meth:`JobStore.fail` and :meth:`JobStore.skip`. Every state change is one
short ``BEGIN IMMEDIATE`` transaction, so the store is safe to share between
Orthanc's threads and any number of worker processes on the same machine.

States::

    queued --claim--> running --complete--> done
                         |  \\--fail------> failed
                         |  \\--skip------> skipped  (the model does not read this study)
                         \\--lease expired--> queued   (or failed after max attempts)

    done | failed | skipped --enqueue(force)--> queued   (a rerun asked by a user)

``done``, ``failed`` and ``skipped`` are final: only a forced enqueue leaves them.
A database made before the ``skipped`` state is rebuilt on open (see
:meth:`JobStore._migrate`).

Standard library only: this module is imported inside Orthanc's process.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("queued", "running", "done", "failed", "skipped")
#: States a job stays in until a user forces a rerun.
FINAL_STATES = ("done", "failed", "skipped")

_COLUMNS = ("id", "study_uid", "orthanc_study_id", "model_version", "state", "attempts",
            "force", "worker_id", "lease_until", "created", "updated", "outputs", "reason")

_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid        TEXT    NOT NULL,
    orthanc_study_id TEXT    NOT NULL,
    model_version    TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('queued','running','done','failed',
                                                       'skipped')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    force            INTEGER NOT NULL DEFAULT 0,
    worker_id        TEXT,
    lease_until      REAL,
    created          REAL    NOT NULL,
    updated          REAL    NOT NULL,
    outputs          TEXT    NOT NULL DEFAULT '[]',
    reason           TEXT,
    UNIQUE (study_uid, model_version)
)"""
_INDEX = "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id)"
_SCHEMA = f"{_TABLE.format(name='jobs')};\n{_INDEX};\n"


@dataclass(frozen=True)
class Job:
    """One row of the job table.

    Attributes:
        id: Row id, stable for the life of the job (a forced rerun keeps it).
        study_uid: StudyInstanceUID of the study to report on.
        orthanc_study_id: Orthanc's identifier of that study (REST paths).
        model_version: Model version the report is made with (part of the key).
        state: One of ``queued``, ``running``, ``done``, ``failed``, ``skipped``
            (the model declined the study: not an error, see :meth:`JobStore.skip`).
        attempts: How many times a worker claimed this job since it was (re)queued.
        force: True for a rerun asked by a user: the worker replaces previous outputs.
        worker_id: The worker holding (or last holding) the lease.
        lease_until: Unix time the lease expires (running jobs only).
        created: Unix time of the first enqueue.
        updated: Unix time of the last state change or heartbeat.
        outputs: Orthanc instance ids of the stored outputs (done jobs; kept
            from the previous run while a forced rerun is pending).
        reason: One-line reason: why it failed (failed jobs), or why the model
            does not read the study (skipped jobs).
    """

    id: int
    study_uid: str
    orthanc_study_id: str
    model_version: str
    state: str
    attempts: int
    force: bool
    worker_id: str | None
    lease_until: float | None
    created: float
    updated: float
    outputs: list[str] = field(default_factory=list)
    reason: str | None = None

    def to_json(self) -> dict[str, object]:
        """Return the job as a JSON-ready dict (for the REST routes)."""
        return {
            "id": self.id,
            "study_uid": self.study_uid,
            "orthanc_study_id": self.orthanc_study_id,
            "model_version": self.model_version,
            "state": self.state,
            "attempts": self.attempts,
            "force": self.force,
            "worker_id": self.worker_id,
            "lease_until": self.lease_until,
            "created": self.created,
            "updated": self.updated,
            "outputs": list(self.outputs),
            "reason": self.reason,
        }


def one_line(text: str, limit: int = 500) -> str:
    """Collapse ``text`` to a single line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=int(row["id"]),
        study_uid=row["study_uid"],
        orthanc_study_id=row["orthanc_study_id"],
        model_version=row["model_version"],
        state=row["state"],
        attempts=int(row["attempts"]),
        force=bool(row["force"]),
        worker_id=row["worker_id"],
        lease_until=row["lease_until"],
        created=float(row["created"]),
        updated=float(row["updated"]),
        outputs=list(json.loads(row["outputs"] or "[]")),
        reason=row["reason"],
    )


class JobStore:
    """The SQLite job table.

    One connection per call: connections are cheap, and this keeps the store
    usable from Orthanc's callback thread, the REST threads and the supervisor
    thread at once without sharing a connection between threads.

    Args:
        path: The database file (created with its folder if missing).
        max_attempts: A job whose worker died this many times is marked failed
            instead of being queued again.
        busy_timeout_ms: How long a writer waits for another writer's lock.
    """

    def __init__(self, path: Path | str, max_attempts: int = 3, busy_timeout_ms: int = 10000):
        self.path = Path(path)
        self.max_attempts = int(max_attempts)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect()
        try:
            con.execute("PRAGMA journal_mode=WAL")  # persistent: set once per database
            con.executescript(_SCHEMA)
        finally:
            con.close()
        self._migrate()

    def _migrate(self) -> None:
        """Rebuild a ``jobs`` table made by an older version (its CHECK lacks a state).

        SQLite cannot alter a CHECK constraint, so the table is rebuilt in one
        transaction: new table, rows copied with their ids, old table dropped,
        new one renamed, index recreated. The AUTOINCREMENT sequence goes on
        from where it was, so new ids continue after the old ones.
        """
        with self._tx(immediate=True) as con:  # checked inside: another process may migrate
            row = con.execute(
                "SELECT sql FROM sqlite_master WHERE type='table' AND name='jobs'").fetchone()
            if all(f"'{state}'" in row["sql"] for state in STATES):
                return
            seq = con.execute("SELECT seq FROM sqlite_sequence WHERE name='jobs'").fetchone()
            columns = ", ".join(_COLUMNS)
            con.execute(_TABLE.format(name="jobs_new"))
            con.execute(f"INSERT INTO jobs_new ({columns}) SELECT {columns} FROM jobs")
            con.execute("DROP TABLE jobs")  # drops its index and its sqlite_sequence row
            con.execute("ALTER TABLE jobs_new RENAME TO jobs")
            con.execute(_INDEX)
            max_id = con.execute("SELECT MAX(id) AS n FROM jobs").fetchone()["n"]
            last = max(int(seq["seq"]) if seq is not None else 0, int(max_id or 0))
            con.execute("DELETE FROM sqlite_sequence WHERE name='jobs'")
            if last:
                con.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)",
                            (last,))

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(str(self.path), timeout=self.busy_timeout_ms / 1000.0,
                              isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """Yield a connection inside one transaction; commit on success."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    # -- producer side ---------------------------------------------------------------

    def enqueue(self, study_uid: str, orthanc_study_id: str, model_version: str,
                force: bool = False) -> tuple[Job, bool]:
        """Queue a job for a study, idempotently.

        Without ``force``, an existing job for the same key (in any state) is
        left as it is: a done, failed or skipped job is not re-run, a queued or
        running one is not duplicated. With ``force``, a done, failed or skipped
        job is queued again (attempts reset, previous outputs kept so the worker
        can replace them); a queued or running job is left alone.

        Args:
            study_uid: StudyInstanceUID.
            orthanc_study_id: Orthanc's id of the study (updated on every call).
            model_version: Model version (second half of the key).
            force: Re-run a finished job.

        Returns:
            The job as stored now, and whether this call (re)queued it.
        """
        now = time.time()
        with self._tx(immediate=True) as con:
            row = con.execute("SELECT * FROM jobs WHERE study_uid=? AND model_version=?",
                              (study_uid, model_version)).fetchone()
            if row is None:
                cur = con.execute(
                    "INSERT INTO jobs (study_uid, orthanc_study_id, model_version, state,"
                    " force, created, updated) VALUES (?,?,?,'queued',?,?,?)",
                    (study_uid, orthanc_study_id, model_version, int(force), now, now))
                job_id = int(cur.lastrowid or 0)
                changed = True
            else:
                job_id = int(row["id"])
                changed = force and row["state"] in FINAL_STATES
                if changed:
                    con.execute(
                        "UPDATE jobs SET state='queued', attempts=0, force=1, worker_id=NULL,"
                        " lease_until=NULL, reason=NULL, orthanc_study_id=?, updated=?"
                        " WHERE id=?", (orthanc_study_id, now, job_id))
            job = _row_to_job(con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())
        return job, changed

    # -- worker side -----------------------------------------------------------------

    def claim(self, worker_id: str, lease_s: float) -> Job | None:
        """Atomically take the oldest queued job and lease it to ``worker_id``.

        Running jobs whose lease expired are first put back in the queue (or
        marked failed once they used ``max_attempts``). Each claim counts one
        attempt.

        Args:
            worker_id: Identifies the claiming worker (host:pid).
            lease_s: Lease length in seconds; renew it with :meth:`heartbeat`.

        Returns:
            The claimed job (state ``running``), or None if the queue is empty.
        """
        now = time.time()
        with self._tx(immediate=True) as con:
            self._expire(con, now)
            row = con.execute(
                "SELECT id FROM jobs WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            con.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, worker_id=?,"
                " lease_until=?, updated=? WHERE id=?",
                (worker_id, now + lease_s, now, int(row["id"])))
            return _row_to_job(
                con.execute("SELECT * FROM jobs WHERE id=?", (int(row["id"]),)).fetchone())

    def _expire(self, con: sqlite3.Connection, now: float) -> None:
        con.execute(
            "UPDATE jobs SET state='failed', lease_until=NULL, updated=?,"
            " reason='the worker stopped (crashed or was killed) ' || attempts ||"
            " ' times while running this job'"
            " WHERE state='running' AND lease_until < ? AND attempts >= ?",
            (now, now, self.max_attempts))
        con.execute(
            "UPDATE jobs SET state='queued', lease_until=NULL, updated=?"
            " WHERE state='running' AND lease_until < ?", (now, now))

    def expire_leases(self) -> None:
        """Requeue (or fail) running jobs whose lease expired, without claiming."""
        with self._tx(immediate=True) as con:
            self._expire(con, time.time())

    def heartbeat(self, job_id: int, worker_id: str, lease_s: float) -> bool:
        """Extend the lease of a running job held by ``worker_id``.

        Returns:
            False if the job is no longer this worker's (lease lost): the worker
            should then not store anything.
        """
        now = time.time()
        with self._tx(immediate=True) as con:
            cur = con.execute(
                "UPDATE jobs SET lease_until=?, updated=? WHERE id=? AND state='running'"
                " AND worker_id=?", (now + lease_s, now, job_id, worker_id))
            return cur.rowcount == 1

    def release(self, job_id: int, worker_id: str) -> bool:
        """Give a running job back to the queue without counting the attempt (clean stop)."""
        now = time.time()
        with self._tx(immediate=True) as con:
            cur = con.execute(
                "UPDATE jobs SET state='queued', attempts=MAX(attempts-1, 0), lease_until=NULL,"
                " updated=? WHERE id=? AND state='running' AND worker_id=?",
                (now, job_id, worker_id))
            return cur.rowcount == 1

    def holds(self, job_id: int, worker_id: str) -> bool:
        """True if ``worker_id`` still holds a running lease on the job."""
        with self._tx() as con:
            row = con.execute("SELECT state, worker_id FROM jobs WHERE id=?",
                              (job_id,)).fetchone()
        return row is not None and row["state"] == "running" and row["worker_id"] == worker_id

    def complete(self, job_id: int, outputs: Sequence[str], worker_id: str | None = None) -> bool:
        """Mark a running job done with the Orthanc ids of its outputs.

        Args:
            job_id: The job.
            outputs: Orthanc instance ids of the stored SR / SEG.
            worker_id: If given, only complete if this worker still holds the job.

        Returns:
            True if the job was running (and held by ``worker_id``) and is now done.
        """
        return self._finish(job_id, "done", json.dumps(list(outputs)), None, worker_id)

    def fail(self, job_id: int, reason: str, worker_id: str | None = None) -> bool:
        """Mark a running job failed; ``reason`` is collapsed to one line."""
        return self._finish(job_id, "failed", None, one_line(reason), worker_id)

    def skip(self, job_id: int, reason: str, worker_id: str | None = None) -> bool:
        """Mark a running job skipped: the model does not read this study (not an error).

        Args:
            job_id: The job.
            reason: Why the model declined the study; collapsed to one line.
            worker_id: If given, only skip if this worker still holds the job.

        Returns:
            True if the job was running (and held by ``worker_id``) and is now skipped.
        """
        return self._finish(job_id, "skipped", None, one_line(reason), worker_id)

    def _finish(self, job_id: int, state: str, outputs: str | None, reason: str | None,
                worker_id: str | None) -> bool:
        now = time.time()
        sql = ("UPDATE jobs SET state=?, outputs=COALESCE(?, outputs), reason=?, force=0,"
               " lease_until=NULL, updated=? WHERE id=? AND state='running'")
        args: list[object] = [state, outputs, reason, now, job_id]
        if worker_id is not None:
            sql += " AND worker_id=?"
            args.append(worker_id)
        with self._tx(immediate=True) as con:
            return con.execute(sql, args).rowcount == 1

    # -- reading ---------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        """Return one job by id, or None."""
        with self._tx() as con:
            row = con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else _row_to_job(row)

    def find(self, study_uid: str, model_version: str) -> Job | None:
        """Return the job for a key, or None."""
        with self._tx() as con:
            row = con.execute("SELECT * FROM jobs WHERE study_uid=? AND model_version=?",
                              (study_uid, model_version)).fetchone()
        return None if row is None else _row_to_job(row)

    def list(self, limit: int = 100, state: str | None = None) -> list[Job]:
        """Return the newest jobs first, optionally only those in ``state``."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown job state {state!r}; expected one of {', '.join(STATES)}")
        with self._tx() as con:
            if state is None:
                rows = con.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?",
                                   (int(limit),)).fetchall()
            else:
                rows = con.execute("SELECT * FROM jobs WHERE state=? ORDER BY id DESC LIMIT ?",
                                   (state, int(limit))).fetchall()
        return [_row_to_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (all states present, zero if none)."""
        with self._tx() as con:
            rows = con.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({r["state"]: int(r["n"]) for r in rows})
        return out
