# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""Entry script loaded by Orthanc's python plugin (``"PythonScript"``).

What it does, and nothing more:

* ``STABLE_STUDY``: read the study's series (cheap JSON through
  ``orthanc.RestApiGet``), decide whether it qualifies (a CT / MR image
  series that is not our own SR / SEG), enqueue a durable job keyed by
  (StudyInstanceUID, model version) and return. Enqueue is idempotent, so
  the second ``STABLE_STUDY`` fired by our own outputs landing is a no-op.
* ``ORTHANC_STARTED`` / ``ORTHANC_STOPPED``: start / stop the worker supervisor.
* REST routes under ``/tomoscribe/`` (see ``routes.py``), and the OHIF viewer
  under ``/ohif/`` (see ``ohif.py``).

It imports only the standard library and the small modules next to it; the
worker process does all heavy work. Orthanc runs every change callback on one
thread: nothing here may block for long.
"""

from __future__ import annotations

import base64
import json
import site
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orthanc

PLUGIN_DIR = Path(__file__).resolve().parent
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from settings import Settings, load_settings  # noqa: E402


def _add_venv(python: str) -> None:
    """Put the venv's site-packages (with its .pth files) in front of Debian's.

    ``python`` is the venv's interpreter (``<venv>/bin/python``, a symlink: not resolved).
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = Path(python).parent.parent / "lib" / version / "site-packages"
    if not site_packages.is_dir():
        orthanc.LogWarning(f"tomoscribe: no site-packages at {site_packages}")
        return
    before = list(sys.path)
    site.addsitedir(str(site_packages))  # also runs .pth files (editable installs)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = [str(PLUGIN_DIR), *added, *[p for p in before if p != str(PLUGIN_DIR)]]


def _log(message: str) -> None:
    orthanc.LogWarning(message)


class TomoscribePlugin:
    """State of the plugin inside Orthanc: job store, supervisor, counters.

    Args:
        settings: Resolved settings.
        authorization: ``Authorization`` header value the worker uses against Orthanc.
    """

    def __init__(self, settings: Settings, authorization: str):
        from jobs import JobStore
        from routes import Routes
        from settings import model_scope, unrecognised_questions
        from supervisor import Supervisor

        self.settings = settings
        self.scope, why = model_scope(settings)
        if self.scope is None:
            _log(f"tomoscribe: cannot read the model's scope ({why}); "
                 "studies are filtered by Modalities only")
        elif self.scope.declared:
            models = "the models read" if getattr(self.scope, "members", None) else \
                "the model reads"
            _log(f"tomoscribe: {models} {self.scope.what()}; other studies are skipped")
        for line in unrecognised_questions(settings):
            _log(line)
        self.store = JobStore(settings.db_path, max_attempts=settings.max_attempts)
        self.supervisor = Supervisor(settings, authorization, _log)
        self.routes = Routes(self.store, self.enqueue_study, self.health)
        self.counters = {"stable_studies": 0, "enqueued": 0, "already_known": 0,
                         "not_qualifying": 0, "errors": 0}
        self.started_at = time.time()
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    # -- events ----------------------------------------------------------------------

    def on_change(self, change_type: int, level: int, resource_id: str) -> None:
        """Orthanc change callback: dispatch, never raise, return fast."""
        try:
            if change_type == orthanc.ChangeType.STABLE_STUDY:
                self._count("stable_studies")
                job, created, reason = self.enqueue_study(resource_id, False)
                if created:
                    self._count("enqueued")
                    _log(f"tomoscribe: queued job {job.id} for study {job.study_uid}")
                elif job is not None:
                    self._count("already_known")
                else:
                    self._count("not_qualifying")
                    orthanc.LogInfo(f"tomoscribe: study {resource_id} skipped: {reason}")
            elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
                if self.settings.enabled:
                    self.supervisor.start()
            elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
                self.supervisor.stop()
        except Exception as exc:  # a bug here must not break Orthanc's change thread
            self._count("errors")
            orthanc.LogError(f"tomoscribe: change callback failed: {type(exc).__name__}: {exc}")

    def enqueue_study(self, study_id: str, force: bool) -> tuple[Any, bool, str]:
        """Read a study's series, filter, enqueue.

        Returns:
            ``(job, created, "")``, or ``(None, False, reason)`` when the study does not
            qualify or does not exist.
        """
        from events import study_qualifies

        if not self.settings.enabled:
            return None, False, "tomoscribe is disabled (Tomoscribe.Enabled is false)"
        try:
            study = json.loads(orthanc.RestApiGet(f"/studies/{study_id}"))
            series = json.loads(orthanc.RestApiGet(f"/studies/{study_id}/series"))
        except orthanc.OrthancException:
            return None, False, f"no study {study_id} in Orthanc"
        ok, reason = study_qualifies(series, self.settings.modalities, self.scope)
        if not ok:
            return None, False, reason
        study_uid = study["MainDicomTags"]["StudyInstanceUID"]
        job, created = self.store.enqueue(study_uid, study_id, self.settings.model_version,
                                          force=force)
        return job, created, ""

    def health(self) -> dict[str, Any]:
        """Worker state and event counters for ``GET /tomoscribe/health``."""
        pid = self.supervisor.worker_pid
        with self._lock:
            counters = dict(self.counters)
        return {"enabled": self.settings.enabled, "worker_alive": pid is not None,
                "worker_pid": pid, "worker_restarts": self.supervisor.restarts,
                "worker_last_exit": self.supervisor.last_exit,
                "model_version": self.settings.model_version, "events": counters,
                "uptime_s": round(time.time() - self.started_at, 1)}


