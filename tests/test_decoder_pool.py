"""The decoding pool: kept between series, shared-memory answers, failures, clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import UID, JPEG2000Lossless, RLELossless
from test_dicomio_parallel import _children  # the worker processes of this process

from tomoscribe.dicomio import decoder, load, load_series, scan_folder
from tomoscribe.dicomio.decoder import DecoderPool, DecodeWorkerError, shared_pool
from tomoscribe.dicomio.load import WORKERS_ENV
from tomoscribe.dicomio.scan import SeriesInfo
from tomoscribe.dicomio.synth import expected_stored, write_series

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="needs Linux /proc to see child processes"
)


@pytest.fixture(autouse=True)
def _no_pool_left() -> object:
    """Each test starts without the process-wide pool and ends every worker it started."""
    decoder._close_shared()
    before = _children()
    yield
    decoder._close_shared()
    assert not (_children() - before), "decoding workers left running"


@pytest.fixture
def default_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small series go to the process-wide pool of one worker (this thread decodes too)."""
    monkeypatch.setenv(WORKERS_ENV, "2")
    monkeypatch.setattr(load, "PROCESS_MIN_PIXELS", 0)


def _series(
    folder: Path, n: int = 12, size: int = 64, syntax: UID = JPEG2000Lossless
) -> tuple[SeriesInfo, list[Path]]:
    paths = write_series(folder, n=n, rows=size, columns=size, syntax=syntax)
    (series,) = scan_folder(folder).series
    return series, paths


def _check(voxels: np.ndarray, size: int) -> None:
    for k in range(voxels.shape[0]):
        np.testing.assert_array_equal(voxels[k], expected_stored(k, size, size) - 1024.0)


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.01)
    return False


def test_default_pool_is_kept_for_the_next_series(tmp_path: Path, default_pool: None) -> None:
    series, _ = _series(tmp_path)
    before = _children()
    first = load_series(series)
    workers = _children() - before
    assert len(workers) == 1 and first.notes == []
    second = load_series(series)
    assert _children() - before == workers  # the same worker, not a new one
    _check(first.voxels, 64)
    np.testing.assert_array_equal(first.voxels, second.voxels)
    decoder._close_shared()
    assert not (_children() - before)


def test_explicit_worker_count_gets_its_own_pool(tmp_path: Path) -> None:
    series, _ = _series(tmp_path)
    before = _children()
    vol = load_series(series, workers=2)
    assert vol.notes == []
    assert not (_children() - before)  # started for this series, ended after it
    _check(vol.voxels, 64)


def test_worker_killed_between_series_is_replaced(tmp_path: Path, default_pool: None) -> None:
    series, _ = _series(tmp_path)
    before = _children()
    load_series(series)
    (pid,) = _children() - before
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)
    # /proc shows the zombie a moment before waitpid() reports it to the parent
    (proc,) = decoder._shared[0].procs
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    vol = load_series(series)  # a new pool, no error
    (new,) = _children() - before
    assert new != pid and vol.notes == []
    _check(vol.voxels, 64)


def test_worker_dying_mid_series_is_one_line_then_pool_restarts(tmp_path: Path) -> None:
    _, paths = _series(tmp_path, n=40)
    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    got: dict[int, np.ndarray] = {}
    killed: list[int] = []

    def place(key: int, arr: np.ndarray) -> None:
        got[key] = arr.copy()
        if threading.current_thread() is not threading.main_thread() and not killed:
            pid = pool.procs[0].pid
            os.kill(pid, signal.SIGKILL)  # the worker that just answered
            killed.append(pid)

    with pytest.raises(DecodeWorkerError) as info, shared_pool(1) as pool:
        pool.run(jobs, place, "a test series")  # the worker alone decodes
    message = str(info.value)
    assert "\n" not in message and "SIGKILL" in message and "a test series" in message
    assert killed and not decoder._shared  # the broken pool was closed and reaped
    assert _wait_gone(killed[0])
    got.clear()
    with shared_pool(1) as pool:  # a fresh one works
        assert pool.procs[0].pid != killed[0]
        pool.run(jobs, place, "a test series")
    assert sorted(got) == list(range(40))


def test_undecodable_file_keeps_the_pool(tmp_path: Path, default_pool: None) -> None:
    series, paths = _series(tmp_path, n=10, size=16, syntax=RLELossless)
    before = _children()
    load_series(series)
    workers = _children() - before
    data = paths[6].read_bytes()
    paths[6].write_bytes(data[:-40])  # cut into the last fragment
    with pytest.raises(Exception, match=paths[6].name) as info:
        load_series(series)
    assert "\n" not in str(info.value)
    paths[6].write_bytes(data)
    vol = load_series(series)  # the same worker goes on
    assert _children() - before == workers
    _check(vol.voxels, 16)


