"""Compressed series decoded in worker processes: same volume, clear failures."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from tomoscribe.dicomio import load_series, scan_folder
from tomoscribe.dicomio.decoder import DecodeWorkerError
from tomoscribe.dicomio.load import WORKERS_ENV, default_processes
from tomoscribe.dicomio.synth import expected_stored, write_series


@pytest.mark.parametrize(("syntax", "size"), [(RLELossless, 16), (JPEG2000Lossless, 64)])
def test_processes_match_serial(tmp_path: Path, syntax: str, size: int) -> None:
    write_series(tmp_path, n=12, rows=size, columns=size, syntax=syntax)
    (series,) = scan_folder(tmp_path).series
    serial = load_series(series, workers=1)
    parallel = load_series(series, workers=2)
    assert parallel.notes == []  # decoded by the pool, no fallback note
    np.testing.assert_array_equal(serial.voxels, parallel.voxels)
    assert serial.slices == parallel.slices
    for k in range(12):
        np.testing.assert_array_equal(parallel.voxels[k], expected_stored(k, size, size) - 1024.0)


def test_undecodable_file_in_a_worker_is_one_line(tmp_path: Path) -> None:
    paths = write_series(tmp_path, n=6, rows=16, columns=16, syntax=RLELossless)
    data = bytearray(paths[3].read_bytes())
    paths[3].write_bytes(bytes(data[:-40]))  # cut into the last fragment
    (series,) = scan_folder(tmp_path).series
    with pytest.raises(Exception, match=paths[3].name) as info:
        load_series(series, workers=2)
    assert "\n" not in str(info.value)


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in (task / "children").read_text().split()}
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_dead_worker_is_a_one_line_error_not_a_hang(tmp_path: Path) -> None:
    write_series(tmp_path, n=40, rows=64, columns=64, syntax=JPEG2000Lossless)
    (series,) = scan_folder(tmp_path).series
    before = _children()
    killed: list[int] = []

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            new = _children() - before
            for pid in new:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.001)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    started = time.monotonic()
    with pytest.raises(DecodeWorkerError) as info:
        load_series(series, workers=2)
    killer.join()
    assert killed
    assert time.monotonic() - started < 60
    message = str(info.value)
    assert "\n" not in message
    assert "SIGKILL" in message and WORKERS_ENV in message
    assert not (_children() - before)  # every worker reaped


def test_worker_count_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert default_processes() == 3
    monkeypatch.setenv(WORKERS_ENV, "not a number")
    assert default_processes() >= 1
    monkeypatch.delenv(WORKERS_ENV)
    assert 1 <= default_processes() <= len(os.sched_getaffinity(0))
