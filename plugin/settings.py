# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""The plugin's settings: section ``"Tomoscribe"`` of Orthanc's configuration.

Every key is optional::

    "Tomoscribe": {
      "Enabled": true,                      // false: load, register routes, never enqueue
      "Python": "/opt/tomoscribe/.venv/bin/python",   // interpreter for the worker
      "StorageDirectory": "/var/lib/orthanc/tomoscribe", // job DB, worker log, scratch
      "OrthancUrl": "http://127.0.0.1:8042", // how the worker reaches Orthanc's REST API
      "WorkerUsername": "", "WorkerPassword": "",     // else a plugin-generated token
      "ModelDirectory": "/opt/tomoscribe/model",      // null: the app's default model
      "ModelVersion": "0.1.0",               // job key; default tomoscribe.__version__
      "Questions": ["Is there a lesion?"],
      "Modalities": ["CT", "MR"],           // and only what the model reads (its scope)
      "JobFunction": "operators.app:run_app", // or "/abs/file.py:function"
      "AppConfig": null,                      // config_path passed to the job function
      "LeaseSeconds": 60, "MaxAttempts": 3, "JobTimeoutSeconds": 1800,
      "PollSeconds": 1.0, "WorkerMemoryLimitMB": 0,   // 0: no RLIMIT_AS on the worker
      "WorkerEnvironment": {"OMP_NUM_THREADS": "2"},  // extra environment for the worker
      "OhifDirectory": "/opt/ohif/dist"      // OHIF build served at /ohif/; default var/ohif/dist
    }

Standard library only: imported inside Orthanc's process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Repository root (plugin/ lives directly under it).
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOB_FUNCTION = "operators.app:run_app"


@dataclass(frozen=True)
class Settings:
    """Resolved plugin settings (see the module docstring for the JSON keys)."""

    enabled: bool
    python: str
    storage_dir: Path
    orthanc_url: str
    worker_username: str | None
    worker_password: str | None
    model_dir: Path | None
    model_version: str
    questions: tuple[str, ...]
    modalities: tuple[str, ...]
    job_function: str
    app_config: Path | None
    lease_s: float
    max_attempts: int
    job_timeout_s: float
    poll_s: float
    memory_limit_mb: int
    extra_env: dict[str, str] = field(default_factory=dict)
    ohif_dir: Path | None = None

    @property
    def db_path(self) -> Path:
        """The SQLite job database."""
        return self.storage_dir / "jobs.sqlite"

    @property
    def worker_log(self) -> Path:
        """The worker's log file (full tracebacks go here, never into a job record)."""
        return self.storage_dir / "worker.log"

    def to_json(self) -> str:
        """Serialise for the worker's ``--settings`` argument (no secrets inside)."""
        data = asdict(self)
        data.pop("worker_password")
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        """Inverse of :meth:`to_json` (the password is never carried)."""
        data: dict[str, Any] = json.loads(text)
        return cls(
            enabled=bool(data["enabled"]),
            python=str(data["python"]),
            storage_dir=Path(data["storage_dir"]),
            orthanc_url=str(data["orthanc_url"]),
            worker_username=data.get("worker_username"),
            worker_password=None,
            model_dir=Path(data["model_dir"]) if data.get("model_dir") else None,
            model_version=str(data["model_version"]),
            questions=tuple(data.get("questions", ())),
            modalities=tuple(data.get("modalities", ("CT", "MR"))),
            job_function=str(data["job_function"]),
            app_config=Path(data["app_config"]) if data.get("app_config") else None,
            lease_s=float(data["lease_s"]),
            max_attempts=int(data["max_attempts"]),
            job_timeout_s=float(data["job_timeout_s"]),
            poll_s=float(data["poll_s"]),
            memory_limit_mb=int(data["memory_limit_mb"]),
            extra_env=dict(data.get("extra_env", {})),
            ohif_dir=Path(data["ohif_dir"]) if data.get("ohif_dir") else None,
        )


