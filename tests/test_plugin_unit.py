"""The plugin's logic with a fake ``orthanc`` module (no server): filter, enqueue, routes.

The real Orthanc tests are in test_e2e_orthanc.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from events import is_own_output, study_qualifies
from settings import Settings, load_settings
from supervisor import Supervisor

import tomoscribe
from tomoscribe.errors import InputError, OutOfScopeError

PLUGIN_SCRIPT = Path(__file__).resolve().parent.parent / "plugin" / "tomoscribe_plugin.py"


class FakeOrthancError(Exception):
    pass


def _series(sid: str, modality: str, manufacturer: str = "ACME", n: int = 3) -> dict[str, Any]:
    return {"ID": sid, "Instances": [f"{sid}-i{k}" for k in range(n)],
            "MainDicomTags": {"Modality": modality, "Manufacturer": manufacturer,
                              "SeriesInstanceUID": f"1.2.{sid}"}}


class FakeOrthanc:
    """Builds a module object standing in for orthanc-python's ``orthanc``."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.studies: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        self.change_callbacks: list[Any] = []
        self.routes: dict[str, Any] = {}
        self.logs: list[str] = []
        self.rest_calls: list[str] = []
        self.module = types.ModuleType("orthanc")
        m = self.module
        m.ChangeType = types.SimpleNamespace(STABLE_STUDY=8, ORTHANC_STARTED=11,  # type: ignore[attr-defined]
                                             ORTHANC_STOPPED=12, NEW_INSTANCE=2)
        m.OrthancException = FakeOrthancError  # type: ignore[attr-defined]
        m.GetConfiguration = lambda: json.dumps(self.config)  # type: ignore[attr-defined]
        m.GenerateRestApiAuthorizationToken = lambda: "Bearer fake"  # type: ignore[attr-defined]
        m.RegisterOnChangeCallback = self.change_callbacks.append  # type: ignore[attr-defined]
        m.RegisterRestCallback = self.routes.__setitem__  # type: ignore[attr-defined]
        m.RestApiGet = self.rest_get  # type: ignore[attr-defined]
        for name in ("LogWarning", "LogInfo", "LogError"):
            setattr(m, name, self.logs.append)

    def rest_get(self, path: str) -> bytes:
        self.rest_calls.append(path)
        parts = path.strip("/").split("/")
        if parts[0] == "studies" and parts[1] in self.studies:
            uid, series = self.studies[parts[1]]
            if len(parts) == 2:
                return json.dumps({"ID": parts[1], "MainDicomTags": {"StudyInstanceUID": uid},
                                   "Series": [s["ID"] for s in series]}).encode()
            if parts[2:] == ["series"]:
                return json.dumps(series).encode()
        raise FakeOrthancError("Unknown resource")