@pytest.mark.parametrize("without", ["room", "memfd"])
def test_arrays_without_a_slot_come_through_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, without: str
) -> None:
    _, paths = _series(tmp_path, n=8)
    if without == "room":
        monkeypatch.setattr(decoder, "SLOT_BYTES", 1024)  # a 64x64 16-bit slice is 8 KiB
    else:  # a system without memfd_create (not Linux)
        monkeypatch.delattr(os, "memfd_create")
    got: dict[int, np.ndarray] = {}
    with DecoderPool(2) as pool:
        assert all((w.buf is None) == (without == "memfd") for w in pool.workers)
        pool.run(
            [(i, str(p)) for i, p in enumerate(paths)],
            lambda k, a: got.__setitem__(k, a.copy()),
            "a test series",
        )
    stored = {i: load._decode_path(p) for i, p in enumerate(paths)}
    assert sorted(got) == sorted(stored)
    for i, arr in got.items():
        np.testing.assert_array_equal(arr, stored[i])


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/bin/false"])
def test_workers_that_cannot_start_fall_back_to_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_pool: None, python: str
) -> None:
    series, _ = _series(tmp_path)
    monkeypatch.setattr(sys, "executable", python)
    vol = load_series(series)
    assert len(vol.notes) == 1 and "decoded in one process" in vol.notes[0]
    assert "\n" not in vol.notes[0]
    _check(vol.voxels, 64)


def test_workers_ignore_interrupt_the_parent_decides(tmp_path: Path, default_pool: None) -> None:
    series, _ = _series(tmp_path)
    before = _children()
    load_series(series)
    (pid,) = _children() - before
    os.kill(pid, signal.SIGINT)  # as Ctrl-C in a terminal sends to the whole group
    time.sleep(0.2)
    assert not _wait_gone(pid, 0.1)
    vol = load_series(series)
    assert _children() - before == {pid}
    _check(vol.voxels, 64)


def test_concurrent_series_each_get_workers(tmp_path: Path, default_pool: None) -> None:
    a, _ = _series(tmp_path / "a", n=30)
    b, _ = _series(tmp_path / "b", n=30)
    vols: dict[str, np.ndarray] = {}

    def go(name: str, series: SeriesInfo) -> None:
        vols[name] = load_series(series).voxels

    threads = [threading.Thread(target=go, args=x) for x in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check(vols["a"], 64)
    _check(vols["b"], 64)
    assert len(decoder._shared) == 1 and decoder._shared[0].alive()


def test_unused_pool_is_closed_after_the_idle_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoder, "IDLE_SECONDS", 0.5)
    with shared_pool(1) as pool:
        pool.ping()
        (proc,) = pool.procs
    with shared_pool(1) as again:  # used again within the idle time: the same pool
        assert again is pool
    time.sleep(0.3)
    assert decoder._shared and proc.poll() is None  # the second use restarted the clock
    deadline = time.monotonic() + 10
    while decoder._shared and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not decoder._shared, "the idle pool was kept"
    assert proc.wait(timeout=10) is not None  # ended and reaped


def test_pool_is_closed_at_interpreter_exit(tmp_path: Path) -> None:
    _series(tmp_path)
    code = (
        "import os, sys\n"
        "from tomoscribe.dicomio import decoder, load, load_series, scan_folder\n"
        "load.PROCESS_MIN_PIXELS = 0\n"
        "(s,) = scan_folder(sys.argv[1]).series\n"
        "v = load_series(s)\n"
        "assert v.notes == [], v.notes\n"
        "print(' '.join(str(p.pid) for p in decoder._shared[0].procs))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, WORKERS_ENV: "2"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 1
    for pid in pids:  # ended and reaped by the exiting interpreter, not left to linger
        assert not Path(f"/proc/{pid}").exists()


def test_forked_child_leaves_the_parents_pool_alone(tmp_path: Path, default_pool: None) -> None:
    series, _ = _series(tmp_path)
    before = _children()
    load_series(series)
    workers = _children() - before
    pid = os.fork()
    if pid == 0:  # the child: its own pool, the parent's untouched
        code = 1
        try:
            if not decoder._shared:
                vol = load_series(series)
                _check(vol.voxels, 64)
                decoder._close_shared()
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert decoder._shared and decoder._shared[0].alive()
    vol = load_series(series)  # the parent's worker still answers
    assert _children() - before == workers
    _check(vol.voxels, 64)
