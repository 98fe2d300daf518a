"""The SQLite job store (plugin/jobs.py): idempotence, leases, attempts, concurrency."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs import JobStore

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugin"


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "db" / "jobs.sqlite", max_attempts=3)


def test_enqueue_is_idempotent_per_study_and_model_version(store: JobStore) -> None:
    job, created = store.enqueue("1.2.3", "orthanc-a", "v1")
    again, created_again = store.enqueue("1.2.3", "orthanc-a", "v1")
    assert created and not created_again
    assert again.id == job.id and again.state == "queued"
    other, created_other = store.enqueue("1.2.3", "orthanc-a", "v2")  # new model version
    assert created_other and other.id != job.id
    assert store.counts()["queued"] == 2


def test_done_job_is_not_rerun_unless_forced(store: JobStore) -> None:
    job, _ = store.enqueue("1.2.3", "orthanc-a", "v1")
    claimed = store.claim("w1", lease_s=30)
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
    assert store.complete(job.id, ["out-1", "out-2"], "w1")
    same, created = store.enqueue("1.2.3", "orthanc-a", "v1")
    assert not created and same.state == "done" and same.outputs == ["out-1", "out-2"]
    assert store.claim("w1", lease_s=30) is None

    forced, requeued = store.enqueue("1.2.3", "orthanc-a", "v1", force=True)
    assert requeued and forced.state == "queued" and forced.force and forced.attempts == 0
    assert forced.outputs == ["out-1", "out-2"]  # kept so the worker can replace them
    again, requeued_again = store.enqueue("1.2.3", "orthanc-a", "v1", force=True)
    assert not requeued_again and again.state == "queued"  # queued: left alone
    rerun = store.claim("w2", lease_s=30)
    assert rerun is not None and rerun.force
    assert store.complete(rerun.id, ["out-3"], "w2")
    done = store.get(rerun.id)
    assert done is not None and done.outputs == ["out-3"] and not done.force


def test_expired_lease_goes_back_to_the_queue(store: JobStore) -> None:
    job, _ = store.enqueue("1.2.3", "orthanc-a", "v1")
    first = store.claim("w1", lease_s=0.2)
    assert first is not None
    assert store.claim("w2", lease_s=30) is None  # still leased
    time.sleep(0.3)
    second = store.claim("w2", lease_s=30)
    assert second is not None and second.id == job.id
    assert second.attempts == 2 and second.worker_id == "w2"
    # the first worker lost the job: it can neither renew nor finish it
    assert not store.heartbeat(job.id, "w1", 30)
    assert not store.holds(job.id, "w1") and store.holds(job.id, "w2")
    assert not store.complete(job.id, ["x"], "w1")
    assert store.heartbeat(job.id, "w2", 30)
    assert store.complete(job.id, ["y"], "w2")


def test_heartbeat_keeps_the_lease(store: JobStore) -> None:
    store.enqueue("1.2.3", "orthanc-a", "v1")
    job = store.claim("w1", lease_s=0.3)
    assert job is not None
    for _ in range(4):
        time.sleep(0.15)
        assert store.heartbeat(job.id, "w1", 0.3)
    assert store.claim("w2", lease_s=30) is None


def test_max_attempts_then_failed(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite", max_attempts=2)
    job, _ = store.enqueue("1.2.3", "orthanc-a", "v1")
    for worker in ("w1", "w2"):
        assert store.claim(worker, lease_s=0.05) is not None
        time.sleep(0.1)
    assert store.claim("w3", lease_s=30) is None
    failed = store.get(job.id)
    assert failed is not None and failed.state == "failed" and failed.attempts == 2
    assert failed.reason is not None and "2 times" in failed.reason


def test_fail_reason_is_one_line_and_release_does_not_count(store: JobStore) -> None:
    job, _ = store.enqueue("1.2.3", "orthanc-a", "v1")
    assert store.claim("w1", 30) is not None
    assert store.release(job.id, "w1")
    released = store.get(job.id)
    assert released is not None and released.state == "queued" and released.attempts == 0
    assert store.claim("w1", 30) is not None
    assert store.fail(job.id, "no CT series\n  in this study\tat all", "w1")
    failed = store.get(job.id)
    assert failed is not None and failed.reason == "no CT series in this study at all"
    assert store.list(state="failed")[0].id == job.id
    assert store.list(state="done") == []
    with pytest.raises(ValueError, match="unknown job state"):
        store.list(state="bogus")


def test_skipped_is_final_until_forced(store: JobStore) -> None:
    """A study the model declines: skipped with its reason, requeued only by a forced rerun."""
    job, _ = store.enqueue("1.2.3", "orthanc-a", "v1")
    assert store.claim("w1", 30) is not None
    assert not store.skip(job.id, "not mine", "w2")  # only the lease holder may finish it
    assert store.skip(job.id, "the image does not look like CT\n of the chest", "w1")
    skipped = store.get(job.id)
    assert skipped is not None and skipped.state == "skipped"
    assert skipped.reason == "the image does not look like CT of the chest"
    assert [j.id for j in store.list(state="skipped")] == [job.id]
    assert store.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0, "skipped": 1}
    assert not store.skip(job.id, "again", "w1")  # no longer running

    same, requeued = store.enqueue("1.2.3", "orthanc-a", "v1")  # STABLE_STUDY again
    assert not requeued and same.state == "skipped"
    assert store.claim("w1", 30) is None
    forced, requeued = store.enqueue("1.2.3", "orthanc-a", "v1", force=True)  # rerun route
    assert requeued and forced.id == job.id and forced.state == "queued"
    assert forced.force and forced.attempts == 0 and forced.reason is None


# The table as versions before the "skipped" state created it (kept verbatim).
_OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid        TEXT    NOT NULL,
    orthanc_study_id TEXT    NOT NULL,
    model_version    TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('queued','running','done','failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    force            INTEGER NOT NULL DEFAULT 0,
    worker_id        TEXT,
    lease_until      REAL,
    created          REAL    NOT NULL,
    updated          REAL    NOT NULL,
    outputs          TEXT    NOT NULL DEFAULT '[]',
    reason           TEXT,
    UNIQUE (study_uid, model_version)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
"""