class FakeOutput:
    """Records what a REST callback answered."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body: str | None = None
        self.allowed: str | None = None

    def AnswerBuffer(self, body: str, mime: str) -> None:  # noqa: N802 - orthanc's API
        assert mime == "application/json"
        self.status, self.body = 200, body

    def SendHttpStatus(self, status: int, body: str, size: int) -> None:  # noqa: N802 - orthanc's API
        assert isinstance(body, str) and size == len(body.encode())  # orthanc-python 4.0
        self.status, self.body = status, body

    def SendMethodNotAllowed(self, allowed: str) -> None:  # noqa: N802 - orthanc's API
        self.status, self.allowed = 405, allowed

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(self.body)


def _start_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  **section: Any) -> tuple[FakeOrthanc, Any]:
    """Load the entry script against a fake ``orthanc``; ``section``: more Tomoscribe keys."""
    config = {"StorageDirectory": str(tmp_path / "storage"), "HttpPort": 8999,
              "AuthenticationEnabled": True,
              "Tomoscribe": {"Python": sys.executable, "Questions": ["Any lesion?"], **section}}
    orthanc = FakeOrthanc(config)
    monkeypatch.setitem(sys.modules, "orthanc", orthanc.module)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the entry script edits sys.path
    spec = importlib.util.spec_from_file_location("tomoscribe_plugin_under_test", PLUGIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return orthanc, module.PLUGIN


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeOrthanc, Any]]:
    orthanc, plugin = _start_plugin(tmp_path, monkeypatch)
    yield orthanc, plugin
    plugin.supervisor.stop()


def _stable(orthanc: FakeOrthanc, study_id: str) -> float:
    t0 = time.perf_counter()
    orthanc.change_callbacks[0](orthanc.module.ChangeType.STABLE_STUDY, 2, study_id)
    return time.perf_counter() - t0


def _call(orthanc: FakeOrthanc, route: str, method: str = "GET", groups: tuple[str, ...] = (),
          headers: dict[str, str] | None = None, get: dict[str, str] | None = None) -> FakeOutput:
    out = FakeOutput()
    orthanc.routes[route](out, "/uri", method=method, groups=groups, headers=headers or {},
                          get=get or {})
    return out


def test_registers_routes_and_settings_from_configuration(fake: tuple[FakeOrthanc, Any]) -> None:
    orthanc, plugin = fake
    assert len(orthanc.change_callbacks) == 1
    assert set(orthanc.routes) == {"/tomoscribe/jobs", "/tomoscribe/jobs/([0-9]+)",
                                   "/tomoscribe/studies/([0-9a-f-]+)/rerun",
                                   "/tomoscribe/health", "/ohif(/.*)?"}
    s: Settings = plugin.settings
    assert s.model_version == tomoscribe.__version__
    assert s.questions == ("Any lesion?",)
    assert s.orthanc_url == "http://127.0.0.1:8999"
    assert s.db_path.parent == Path(orthanc.config["StorageDirectory"]) / "tomoscribe"
    assert s.job_function == "operators.app:run_app"
    assert plugin.supervisor.authorization == "Bearer fake"
    assert plugin.supervisor.worker_pid is None  # started only on ORTHANC_STARTED


def test_ct_study_is_queued_once_and_fast(fake: tuple[FakeOrthanc, Any]) -> None:
    orthanc, plugin = fake
    orthanc.studies["s1"] = ("1.2.840.1", [_series("a", "CT"), _series("b", "SR", "ACME")])
    elapsed = _stable(orthanc, "s1")
    jobs = plugin.store.list()
    assert [(j.study_uid, j.orthanc_study_id, j.state) for j in jobs] == [
        ("1.2.840.1", "s1", "queued")]
    assert elapsed < 0.5, f"change callback took {elapsed:.3f} s"
    assert orthanc.rest_calls == ["/studies/s1", "/studies/s1/series"]  # cheap JSON only
    # our own outputs land -> STABLE_STUDY again -> no second job
    orthanc.studies["s1"][1].extend([_series("c", "SR", "tomoscribe"),
                                     _series("d", "SEG", "tomoscribe")])
    _stable(orthanc, "s1")
    assert len(plugin.store.list()) == 1
    assert plugin.counters["enqueued"] == 1 and plugin.counters["already_known"] == 1


def test_done_study_is_not_requeued(fake: tuple[FakeOrthanc, Any]) -> None:
    orthanc, plugin = fake
    orthanc.studies["s1"] = ("1.2.840.1", [_series("a", "CT")])
    _stable(orthanc, "s1")
    job = plugin.store.claim("w", 30)
    plugin.store.complete(job.id, ["o1"], "w")
    _stable(orthanc, "s1")
    assert [j.state for j in plugin.store.list()] == ["done"]
    assert plugin.store.claim("w", 30) is None


@pytest.mark.parametrize(("series", "reason"), [
    ([], "no series"),
    ([lambda: _series("a", "SR"), lambda: _series("b", "PR")], "modalities present: PR, SR"),
    ([lambda: _series("a", "CT", "tomoscribe")], "CT/MR"),
    ([lambda: _series("a", "CT", n=0)], "CT/MR"),
    ([lambda: _series("a", "US")], "US"),
])
def test_study_that_does_not_qualify_gets_no_job(fake: tuple[FakeOrthanc, Any],
                                                 series: list[Any], reason: str) -> None:
    orthanc, plugin = fake
    orthanc.studies["s2"] = ("1.2.840.2", [make() for make in series])
    _stable(orthanc, "s2")
    assert plugin.store.list() == []
    assert plugin.counters["not_qualifying"] == 1
    ok, why = study_qualifies(orthanc.studies["s2"][1], ("CT", "MR"))
    assert not ok and reason in why


def _with_body_part(series: dict[str, Any], body_part: str) -> dict[str, Any]:
    series["MainDicomTags"]["BodyPartExamined"] = body_part
    return series


@pytest.mark.parametrize(("series", "reason"), [
    ([lambda: _series("a", "MR")], "outside the model's scope: the model reads CT of the chest"
                                   " and abdomen, not MR"),
    ([lambda: _with_body_part(_series("a", "CT"), "HEAD")], "not Body Part Examined HEAD"),
])
def test_study_outside_the_models_scope_gets_no_job(fake: tuple[FakeOrthanc, Any],
                                                    series: list[Any], reason: str) -> None:
    """The default model reads chest-abdomen CT: an MR or a head CT is skipped, with the reason."""
    orthanc, plugin = fake
    assert plugin.scope.modalities == ("CT",)
    orthanc.studies["s3"] = ("1.2.840.3", [make() for make in series])
    _stable(orthanc, "s3")
    assert plugin.store.list() == []
    assert plugin.counters["not_qualifying"] == 1
    assert any(reason in line for line in orthanc.logs), orthanc.logs
    job, created, why = plugin.enqueue_study("s3", True)  # the rerun route says why too
    assert job is None and not created and reason in why


def test_in_scope_series_of_a_mixed_study_qualify(fake: tuple[FakeOrthanc, Any]) -> None:
    """A study with an MR and an abdominal CT gets a job; free-text body parts do not refuse."""
    orthanc, plugin = fake
    orthanc.studies["s4"] = ("1.2.840.4", [_series("a", "MR"),
                                           _with_body_part(_series("b", "CT"), "Thorax/Abd")])
    _stable(orthanc, "s4")
    assert len(plugin.store.list()) == 1
    from events import input_series

    assert [s["ID"] for s in input_series(orthanc.studies["s4"][1], ("CT", "MR"),
                                          plugin.scope)] == ["b"]


def test_model_without_a_scope_reads_mr(tmp_path: Path) -> None:
    """A model folder declaring no scope (brought from elsewhere): the Modalities filter only."""
    from settings import model_scope

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"name": "theirs", "net": {}}))
    config = {"StorageDirectory": str(tmp_path), "Tomoscribe": {"ModelDirectory": str(folder)}}
    scope, why = model_scope(load_settings(config))
    assert why == "" and not scope.declared
    ok, _ = study_qualifies([_series("a", "MR")], ("CT", "MR"), scope)
    assert ok
    (folder / "config.json").write_text("{not json")
    scope, why = model_scope(load_settings(config))
    assert scope is None and "not readable JSON" in why and "\n" not in why


def test_callback_never_raises(fake: tuple[FakeOrthanc, Any]) -> None:
    orthanc, plugin = fake
    _stable(orthanc, "missing")  # unknown study: Orthanc raises, we skip
    assert plugin.counters["not_qualifying"] == 1
    orthanc.studies["bad"] = ("1.2.3", [{"weird": True}])  # malformed answer
    orthanc.module.RestApiGet = lambda path: b"not json"  # type: ignore[attr-defined]
    _stable(orthanc, "bad")
    assert plugin.counters["errors"] == 1
    assert any("change callback failed" in line for line in orthanc.logs)


def test_routes_list_get_health(fake: tuple[FakeOrthanc, Any]) -> None:
    orthanc, _ = fake
    orthanc.studies["s1"] = ("1.2.840.1", [_series("a", "CT")])
    _stable(orthanc, "s1")
    out = _call(orthanc, "/tomoscribe/jobs")
    assert out.status == 200 and [j["study_uid"] for j in out.json()] == ["1.2.840.1"]
    job_id = out.json()[0]["id"]
    assert _call(orthanc, "/tomoscribe/jobs", get={"state": "done"}).json() == []
    assert _call(orthanc, "/tomoscribe/jobs", get={"state": "nope"}).status == 400
    one = _call(orthanc, "/tomoscribe/jobs/([0-9]+)", groups=(str(job_id),))
    assert one.status == 200 and one.json()["state"] == "queued"
    missing = _call(orthanc, "/tomoscribe/jobs/([0-9]+)", groups=("4242",))
    assert missing.status == 404 and "no job" in missing.json()["error"]
    health = _call(orthanc, "/tomoscribe/health").json()
    assert health["queue_depth"] == 1 and health["worker_alive"] is False
    assert health["events"]["stable_studies"] == 1
    assert health["jobs"] == {"queued": 1, "running": 0, "done": 0, "failed": 0, "skipped": 0}


def test_skipped_job_listed_counted_and_rerun(fake: tuple[FakeOrthanc, Any]) -> None:
    """A skipped job: ``?state=skipped`` lists it, health counts it, a rerun requeues it."""
    orthanc, plugin = fake
    orthanc.studies["s1"] = ("1.2.840.1", [_series("a", "CT")])
    _stable(orthanc, "s1")
    job = plugin.store.claim("w", 30)
    assert plugin.store.skip(job.id, "the image does not look like CT of the chest", "w")
    listed = _call(orthanc, "/tomoscribe/jobs", get={"state": "skipped"})
    assert listed.status == 200 and [j["id"] for j in listed.json()] == [job.id]
    assert listed.json()[0]["reason"] == "the image does not look like CT of the chest"
    assert _call(orthanc, "/tomoscribe/health").json()["jobs"]["skipped"] == 1
    _stable(orthanc, "s1")  # STABLE_STUDY again: still skipped
    assert plugin.store.get(job.id).state == "skipped"
    route = "/tomoscribe/studies/([0-9a-f-]+)/rerun"
    rerun = _call(orthanc, route, "POST", ("s1",), {"x-requested-with": "XMLHttpRequest"})
    assert rerun.status == 200 and rerun.json()["job"]["state"] == "queued"


def test_rerun_is_post_only_and_csrf_safe(fake: tuple[FakeOrthanc, Any]) -> None:
    orthanc, plugin = fake
    route = "/tomoscribe/studies/([0-9a-f-]+)/rerun"
    orthanc.studies["s1"] = ("1.2.840.1", [_series("a", "CT")])
    _stable(orthanc, "s1")
    job = plugin.store.claim("w", 30)
    plugin.store.complete(job.id, ["o1"], "w")

    assert _call(orthanc, route, "GET", ("s1",)).status == 405
    form = _call(orthanc, route, "POST", ("s1",),
                 {"content-type": "application/x-www-form-urlencoded"})
    assert form.status == 403 and plugin.store.get(job.id).state == "done"
    ok = _call(orthanc, route, "POST", ("s1",), {"x-requested-with": "XMLHttpRequest"})
    assert ok.status == 200 and ok.json()["requeued"] is True
    assert plugin.store.get(job.id).state == "queued" and plugin.store.get(job.id).force
    busy = _call(orthanc, route, "POST", ("s1",), {"content-type": "application/json"})
    assert busy.status == 409 and "already queued" in busy.json()["error"]
    gone = _call(orthanc, route, "POST", ("feed",), {"x-requested-with": "x"})
    assert gone.status == 404


class _EmptyStudyClient:
    """Stands in for worker.OrthancClient: a study with no series (nothing to fetch)."""

    def get_json(self, path: str) -> Any:
        assert path == "/studies/s1/series"
        return []


@pytest.mark.parametrize(("error", "state", "level"), [
    (OutOfScopeError("the image does not look like CT of the chest and abdomen:\n what the"
                     " model took for the right lung has a median of -1000 HU"),
     "skipped", logging.INFO),
    (InputError("the series is a scout\nnot a volume"), "failed", logging.ERROR),
])
def test_worker_skips_out_of_scope_and_fails_other_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, state: str, level: int,
) -> None:
    """OutOfScopeError from the app ends the job skipped (INFO, no traceback); others fail."""
    import worker
    from jobs import JobStore

    settings = load_settings({"StorageDirectory": str(tmp_path)})
    store = JobStore(settings.db_path)
    job, _ = store.enqueue("1.2.840.1", "s1", "v1")

    def job_function(*args: Any, **kwargs: Any) -> list[Path]:
        raise error

    with caplog.at_level(logging.INFO, logger="tomoscribe.worker"):
        assert worker.process_one(store, settings, _EmptyStudyClient(),  # type: ignore[arg-type]
                                  job_function, "w1")
    finished = store.get(job.id)
    assert finished is not None and finished.state == state
    assert finished.reason == " ".join(str(error).split())
    records = [r for r in caplog.records if r.name == "tomoscribe.worker"]
    assert max(r.levelno for r in records) == level
    assert ("Traceback" in caplog.text) == (state == "failed")
    assert not worker.process_one(store, settings, _EmptyStudyClient(),  # type: ignore[arg-type]
                                  job_function, "w1")  # final: nothing left to claim


def test_own_output_recognised_by_manufacturer() -> None:
    assert is_own_output(_series("a", "SR", "tomoscribe"))
    assert is_own_output(_series("a", "SEG", "Tomoscribe "))
    assert not is_own_output(_series("a", "CT", "tomoscribe-phantom"))
    described = _series("a", "SR", "Other")
    described["MainDicomTags"]["SeriesDescription"] = "tomoscribe draft report"
    assert is_own_output(described)


def test_own_output_rule_matches_the_writers() -> None:
    """The plugin's stdlib-only rule agrees with tomoscribe.writers.identity."""
    identity = pytest.importorskip("tomoscribe.writers.identity")
    cases = [("tomoscribe", "x"), ("Tomoscribe ", "x"), ("ACME", "tomoscribe draft report"),
             ("tomoscribe-phantom", "Axial 5mm phantom"), ("ACME", "CT chest")]
    for manufacturer, description in cases:
        tags = {"Manufacturer": manufacturer, "SeriesDescription": description}
        series = {"MainDicomTags": tags, "Instances": ["i"]}
        assert is_own_output(series) == identity.is_tomoscribe_output(tags), tags