def model_scope(settings: Settings) -> tuple[Any, str]:
    """The declared scope of the model jobs will run (``tomoscribe.scope.ModelScope``).

    The model is ``ModelDirectory``, else the ``AppConfig`` file's ``model``,
    else the default model, as the job function resolves it.

    Returns:
        ``(scope, "")``, or ``(None, one-line reason)`` when it cannot be read
        here (the job itself then reports what is wrong with the model).
    """
    try:
        from tomoscribe.scope import read_scope

        model_dir = settings.model_dir
        if model_dir is None and settings.app_config is not None:
            from tomoscribe.config import load_settings as load_app_settings

            model_dir = load_app_settings(settings.app_config).model
        return read_scope(model_dir), ""
    except Exception as exc:  # tomoscribe missing, a broken config: never break Orthanc
        return None, " ".join(f"{type(exc).__name__}: {exc}".split())


def default_model_version() -> str:
    """``tomoscribe.__version__`` if the package is importable (it is light), else 'unknown'."""
    try:
        import tomoscribe

        return str(tomoscribe.__version__)
    except Exception:
        return "unknown"


def load_settings(config: Mapping[str, Any]) -> Settings:
    """Build :class:`Settings` from Orthanc's whole configuration.

    Args:
        config: The parsed JSON of ``orthanc.GetConfiguration()``.

    Returns:
        Settings with every default filled in.

    Raises:
        ValueError: A key has a value of the wrong kind (one-line message).
    """
    section: Mapping[str, Any] = config.get("Tomoscribe", {}) or {}
    if not isinstance(section, Mapping):
        raise ValueError('configuration key "Tomoscribe" must be a JSON object')

    orthanc_storage = Path(os.path.abspath(str(config.get("StorageDirectory", "OrthancStorage"))))
    storage_dir = Path(os.path.abspath(str(section.get("StorageDirectory")
                                           or orthanc_storage / "tomoscribe")))
    port = int(config.get("HttpPort", 8042))
    python = str(section.get("Python") or REPO_ROOT / ".venv" / "bin" / "python")

    def opt_path(key: str) -> Path | None:
        value = section.get(key)
        return Path(os.path.abspath(str(value))) if value else None

    questions = section.get("Questions", [])
    modalities = section.get("Modalities", ["CT", "MR"])
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise ValueError('"Tomoscribe.Questions" must be a list of strings')
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise ValueError('"Tomoscribe.Modalities" must be a list of strings')
    extra_env = section.get("WorkerEnvironment", {}) or {}
    if not isinstance(extra_env, Mapping):
        raise ValueError('"Tomoscribe.WorkerEnvironment" must be a JSON object')

    return Settings(
        enabled=bool(section.get("Enabled", True)),
        python=python,
        storage_dir=storage_dir,
        orthanc_url=str(section.get("OrthancUrl") or f"http://127.0.0.1:{port}").rstrip("/"),
        worker_username=section.get("WorkerUsername") or None,
        worker_password=section.get("WorkerPassword") or None,
        model_dir=opt_path("ModelDirectory"),
        model_version=str(section.get("ModelVersion") or default_model_version()),
        questions=tuple(questions),
        modalities=tuple(m.upper() for m in modalities),
        job_function=str(section.get("JobFunction") or DEFAULT_JOB_FUNCTION),
        app_config=opt_path("AppConfig"),
        lease_s=float(section.get("LeaseSeconds", 60)),
        max_attempts=int(section.get("MaxAttempts", 3)),
        job_timeout_s=float(section.get("JobTimeoutSeconds", 1800)),
        poll_s=float(section.get("PollSeconds", 1.0)),
        memory_limit_mb=int(section.get("WorkerMemoryLimitMB", 0)),
        extra_env={str(k): str(v) for k, v in extra_env.items()},
        ohif_dir=opt_path("OhifDirectory") or REPO_ROOT / "var" / "ohif" / "dist",
    )
