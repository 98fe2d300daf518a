# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""The worker process: claim a job, fetch the study, run the app, store the outputs.

A study the model declines to read (:class:`~tomoscribe.errors.OutOfScopeError`
from the app: its series selection or the model's image check) ends the job
``skipped`` with the one-line reason; any other error ends it ``failed``.

Started by the plugin's supervisor as
``<venv python> plugin/worker.py --settings '<json>'`` with the Orthanc
``Authorization`` header value in ``$TOMOSCRIBE_ORTHANC_AUTHORIZATION``. All
heavy work (DICOM decoding, the model) happens here, never in Orthanc.

The job logic is the plain function :func:`run_job`; the SQLite loop in
:func:`main` is one engine that calls it (a Celery task can be another).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import importlib
import importlib.util
import json
import logging
import os
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from events import input_series
from jobs import Job, JobStore, one_line
from settings import Settings, job_models, model_scope

from tomoscribe.errors import OutOfScopeError, OutputError, TomoscribeError

LOG = logging.getLogger("tomoscribe.worker")
AUTH_ENV = "TOMOSCRIBE_ORTHANC_AUTHORIZATION"
STACK_BYTES = 32 * 1024 * 1024  # holoscan wants `ulimit -s 32768`
JobFunction = Callable[..., Any]


class WorkerStopError(Exception):
    """Raised in the main thread by SIGTERM / SIGINT."""


class LeaseLostError(Exception):
    """The job is no longer ours (lease expired and another worker took it)."""


# -- Orthanc REST client ---------------------------------------------------------------


class OrthancError(Exception):
    """An Orthanc REST call failed."""


class OrthancClient:
    """Minimal keep-alive HTTP client for Orthanc's REST API (standard library only).

    Args:
        url: Base URL, e.g. ``http://127.0.0.1:8042``.
        authorization: Value of the ``Authorization`` header, or None.
        timeout_s: Socket timeout.
    """

    def __init__(self, url: str, authorization: str | None, timeout_s: float = 120.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad Orthanc URL {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.authorization = authorization
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (http.client.HTTPSConnection if self.scheme == "https"
                   else http.client.HTTPConnection)
            self._conn = cls(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> bytes:
        """Send one request; return the body of a 2xx answer, else raise OrthancError."""
        headers = {}
        if self.authorization:
            headers["Authorization"] = self.authorization
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):  # one retry on a dropped keep-alive connection
            conn = self._connection()
            try:
                conn.request(method, self.prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                self._conn = None
                if attempt == 2:
                    raise OrthancError(f"{method} {path}: {exc}") from exc
                continue
            if not 200 <= resp.status < 300:
                detail = one_line(data[:200].decode("utf-8", "replace"))
                raise OrthancError(f"{method} {path}: HTTP {resp.status} {detail}")
            return data
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> Any:
        """GET and parse JSON."""
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        """POST JSON, parse the JSON answer."""
        return json.loads(self.request("POST", path, json.dumps(payload).encode(),
                                       "application/json"))

    def close(self) -> None:
        """Close the keep-alive connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- the job function --------------------------------------------------------------------


def load_job_function(spec: str) -> JobFunction:
    """Import ``module.path:function`` or ``/abs/file.py:function``.

    Raises:
        ImportError: The module or the function cannot be found.
    """
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ImportError(f"job function {spec!r} is not of the form 'module:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        mod_spec = importlib.util.spec_from_file_location(f"tomoscribe_job_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ImportError(f"{module_name} has no function {func_name!r}")
    return func


def fetch_study(client: OrthancClient, orthanc_study_id: str, modalities: Sequence[str],
                dest: Path, scope: Any = None) -> list[Path]:
    """Download the input series of a study into ``dest/<series id>/<instance id>.dcm``.

    Only image series of an enabled modality that are not our own output and
    that the model's ``scope`` admits are fetched (the same rule the plugin
    used to enqueue the job).

    Returns:
        The files written.

    Raises:
        OrthancError: The study vanished or a download failed.
    """
    files = []
    for series in input_series(client.get_json(f"/studies/{orthanc_study_id}/series"),
                               modalities, scope):
        folder = dest / str(series["ID"])
        folder.mkdir(parents=True, exist_ok=True)
        for instance_id in series["Instances"]:
            path = folder / f"{instance_id}.dcm"
            path.write_bytes(client.request("GET", f"/instances/{instance_id}/file"))
            files.append(path)
    return files


def store_outputs(client: OrthancClient, orthanc_study_id: str, study_uid: str,
                  outputs: Sequence[Path], replace: Sequence[str] = ()) -> list[str]:
    """Upload output files into Orthanc; return their Orthanc instance ids.

    Each file must belong to the job's study (checked before anything is sent).
    Outputs have deterministic SOP Instance UIDs, so an instance that already
    exists is not sent again (a job that runs twice stores once), unless it
    is in ``replace`` (a forced rerun): those are deleted first.

    Raises:
        OrthancError: An upload failed or Orthanc filed an output under another study.
        ValueError: An output is not DICOM of this study.
    """
    import pydicom  # the worker's venv; never imported inside Orthanc

    checked = []
    for path in outputs:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            raise ValueError(f"output {path.name} does not belong to study {study_uid}")
        checked.append((path, str(ds.SOPInstanceUID)))
    for instance_id in replace:
        with contextlib.suppress(OrthancError):  # already gone is fine
            client.request("DELETE", f"/instances/{instance_id}")
    ids = []
    for path, sop_uid in checked:
        found = client.post_json("/tools/lookup", sop_uid) if not replace else []
        existing = [f["ID"] for f in found if f.get("Type") == "Instance"]
        if existing:
            ids.append(str(existing[0]))
            continue
        answer = json.loads(client.request("POST", "/instances", path.read_bytes(),
                                           "application/dicom"))
        if answer.get("ParentStudy") != orthanc_study_id:
            raise OrthancError(f"Orthanc filed output {path.name} under study"
                               f" {answer.get('ParentStudy')}, not {orthanc_study_id}")
        ids.append(str(answer["ID"]))
    return ids


def run_job(job: Job, settings: Settings, client: OrthancClient, job_function: JobFunction,
            before_store: Callable[[], None] = lambda: None, scope: Any = None) -> list[str]:
    """The whole job for one study; engine-agnostic (SQLite loop here, Celery later).

    Args:
        job: The claimed job.
        settings: Plugin settings (modalities, models, questions, scratch folder).
        client: Orthanc REST client.
        job_function: ``run_app(input_dir, output_dir, model_dir, questions, config_path)``
            returning the output DICOM files, or an object whose ``written`` holds them
            (``operators.app.RunResult``). ``model_dir`` is :func:`settings.job_models`:
            ``None``, one model (a folder or a name), or the list of models.
        before_store: Called just before storing; raises (e.g. :class:`LeaseLostError`) to abort.
        scope: What the models read (:func:`settings.model_scope`: one model's
            ``tomoscribe.scope.ModelScope`` or several models' ``CombinedScope``): only
            series it admits are fetched. ``None``: fetch by Modalities; the app decides.

    Returns:
        Orthanc instance ids of the stored outputs.

    Raises:
        OutOfScopeError: From the job function: no model reads this study.
        TomoscribeError: From the job function, for bad input.
        OrthancError: Talking to Orthanc failed.
    """
    scratch = settings.storage_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"job{job.id}-", dir=scratch) as tmp:
        in_dir, out_dir = Path(tmp) / "input", Path(tmp) / "output"
        in_dir.mkdir()
        out_dir.mkdir()
        files = fetch_study(client, job.orthanc_study_id, settings.modalities, in_dir, scope)
        LOG.info("job %d: fetched %d instances of study %s", job.id, len(files), job.study_uid)
        result = job_function(in_dir, out_dir, model_dir=job_models(settings),
                              questions=list(settings.questions),
                              config_path=settings.app_config)
        # operators.app.run_app returns a RunResult (.written, .explanation, ...);
        # a plain job function may return the list of files.
        files_out: Sequence[Path | str] = getattr(result, "written", result) or ()
        outputs = [Path(p) for p in files_out]
        explanation: Sequence[str] = getattr(result, "explanation", None) or ()
        for line in explanation:
            LOG.info("job %d: %s", job.id, line)
        if not outputs:
            raise OutputError("the application wrote no output")
        before_store()
        return store_outputs(client, job.orthanc_study_id, job.study_uid, outputs,
                             replace=job.outputs if job.force else ())


def failure_reason(exc: BaseException) -> str:
    """One line for the job record: the message of our errors, a summary of others."""
    if isinstance(exc, TomoscribeError):
        return one_line(str(exc))
    if isinstance(exc, OrthancError):
        return one_line(f"Orthanc: {exc}")
    return one_line(f"internal error ({type(exc).__name__}: {exc}); see the worker log")


# -- the SQLite engine -----------------------------------------------------------------


class Heartbeat:
    """Renews a job's lease from a thread; enforces the job time limit.

    If the job runs past ``timeout_s`` the job is marked failed and the whole
    process exits (a stuck model cannot be interrupted from Python); the
    supervisor starts a fresh worker.
    """

    def __init__(self, store: JobStore, job: Job, worker_id: str, lease_s: float,
                 timeout_s: float):
        self.store, self.job, self.worker_id = store, job, worker_id
        self.lease_s, self.timeout_s = lease_s, timeout_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(max(self.lease_s / 3.0, 0.2)):
            if time.monotonic() - started > self.timeout_s:
                self.store.fail(self.job.id, f"timed out after {self.timeout_s:.0f} s",
                                self.worker_id)
                LOG.error("job %d timed out; exiting so a fresh worker starts", self.job.id)
                os._exit(75)
            try:
                if not self.store.heartbeat(self.job.id, self.worker_id, self.lease_s):
                    self.lost = True
            except Exception as exc:  # a locked DB for a while: try again next beat
                LOG.warning("heartbeat failed: %s", exc)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the worker still holds the job."""
        if self.lost or not self.store.holds(self.job.id, self.worker_id):
            raise LeaseLostError(f"job {self.job.id} was taken over by another worker")


def process_one(store: JobStore, settings: Settings, client: OrthancClient,
                job_function: JobFunction, worker_id: str, scope: Any = None) -> bool:
    """Claim and run at most one job (``scope``: see :func:`run_job`). True if one was claimed.

    The job ends ``done``; ``skipped`` if the model declines the study
    (:class:`~tomoscribe.errors.OutOfScopeError`, logged at INFO); else ``failed``.
    """
    job = store.claim(worker_id, settings.lease_s)
    if job is None:
        return False
    LOG.info("job %d: claimed (study %s, attempt %d)", job.id, job.study_uid, job.attempts)
    t0 = time.monotonic()
    with Heartbeat(store, job, worker_id, settings.lease_s, settings.job_timeout_s) as beat:
        try:
            ids = run_job(job, settings, client, job_function, before_store=beat.check,
                          scope=scope)
        except LeaseLostError as exc:
            LOG.warning("%s; outputs not stored", exc)
            return True
        except WorkerStopError:
            store.release(job.id, worker_id)
            LOG.info("job %d: released back to the queue", job.id)
            raise
        except OutOfScopeError as exc:  # the model does not read this study: not a failure
            LOG.info("job %d: skipped: %s", job.id, one_line(str(exc)))
            store.skip(job.id, str(exc), worker_id)
            return True
        except Exception as exc:
            LOG.error("job %d failed:\n%s", job.id, traceback.format_exc())
            store.fail(job.id, failure_reason(exc), worker_id)
            return True
    if store.complete(job.id, ids, worker_id):
        LOG.info("job %d: done in %.1f s, outputs %s", job.id, time.monotonic() - t0, ids)
    else:
        LOG.warning("job %d: finished but no longer held by this worker", job.id)
    return True


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM us when the supervisor thread's process dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _cuda_runtime_dirs() -> list[str]:
    """Folders of the ``nvidia-cuda-runtime`` wheel's ``libcudart.so.*`` (holoscan needs it)."""
    import glob
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    found = glob.glob(os.path.join(purelib, "nvidia", "*", "lib", "libcudart.so.*"))
    return sorted({os.path.dirname(p) for p in found})


def _reexec_for_holoscan() -> None:
    """Re-exec once with what holoscan needs before the process starts.

    A 32 MiB stack limit (``ulimit -s 32768``) and ``LD_LIBRARY_PATH`` with the
    CUDA runtime wheel's folder: both are read only when a process starts.
    """
    if os.environ.get("TOMOSCRIBE_WORKER_REEXEC"):
        return
    os.environ["TOMOSCRIBE_WORKER_REEXEC"] = "1"
    changed = False
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < STACK_BYTES:
        new = STACK_BYTES if hard == resource.RLIM_INFINITY else min(STACK_BYTES, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_STACK, (new, hard))
            changed = True
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    missing = [d for d in _cuda_runtime_dirs() if d not in paths]
    if missing:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*missing, *filter(None, paths)])
        changed = True
    if changed:
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker loop until SIGTERM."""
    parser = argparse.ArgumentParser(description="tomoscribe worker (started by the plugin)")
    parser.add_argument("--settings", required=True, help="settings JSON from the plugin")
    parser.add_argument("--once", action="store_true", help="process at most one job and exit")
    args = parser.parse_args(argv)
    settings = Settings.from_json(args.settings)

    _reexec_for_holoscan()
    _die_with_parent()
    parent = os.getppid()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    if settings.memory_limit_mb > 0:
        limit = settings.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def on_signal(signum: int, frame: object) -> None:
        # Raise once, then ignore. A stop often brings two signals close together
        # (the supervisor's SIGTERM, then the parent-death SIGTERM when Orthanc
        # exits): a second one landing in the clean-up would end the worker with
        # a traceback instead of a clean stop. (The supervisor SIGKILLs a worker
        # that does not finish stopping in time.)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise WorkerStopError(signal.Signals(signum).name)

    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    store = JobStore(settings.db_path, max_attempts=settings.max_attempts)
    client = OrthancClient(settings.orthanc_url, os.environ.get(AUTH_ENV))
    try:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        job_function = load_job_function(settings.job_function)
        scope, why = model_scope(settings)  # read once: the model is loaded once per worker too
        if scope is None:
            LOG.warning("cannot read the model's scope (%s); fetching by Modalities", why)
        LOG.info("worker %s ready (job function %s)", worker_id, settings.job_function)
        while True:
            if os.getppid() != parent:
                LOG.warning("Orthanc went away; exiting")
                return 0
            if not process_one(store, settings, client, job_function, worker_id, scope):
                if args.once:
                    return 0
                time.sleep(settings.poll_s)
            elif args.once:
                return 0
    except WorkerStopError as stop:
        LOG.info("worker %s stopping (%s)", worker_id, stop)
        return 0
    except ImportError as exc:
        LOG.error("cannot load the job function %s: %s", settings.job_function, exc)
        return 3
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