def test_bad_settings_give_one_line_errors() -> None:
    with pytest.raises(ValueError, match="Questions"):
        load_settings({"Tomoscribe": {"Questions": "not a list"}})
    with pytest.raises(ValueError, match="JSON object"):
        load_settings({"Tomoscribe": [1]})


# ---------------------------------------------------------------- several models


def _model_folder(folder: Path, version: str, scope: Any) -> Path:
    """A model folder as far as the plugin reads one: config.json's version and scope."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"version": version,
                                                    "scope": scope.to_dict()}))
    return folder


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in package folder holding the packaged model ``head-mr`` (version 0.2.0-head)."""
    from tomoscribe.scope import HEAD_MR

    folder = tmp_path / "package"
    _model_folder(folder / "weights-head-mr", "0.2.0-head", HEAD_MR)
    monkeypatch.setattr("tomoscribe.scope.PACKAGE_DIR", folder)
    return folder


def _settings(tmp_path: Path, **section: Any) -> Settings:
    return load_settings({"StorageDirectory": str(tmp_path), "Tomoscribe": section})


def test_model_directory_takes_a_name_a_folder_or_a_list(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from settings import default_model_version, job_models

    from tomoscribe.scope import read_model_version

    monkeypatch.chdir(tmp_path)
    folder = str(tmp_path / "site" / "ct")
    cases: list[tuple[Any, tuple[str, ...], Any]] = [
        (None, (), None),
        ([], (), None),
        ("default", ("default",), "default"),
        ("head-mr", ("head-mr",), "head-mr"),
        ("site/ct", (folder,), Path(folder)),  # relative to Orthanc's folder, as before
        (["head-mr", "default"], ("head-mr", "default"), ["head-mr", "default"]),
        ('["default", "site/ct"]', ("default", folder), ["default", Path(folder)]),
    ]
    for value, models, job_arg in cases:
        settings = _settings(tmp_path, ModelDirectory=value)
        assert settings.models == models, value
        assert job_models(settings) == job_arg, value
        assert Settings.from_json(settings.to_json()).models == models
    # the job key: one model keeps tomoscribe's version; several, their versions sorted
    assert _settings(tmp_path, ModelDirectory="head-mr").model_version == tomoscribe.__version__
    two = _settings(tmp_path, ModelDirectory=["default", "head-mr"])
    key = ", ".join(sorted([str(read_model_version(None)), "0.2.0-head"]))
    assert two.model_version == key == default_model_version([None, package / "weights-head-mr"])
    assert _settings(tmp_path, ModelDirectory=["head-mr", "default"]).model_version == key
    assert _settings(tmp_path, ModelDirectory=["head-mr", "default"],
                     ModelVersion="site-1").model_version == "site-1"


def test_a_bad_model_directory_is_one_line(package: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        _settings(tmp_path, ModelDirectory=["default", "head-ct"])
    assert str(info.value) == (
        "\"Tomoscribe.ModelDirectory\": no model named 'head-ct': the packaged models are "
        f"default, head-mr, and there is no folder {Path.cwd() / 'head-ct'}")
    with pytest.raises(ValueError, match="'head-mr' is the same model as 'head-mr'"):
        _settings(tmp_path, ModelDirectory=["head-mr", "default", "head-mr"])
    with pytest.raises(ValueError, match="must be a model name, a folder, or a list of them"):
        _settings(tmp_path, ModelDirectory=["default", 3])
    with pytest.raises(ValueError, match="is not a JSON list"):
        _settings(tmp_path, ModelDirectory='["default",')


def test_two_models_admit_a_study_either_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModelDirectory [ct, head]: chest CT and head MR studies get a job, a head CT none."""
    from events import input_series

    from tomoscribe.scope import CHEST_ABDOMEN_CT, HEAD_MR

    ct = _model_folder(tmp_path / "ct", "1.0-ct", CHEST_ABDOMEN_CT)
    head = _model_folder(tmp_path / "head", "1.0-head", HEAD_MR)
    orthanc, plugin = _start_plugin(tmp_path, monkeypatch, ModelDirectory=[str(ct), str(head)])
    try:
        assert plugin.settings.models == (str(ct), str(head))
        assert plugin.settings.model_version == "1.0-ct, 1.0-head"
        assert any("the models read CT of the chest and abdomen (ct) or MR of the head (head)"
                   in line for line in orthanc.logs), orthanc.logs
        orthanc.studies["s1"] = ("1.2.840.1", [_with_body_part(_series("a", "CT"), "CHEST")])
        orthanc.studies["s2"] = ("1.2.840.2", [_with_body_part(_series("b", "MR"), "HEAD")])
        orthanc.studies["s3"] = ("1.2.840.3", [_with_body_part(_series("c", "CT"), "HEAD")])
        for study in ("s1", "s2", "s3"):
            _stable(orthanc, study)
        jobs = plugin.store.list()
        assert sorted((j.study_uid, j.model_version) for j in jobs) == [
            ("1.2.840.1", "1.0-ct, 1.0-head"), ("1.2.840.2", "1.0-ct, 1.0-head")]
        _job, _created, why = plugin.enqueue_study("s3", True)
        assert why == ("outside every model's scope: ct: the model reads CT of the chest and "
                       "abdomen, not Body Part Examined HEAD; head: the model reads MR of the "
                       "head, not CT")
        mixed = [_with_body_part(_series("m", "MR"), "BRAIN"), _series("k", "CT"),
                 _with_body_part(_series("h", "CT"), "HEAD"), _series("u", "US")]
        assert [x["ID"] for x in input_series(mixed, ("CT", "MR"), plugin.scope)] == ["m", "k"]
    finally:
        plugin.supervisor.stop()


def test_the_worker_hands_every_model_to_the_job_function(package: Path, tmp_path: Path) -> None:
    import worker
    from jobs import JobStore

    folder = str(tmp_path / "ct")
    settings = _settings(tmp_path, ModelDirectory=[folder, "head-mr"])
    store = JobStore(settings.db_path)
    store.enqueue("1.2.840.1", "s1", settings.model_version)
    seen: list[Any] = []

    def job_function(*args: Any, **kwargs: Any) -> list[Path]:
        seen.append(kwargs["model_dir"])
        return []

    assert worker.process_one(store, settings, _EmptyStudyClient(),  # type: ignore[arg-type]
                              job_function, "w1")
    assert seen == [[Path(folder), "head-mr"]]


def test_supervisor_restarts_a_dying_worker_with_backoff(tmp_path: Path) -> None:
    settings = load_settings({"StorageDirectory": str(tmp_path),
                              "Tomoscribe": {"Python": "/bin/false"}})
    logs: list[str] = []
    sup = Supervisor(settings, "Bearer x", logs.append, backoff_s=0.05, max_backoff_s=0.2)
    sup.start()
    try:
        deadline = time.monotonic() + 10
        while sup.restarts < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sup.stop()
    assert sup.restarts >= 3 and sup.last_exit == 1
    assert any("restarting in" in line for line in logs)
    assert sup.worker_pid is None


def test_worker_stops_cleanly_on_signals_in_quick_succession(tmp_path: Path) -> None:
    """A stop brings two SIGTERMs close together (supervisor, then parent death):
    the worker must still log a clean stop and exit 0, never a traceback."""
    import contextlib
    import os
    import signal
    import subprocess

    plugin_dir = PLUGIN_SCRIPT.parent
    settings = load_settings({
        "StorageDirectory": str(tmp_path),
        "Tomoscribe": {"Python": sys.executable, "OrthancUrl": "http://127.0.0.1:9",
                       "PollSeconds": 0.05,
                       "JobFunction": str(plugin_dir.parent / "tests" / "plumbing_job.py")
                       + ":run_app"}})
    log = tmp_path / "worker.err"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, str(plugin_dir / "worker.py"),
                                 "--settings", settings.to_json()],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=plugin_dir)
        try:
            deadline = time.monotonic() + 30
            while "ready" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
            # keep signalling until it is gone: some land during its clean-up
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                time.sleep(0.0005)
            assert proc.wait(timeout=5) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "stopping (SIGTERM)" in text and "Traceback" not in text, text


def test_a_standing_question_the_model_does_not_recognise_is_logged_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At startup: a question outside every wording the models match gets one log line.

    The packaged models themselves (their config.json names their domain).
    """
    from settings import unrecognised_questions

    asked = ["Are there any focal findings?", "Does the liver have a lesion?",
             "Segment liver", "Is the brain normal?", "segment the brain"]
    lines = unrecognised_questions(_settings(tmp_path, Questions=asked))
    assert [line.split("'")[1] for line in lines] == ["Is the brain normal?",
                                                      "segment the brain"]
    assert all("\n" not in line and "tomoscribe questions" in line for line in lines)
    # with the head model too, a question either model recognises is not logged
    both = _settings(tmp_path, Questions=asked, ModelDirectory=["default", "head-mr"])
    assert len(unrecognised_questions(both)) == 2
    head = ["is there a cyst in the cerebellum ?"]
    assert unrecognised_questions(_settings(tmp_path, Questions=head)) != []
    assert unrecognised_questions(_settings(tmp_path, Questions=head,
                                            ModelDirectory=["default", "head-mr"])) == []
    # the plugin says so in Orthanc's log when it starts
    orthanc, plugin = _start_plugin(tmp_path, monkeypatch, Questions=["Any lesion?",
                                                                      "Is the brain normal?"])
    plugin.supervisor.stop()
    said = [line for line in orthanc.logs if "standing question" in line]
    assert len(said) == 1 and "'Is the brain normal?'" in said[0]
