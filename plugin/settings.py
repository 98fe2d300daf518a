# SPDX-License-Identifier: AGPL-3.0-or-later  (tomoscribe Orthanc plugin, see plugin/LICENSE)
"""The plugin's settings: section ``"Tomoscribe"`` of Orthanc's configuration.

Every key is optional::

    "Tomoscribe": {
      "Enabled": true,                      // false: load, register routes, never enqueue
      "Python": "/opt/tomoscribe/.venv/bin/python",   // interpreter for the worker
      "StorageDirectory": "/var/lib/orthanc/tomoscribe", // job DB, worker log, scratch
      "OrthancUrl": "http://127.0.0.1:8042", // how the worker reaches Orthanc's REST API
      "WorkerUsername": "", "WorkerPassword": "",     // else a plugin-generated token
      "ModelDirectory": "/opt/tomoscribe/model",      // a folder, a model name, or a list
      "ModelVersion": "0.1.0",               // job key; default: see default_model_version
      "Questions": ["Are there any focal findings?"],   // asked of every study
      "Modalities": ["CT", "MR"],           // and only what the model reads (its scope)
      "JobFunction": "operators.app:run_app", // or "/abs/file.py:function"
      "AppConfig": null,                      // config_path passed to the job function
      "LeaseSeconds": 60, "MaxAttempts": 3, "JobTimeoutSeconds": 1800,
      "PollSeconds": 1.0, "WorkerMemoryLimitMB": 0,   // 0: no RLIMIT_AS on the worker
      "WorkerEnvironment": {"OMP_NUM_THREADS": "2"},  // extra environment for the worker
      "OhifDirectory": "/opt/ohif/dist"      // OHIF build served at /ohif/; default var/ohif/dist
    }

``ModelDirectory`` names the model jobs run: a folder, the name of a model
packaged with tomoscribe (``"default"``, ``"head-mr"`` for
``tomoscribe/weights-head-mr/``), or a list of them (a JSON array, or a
string holding one, as an environment variable gives it), such as
``["default", "head-mr"]``: each model reads the series in its own scope, and
a study gets a job when any model's scope admits it (:func:`model_scope`).
``null`` or ``[]``: ``AppConfig``'s ``model``, else the default model.

Standard library only: imported inside Orthanc's process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Repository root (plugin/ lives directly under it).
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOB_FUNCTION = "operators.app:run_app"
#: the form of a model name: the same rule as ``tomoscribe.scope.is_model_name``
#: (repeated here: the first reading of the settings happens before the venv,
#: and so tomoscribe, is importable)
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Settings:
    """Resolved plugin settings (see the module docstring for the JSON keys).

    ``models`` holds ``ModelDirectory``: packaged model names and absolute
    folders, in order; empty: ``AppConfig``'s model, else the default one.
    """

    enabled: bool
    python: str
    storage_dir: Path
    orthanc_url: str
    worker_username: str | None
    worker_password: str | None
    models: tuple[str, ...]
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
            models=tuple(str(m) for m in data.get("models") or ()) or (
                (str(data["model_dir"]),) if data.get("model_dir") else ()),
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


def job_models(settings: Settings) -> str | Path | list[str | Path] | None:
    """The ``model_dir`` argument of the job function: ``ModelDirectory`` as it names the models.

    ``None`` when it is not set (the app takes ``AppConfig``'s model, else the
    default); one model as a :class:`~pathlib.Path` (a folder) or a string (a
    packaged model's name), as job functions took it before; several as a list.
    """
    items: list[str | Path] = [Path(m) if os.path.isabs(m) else m for m in settings.models]
    if not items:
        return None
    return items[0] if len(items) == 1 else items


def _configured(models: Sequence[str], app_config: Path | None) -> tuple[Path | None, ...]:
    """The model folders jobs run (``None``: the default model), as the job function finds them.

    ``ModelDirectory``, else the ``AppConfig`` file's ``model``, else the
    default model. Imports tomoscribe (light: no torch).

    Raises:
        Exception: tomoscribe is not importable, a name is unknown, the
            ``AppConfig`` file is bad.
    """
    from tomoscribe.scope import resolve_model

    if models:
        return tuple(resolve_model(m) for m in models)
    if app_config is not None:
        from tomoscribe.config import load_settings as load_app_settings

        return load_app_settings(app_config).models
    return (None,)


def configured_models(settings: Settings) -> tuple[Path | None, ...]:
    """The model folders jobs run; see :func:`_configured` (raises where it does)."""
    return _configured(settings.models, settings.app_config)


def model_scope(settings: Settings) -> tuple[Any, str]:
    """What the models jobs run read together (:func:`configured_models`).

    One model: its declared ``tomoscribe.scope.ModelScope``, as before.
    Several: a ``tomoscribe.scope.CombinedScope``, which admits a series when
    any model's scope admits it, and otherwise gives each model's reason.

    Returns:
        ``(scope, "")``, or ``(None, one-line reason)`` when it cannot be read
        here (the job itself then reports what is wrong with the model).
    """
    try:
        from tomoscribe.scope import CombinedScope, model_labels, read_scope

        folders = configured_models(settings)
        if len(folders) == 1:
            return read_scope(folders[0]), ""
        labels = model_labels(folders)
        members = tuple((label, read_scope(folder))
                        for label, folder in zip(labels, folders, strict=True))
        return CombinedScope(members), ""
    except Exception as exc:  # tomoscribe missing, a broken config: never break Orthanc
        return None, " ".join(f"{type(exc).__name__}: {exc}".split())


def unrecognised_questions(settings: Settings) -> list[str]:
    """The standing questions no configured model recognises, one line each for the log.

    A question the model was trained on, or one in other words it matches
    (``tomoscribe questions`` lists them), is answered from the report or in
    the templates' words; any other goes to the language model as typed, and
    may be answered badly: an administrator should hear of it once, at startup.
    A model whose domain cannot be read here is left to the job to report.
    """
    try:
        from tomoscribe.model.text import is_referring, match_question
        from tomoscribe.scope import read_model_domain

        domains = [d for d in map(read_model_domain, configured_models(settings))
                   if d is not None]
    except Exception:  # tomoscribe missing, a broken config: never break Orthanc
        return []
    out = []
    for q in settings.questions:
        referring = is_referring(q)
        if domains and not any(match_question(q, d, referring) for d in domains):
            out.append(f"tomoscribe: the standing question {q!r} is not one the model was "
                       "trained on, in any wording it recognises (`tomoscribe questions` "
                       "lists them): the language model answers it as typed")
    return out


def default_model_version(models: Sequence[Path | None] = ()) -> str:
    """The default ``ModelVersion``, the second half of a job's key.

    With one model (or none named): ``tomoscribe.__version__``, as before, so
    an installation that keeps one model keeps its job keys. With several:
    the versions of the models (``config.json``'s ``version``, which their
    output UIDs derive from), sorted and joined with ``", "``. Sorted: the
    order of the list decides only the order the models run in, not what
    they write, so reordering it leaves the key alone. Changing the set of
    models changes the key: a study none of them read (a job ``skipped``) gets
    a new job when it is sent again after a model that reads it is added.

    Args:
        models: the model folders (:func:`configured_models`).

    Returns:
        The version text; ``"unknown"`` when tomoscribe is not importable.
    """
    try:
        import tomoscribe

        package = str(tomoscribe.__version__)
        if len(models) <= 1:
            return package
        from tomoscribe.scope import model_label, read_model_version

        return ", ".join(sorted(read_model_version(m) or f"{model_label(m)} (no version)"
                                for m in models))
    except Exception:
        return "unknown"


def _model_entries(value: Any) -> tuple[str, ...]:
    """``ModelDirectory``: names kept as names, folders made absolute, in order.

    Raises:
        ValueError: not a name, folder or list of them; an unknown name; a
            model listed twice (one-line message).
    """
    key = '"Tomoscribe.ModelDirectory"'
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{key} is not a JSON list: {exc}") from exc
    if value is None or value == "":
        return ()
    items = value if isinstance(value, list) else [value]
    try:  # the packaged models; None before the venv is on sys.path (read again after)
        from tomoscribe.scope import packaged_models

        names: dict[str, Path] | None = packaged_models()
    except Exception:
        names = None
    out: list[str] = []
    seen: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{key} must be a model name, a folder, or a list of them")
        text = item.strip()
        word = _MODEL_NAME.fullmatch(text) is not None
        if word and names is None:  # checked when read again, with the venv
            entry = folder = text
        elif word and names is not None and text in names:
            entry, folder = text, str(names[text])
        elif word and names is not None and not os.path.isdir(text):
            raise ValueError(f"{key}: no model named {text!r}: the packaged models are "
                             f"{', '.join(names)}, and there is no folder {os.path.abspath(text)}")
        else:
            entry = folder = os.path.abspath(os.path.expanduser(text))
        where = os.path.realpath(folder)
        if where in seen:
            raise ValueError(f"{key}: {text!r} is the same model as {seen[where]!r}; "
                             "list each model once")
        seen[where] = text
        out.append(entry)
    return tuple(out)


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
    models = _model_entries(section.get("ModelDirectory"))
    app_config = opt_path("AppConfig")
    model_version = section.get("ModelVersion")
    if not model_version:
        folders: Sequence[Path | None] = ()
        if len(models) > 1 or (not models and app_config is not None):
            # tomoscribe not yet importable, a bad AppConfig: the job reports it
            with contextlib.suppress(Exception):
                folders = _configured(models, app_config)
        model_version = default_model_version(folders)

    return Settings(
        enabled=bool(section.get("Enabled", True)),
        python=python,
        storage_dir=storage_dir,
        orthanc_url=str(section.get("OrthancUrl") or f"http://127.0.0.1:{port}").rstrip("/"),
        worker_username=section.get("WorkerUsername") or None,
        worker_password=section.get("WorkerPassword") or None,
        models=models,
        model_version=str(model_version),
        questions=tuple(questions),
        modalities=tuple(m.upper() for m in modalities),
        job_function=str(section.get("JobFunction") or DEFAULT_JOB_FUNCTION),
        app_config=app_config,
        lease_s=float(section.get("LeaseSeconds", 60)),
        max_attempts=int(section.get("MaxAttempts", 3)),
        job_timeout_s=float(section.get("JobTimeoutSeconds", 1800)),
        poll_s=float(section.get("PollSeconds", 1.0)),
        memory_limit_mb=int(section.get("WorkerMemoryLimitMB", 0)),
        extra_env={str(k): str(v) for k, v in extra_env.items()},
        ohif_dir=opt_path("OhifDirectory") or REPO_ROOT / "var" / "ohif" / "dist",
    )