def _rest_callback(handler: Callable[[Any], tuple[int, Any]], allowed: str) -> Callable[..., None]:
    """Adapt a ``routes.Routes`` handler to Orthanc's REST callback signature."""
    from jobs import one_line
    from routes import Request

    def callback(output: Any, uri: str, **request: Any) -> None:
        req = Request(method=str(request.get("method", "GET")),
                      groups=tuple(request.get("groups", ()) or ()),
                      headers=dict(request.get("headers", {}) or {}),
                      get=dict(request.get("get", {}) or {}))
        try:
            status, payload = handler(req)
        except Exception as exc:
            orthanc.LogError(f"tomoscribe: {uri}: {type(exc).__name__}: {exc}")
            status, payload = 500, {"error": one_line(f"{type(exc).__name__}: {exc}")}
        body = json.dumps(payload, indent=1, ensure_ascii=True)  # ASCII: len() == bytes
        if status == 200:
            output.AnswerBuffer(body, "application/json")
        elif status == 405:
            output.SendMethodNotAllowed(allowed)
        else:  # orthanc-python 4.0: (status, str body, length); a bytes body is a TypeError
            output.SendHttpStatus(status, body, len(body))

    return callback


def _worker_authorization(settings: Settings) -> str:
    if settings.worker_username and settings.worker_password:
        token = f"{settings.worker_username}:{settings.worker_password}".encode()
        return "Basic " + base64.b64encode(token).decode()
    return str(orthanc.GenerateRestApiAuthorizationToken())


def initialize() -> TomoscribePlugin:
    """Read the configuration, register the callbacks and routes; return the plugin."""
    config = json.loads(orthanc.GetConfiguration())
    _add_venv(load_settings(config).python)
    settings = load_settings(config)  # again: the model version default needs the venv
    if not config.get("AuthenticationEnabled", False):
        orthanc.LogWarning("tomoscribe: AuthenticationEnabled is false: /tomoscribe/ routes"
                           " (and Orthanc's REST API) are open to anyone who can connect")
    plugin = TomoscribePlugin(settings, _worker_authorization(settings))
    orthanc.RegisterOnChangeCallback(plugin.on_change)
    r = plugin.routes
    orthanc.RegisterRestCallback("/tomoscribe/jobs", _rest_callback(r.jobs, "GET"))
    orthanc.RegisterRestCallback("/tomoscribe/jobs/([0-9]+)", _rest_callback(r.job, "GET"))
    orthanc.RegisterRestCallback("/tomoscribe/studies/([0-9a-f-]+)/rerun",
                                 _rest_callback(r.rerun, "POST"))
    orthanc.RegisterRestCallback("/tomoscribe/health", _rest_callback(r.health, "GET"))
    from ohif import register as register_ohif

    register_ohif(orthanc, settings.ohif_dir, config, _log)
    _log(f"tomoscribe: plugin loaded (model version {settings.model_version}, job DB"
         f" {settings.db_path}, worker {settings.python}, job function {settings.job_function})")
    return plugin


PLUGIN = initialize()
