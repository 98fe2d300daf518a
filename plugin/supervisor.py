# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""Keeps one worker process alive, from a thread inside Orthanc.

The worker is started with an explicit interpreter (inside Orthanc,
``sys.executable`` is Orthanc itself), its output goes to the worker log, and
it is restarted with exponential backoff if it dies. A job the dead worker
held goes back to the queue when its lease expires (see ``jobs.py``).
Standard library only.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from settings import Settings

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"
AUTH_ENV = "TOMOSCRIBE_ORTHANC_AUTHORIZATION"


class Supervisor:
    """Start, watch and stop the worker process.

    Args:
        settings: The plugin settings.
        authorization: Value of the ``Authorization`` header the worker sends to
            Orthanc (passed through the environment, never on the command line).
        log: Logging function (``orthanc.LogWarning`` inside Orthanc).
        backoff_s: First restart delay; doubles per quick death, capped at ``max_backoff_s``.
        max_backoff_s: Longest restart delay.
    """

    def __init__(self, settings: Settings, authorization: str, log: Callable[[str], None],
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        self.settings = settings
        self.authorization = authorization
        self.log = log
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self.last_exit: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- public ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the supervising thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tomoscribe-supervisor",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after ``timeout_s``) and the thread."""
        self._stop.set()
        self._terminate(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    @property
    def worker_pid(self) -> int | None:
        """Pid of the running worker, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def command(self) -> list[str]:
        """The worker's command line."""
        return [self.settings.python, str(WORKER_SCRIPT), "--settings", self.settings.to_json()]

    # -- internals -------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        s = self.settings
        s.storage_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(s.extra_env)
        env[AUTH_ENV] = self.authorization
        env["PYTHONUNBUFFERED"] = "1"
        # The worker is its own session: a terminal's Ctrl-C to Orthanc does not hit it
        # mid-job; it still dies with Orthanc (parent-death signal set in worker.py).
        with open(s.worker_log, "ab") as log_file:
            proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, env=env, close_fds=True,
                                    cwd=str(s.storage_dir), start_new_session=True)
        self.log(f"tomoscribe: worker started (pid {proc.pid}, log {s.worker_log})")
        return proc

    def _run(self) -> None:
        delay = self.backoff_s
        while not self._stop.is_set():
            if not os.path.exists(self.settings.python):
                self.log(f"tomoscribe: worker interpreter {self.settings.python} not found;"
                         " set Tomoscribe.Python; retrying in 60 s")
                self._stop.wait(60.0)
                continue
            started = time.monotonic()
            try:
                with self._lock:
                    if self._stop.is_set():
                        break
                    self._proc = self._spawn()
            except OSError as exc:
                self.log(f"tomoscribe: cannot start the worker: {exc}")
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            proc = self._proc
            while not self._stop.is_set() and proc.poll() is None:
                self._stop.wait(0.5)
            if self._stop.is_set():
                break
            self.last_exit = proc.returncode
            self.restarts += 1
            if time.monotonic() - started > 60.0:
                delay = self.backoff_s  # it ran a while: not a crash loop
            self.log(f"tomoscribe: worker exited with status {proc.returncode};"
                     f" restarting in {delay:.0f} s (restart #{self.restarts})")
            self._stop.wait(delay)
            delay = min(delay * 2, self.max_backoff_s)

    def _terminate(self, timeout_s: float) -> None:
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.log("tomoscribe: worker did not stop in time; killing it")
            proc.kill()
            proc.wait(timeout=5.0)