def test_old_database_is_migrated_to_the_skipped_state(tmp_path: Path) -> None:
    """A jobs.db made before "skipped" existed: rebuilt on open, rows and ids kept."""
    db = tmp_path / "jobs.sqlite"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(_OLD_SCHEMA)
    rows = [("1.2.1", "o1", "done", '["out-1"]', None),
            ("1.2.2", "o2", "failed", "[]", "no CT series"),
            ("1.2.3", "o3", "queued", "[]", None),
            ("1.2.4", "o4", "queued", "[]", None)]
    for uid, orthanc_id, state, outputs, reason in rows:
        con.execute("INSERT INTO jobs (study_uid, orthanc_study_id, model_version, state,"
                    " created, updated, outputs, reason) VALUES (?,?,'v1',?,1.0,2.0,?,?)",
                    (uid, orthanc_id, state, outputs, reason))
    con.execute("DELETE FROM jobs WHERE id=4")  # the sequence (4) is now past the max id (3)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute("UPDATE jobs SET state='skipped' WHERE id=3")
    con.close()

    store = JobStore(db)
    jobs = {j.id: j for j in store.list()}
    assert sorted(jobs) == [1, 2, 3]
    assert [(jobs[i].study_uid, jobs[i].state) for i in (1, 2, 3)] == [
        ("1.2.1", "done"), ("1.2.2", "failed"), ("1.2.3", "queued")]
    assert jobs[1].outputs == ["out-1"] and jobs[2].reason == "no CT series"
    assert jobs[1].created == 1.0 and jobs[1].updated == 2.0
    new, created = store.enqueue("1.2.5", "o5", "v1")
    assert created and new.id == 5  # after the old sequence, not reusing 4

    claimed = store.claim("w1", 30)
    assert claimed is not None and claimed.id == 3
    assert store.skip(3, "outside the model's scope", "w1")
    assert store.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 1, "skipped": 1}

    con = sqlite3.connect(db)
    try:
        tables = dict(con.execute("SELECT name, sql FROM sqlite_master").fetchall())
    finally:
        con.close()
    assert "'skipped'" in tables["jobs"] and "jobs_state" in tables
    assert "jobs_new" not in tables
    again = JobStore(db)  # opening a migrated database changes nothing
    assert [(j.id, j.state) for j in again.list()] == [
        (5, "queued"), (3, "skipped"), (2, "failed"), (1, "done")]


def test_list_newest_first_with_limit(store: JobStore) -> None:
    ids = [store.enqueue(f"1.2.{i}", f"o{i}", "v1")[0].id for i in range(5)]
    listed = [j.id for j in store.list(limit=3)]
    assert listed == ids[::-1][:3]
    assert store.get(999) is None


_CLAIMER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from jobs import JobStore
store = JobStore(sys.argv[2])
got = []
while True:
    job = store.claim(sys.argv[3], lease_s=60)
    if job is None:
        break
    got.append(job.id)
    store.complete(job.id, [], sys.argv[3])
print(" ".join(map(str, got)))
"""


def test_concurrent_claims_from_two_processes_get_each_job_once(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite"
    store = JobStore(db)
    n = 60
    for i in range(n):
        store.enqueue(f"1.2.{i}", f"o{i}", "v1")
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(PLUGIN_DIR), str(db), w],
                              stdout=subprocess.PIPE, text=True) for w in ("wa", "wb")]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claimed = [[int(x) for x in out.split()] for out in outs]
    everything = claimed[0] + claimed[1]
    assert sorted(everything) == sorted(j.id for j in store.list(limit=n))
    assert len(set(everything)) == n  # nobody got a job twice
    assert store.counts() == {"queued": 0, "running": 0, "done": n, "failed": 0, "skipped": 0}
