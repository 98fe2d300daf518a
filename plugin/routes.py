# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""REST routes under ``/tomoscribe/``, as plain functions of the request.

Orthanc checks its own authentication (``AuthenticationEnabled``,
``RegisteredUsers``) before it calls a plugin's REST callback, so these
routes are exactly as protected as Orthanc's REST API. Orthanc has no CSRF
protection: state-changing routes are POST-only and need a header a plain
cross-site form cannot send (``X-Requested-With`` or a JSON content type).

Each handler returns ``(HTTP status, JSON-ready payload)``; the entry script
turns that into an Orthanc answer. Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs import STATES, JobStore

Answer = tuple[int, Any]


@dataclass
class Request:
    """What Orthanc's python plugin passes to a REST callback, normalised.

    Attributes:
        method: ``GET``, ``POST``...
        groups: Regex groups of the route.
        headers: Request headers (lower-case names, as Orthanc gives them).
        get: Query arguments.
    """

    method: str
    groups: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    get: Mapping[str, str] = field(default_factory=dict)


def csrf_ok(headers: Mapping[str, str]) -> bool:
    """True if the request carries a header a cross-site HTML form cannot set."""
    lower = {k.lower(): v for k, v in headers.items()}
    if lower.get("x-requested-with"):
        return True
    return lower.get("content-type", "").split(";")[0].strip().lower() == "application/json"


def _error(status: int, message: str) -> Answer:
    return status, {"error": message}


class Routes:
    """The route handlers.

    Args:
        store: The job store.
        enqueue_study: ``f(orthanc_study_id, force) -> (job or None, requeued, reason)``;
            the plugin's own enqueue logic (reads the study, applies the filter).
        health: ``f() -> dict`` describing the worker and counters.
    """

    def __init__(self, store: JobStore,
                 enqueue_study: Callable[[str, bool], tuple[Any, bool, str]],
                 health: Callable[[], dict[str, Any]]):
        self.store = store
        self.enqueue_study = enqueue_study
        self.health_fn = health

    def jobs(self, req: Request) -> Answer:
        """``GET /tomoscribe/jobs?state=&limit=``: newest first."""
        if req.method != "GET":
            return _error(405, "use GET")
        state = req.get.get("state") or None
        if state is not None and state not in STATES:
            return _error(400, f"state must be one of {', '.join(STATES)}")
        try:
            limit = max(1, min(int(req.get.get("limit", "100")), 10000))
        except ValueError:
            return _error(400, "limit must be an integer")
        return 200, [j.to_json() for j in self.store.list(limit=limit, state=state)]

    def job(self, req: Request) -> Answer:
        """``GET /tomoscribe/jobs/{id}``."""
        if req.method != "GET":
            return _error(405, "use GET")
        job = self.store.get(int(req.groups[0]))
        if job is None:
            return _error(404, f"no job {req.groups[0]}")
        return 200, job.to_json()

    def rerun(self, req: Request) -> Answer:
        """``POST /tomoscribe/studies/{orthanc-study-id}/rerun``: force a new run."""
        if req.method != "POST":
            return _error(405, "use POST")
        if not csrf_ok(req.headers):
            return _error(403, "send the header 'X-Requested-With' or a JSON content type")
        job, requeued, reason = self.enqueue_study(req.groups[0], True)
        if job is None:
            return _error(404 if reason.startswith("no study") else 422, reason)
        if not requeued:
            return _error(409, f"job {job.id} for this study is already {job.state}")
        return 200, {"requeued": True, "job": job.to_json()}

    def health(self, req: Request) -> Answer:
        """``GET /tomoscribe/health``: worker alive, queue depth, counters."""
        if req.method != "GET":
            return _error(405, "use GET")
        info = self.health_fn()
        info["jobs"] = self.store.counts()
        info["queue_depth"] = info["jobs"]["queued"]
        return 200, info
