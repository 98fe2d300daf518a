"""Against a real Orthanc 1.10 with the tomoscribe plugin, in a loopback-only namespace.

Two servers:

* PLUMBING tests (``plumbing_job.run_app``, no model): enqueue on C-STORE,
  outputs stored once, no second job from our own outputs or a re-send,
  rerun, and a worker killed mid-job is restarted and finishes the job.
* The real end-to-end test with the default job function
  ``operators.app:run_app`` (skipped only while that is not importable).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc_harness import OrthancServer, orthanc_server, unavailable_reason
from pydicom.uid import generate_uid

from tomoscribe.dicomio.synth import write_series
from tomoscribe.phantom import make_phantom, write_dicom_series

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

_REASON = unavailable_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=f"no namespaced Orthanc here: {_REASON}"))

PLUMBING_JOB = Path(__file__).resolve().parent / "plumbing_job.py"
STABLE_AGE = 2


# -- helpers ------------------------------------------------------------------------------


def write_study(out: Path, seed: int, n_slices: int | None = None) -> tuple[Path, str]:
    """A phantom CT study (optionally only its first ``n_slices``); returns (folder, UID)."""
    files = write_dicom_series(make_phantom(seed), out)
    if n_slices is not None:
        for path in files[n_slices:]:
            path.unlink()
    return out, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def find_study(server: OrthancServer, study_uid: str) -> str | None:
    found = server.request("POST", "/tools/lookup", study_uid.encode()).json()
    return next((f["ID"] for f in found if f["Type"] == "Study"), None)


#: our optional outputs, told apart from the draft SR by their series number
_OPTIONAL_SERIES = {"9903": "MEAS", "9904": "PDF", "9905": "QSEG"}


def own_series(server: OrthancServer, study_id: str) -> dict[str, list[str]]:
    """Kind -> instance ids of tomoscribe's series in the study.

    The kind is the modality (SR, SEG), or MEAS / PDF / QSEG for the measurement
    SR, the encapsulated PDF report and the referring answers' masks.
    """
    out: dict[str, list[str]] = {}
    for series in server.get_json(f"/studies/{study_id}/series"):
        tags = series["MainDicomTags"]
        if tags.get("Manufacturer") == "tomoscribe":
            kind = _OPTIONAL_SERIES.get(str(tags.get("SeriesNumber")), tags["Modality"])
            out.setdefault(kind, []).extend(series["Instances"])
    return out


def job_for(server: OrthancServer, study_uid: str) -> list[dict[str, Any]]:
    return [j for j in server.get_json("/tomoscribe/jobs") if j["study_uid"] == study_uid]


def wait_job_settled(server: OrthancServer, study_uid: str, timeout: float) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        jobs = job_for(server, study_uid)
        return jobs[0] if jobs and jobs[0]["state"] in ("done", "failed", "skipped") else None

    return server.wait_for(settled, timeout, 0.5, f"the job for {study_uid}")


def check_outputs(server: OrthancServer, study_id: str, tmp: Path) -> dict[str, Path]:
    """Download our SR and SEG, validate with dciodvfy, read back; return their paths."""
    import highdicom as hd

    outputs = own_series(server, study_id)
    assert {"SEG", "SR"} <= set(outputs) <= {"SEG", "SR", "MEAS", "PDF", "QSEG"}, outputs
    assert all(len(ids) == 1 for ids in outputs.values()), outputs
    paths = {}
    for modality, (instance_id,) in outputs.items():
        path = tmp / f"{modality}.dcm"
        resp = server.request("GET", f"/instances/{instance_id}/file")
        assert resp.status == 200
        path.write_bytes(resp.body)
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if "Error" in ln]
        assert errors == [], f"dciodvfy on our {modality}: {errors}"
        paths[modality] = path
    seg = hd.seg.segread(paths["SEG"])
    assert seg.number_of_segments >= 1
    sr = pydicom.dcmread(paths["SR"])
    assert sr.Manufacturer == "tomoscribe"
    return paths


def sr_references(path: Path) -> set[str]:
    """The SOP Instance UIDs the SR's content items reference."""
    def walk(items: Any) -> Iterator[str]:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                yield str(ref.ReferencedSOPInstanceUID)
            yield from walk(item.get("ContentSequence", []))

    return set(walk(pydicom.dcmread(path).ContentSequence))


def sr_text(path: Path) -> str:
    """All TEXT values of an SR, depth first."""
    def walk(items: Any) -> Iterator[str]:
        for item in items:
            if item.get("ValueType") == "TEXT":
                yield str(item.TextValue)
            yield from walk(item.get("ContentSequence", []))

    return " | ".join(walk(pydicom.dcmread(path).get("ContentSequence", [])))


# -- plumbing: the plugin's mechanics, with a stand-in job function -----------------------


@pytest.fixture(scope="module")
def plumbing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    root = tmp_path_factory.mktemp("orthanc-plumbing")
    control = root / "control"
    control.mkdir()
    with orthanc_server(root / "server", {
            "JobFunction": f"{PLUMBING_JOB}:run_app", "LeaseSeconds": 3, "MaxAttempts": 3,
            "Questions": ["Is there a lesion?"]},
            stable_age=STABLE_AGE, env={"TOMOSCRIBE_PLUMBING_DIR": str(control)}) as server:
        yield server


def test_plumbing_study_gets_outputs_once(plumbing_server: OrthancServer, tmp_path: Path) -> None:
    """PLUMBING TEST (stand-in job function): enqueue, store, idempotence, rerun."""
    server = plumbing_server
    folder, study_uid = write_study(tmp_path / "study", seed=11, n_slices=24)
    server.storescu(folder)
    job = wait_job_settled(server, study_uid, timeout=90)
    assert job["state"] == "done", job
    study_id = find_study(server, study_uid)
    assert study_id is not None and study_id == job["orthanc_study_id"]
    paths = check_outputs(server, study_id, tmp_path)
    assert "PLUMBING TEST: 24 slices" in sr_text(paths["SR"])
    assert "Is there a lesion?" in sr_text(paths["SR"])
    stored = own_series(server, study_id)
    assert sorted(job["outputs"]) == sorted(stored["SR"] + stored["SEG"])

    # Our own SR/SEG landing fires STABLE_STUDY again: seen, and no second job.
    def second_stable() -> bool:
        return bool(server.get_json("/tomoscribe/health")["events"]["already_known"] >= 1)

    server.wait_for(second_stable, 30, what="the second STABLE_STUDY")
    # A re-send of the whole study: still one job, one SR, one SEG.
    server.storescu(folder)
    time.sleep(STABLE_AGE + 3)
    jobs = job_for(server, study_uid)
    assert len(jobs) == 1 and jobs[0]["state"] == "done" and jobs[0]["attempts"] == 1
    assert {m: len(ids) for m, ids in own_series(server, study_id).items()} == {"SR": 1, "SEG": 1}

    # Rerun: POST-only, needs the anti-CSRF header, replaces the outputs (same UIDs).
    path = f"/tomoscribe/studies/{study_id}/rerun"
    assert server.request("GET", path).status == 405
    assert server.request("POST", path).status == 403
    assert server.request("POST", path, auth=False, headers={"X-Requested-With": "t"}).status == 401
    resp = server.request("POST", path, headers={"X-Requested-With": "test"})
    assert resp.status == 200 and resp.json()["requeued"] is True
    time.sleep(1)
    job = wait_job_settled(server, study_uid, timeout=90)
    assert job["state"] == "done" and job["force"] is False
    assert {m: len(ids) for m, ids in own_series(server, study_id).items()} == {"SR": 1, "SEG": 1}
    one = server.get_json(f"/tomoscribe/jobs/{job['id']}")
    assert one["study_uid"] == study_uid and one["state"] == "done"


def test_plumbing_failure_is_one_line(plumbing_server: OrthancServer, tmp_path: Path) -> None:
    """PLUMBING TEST: a TomoscribeError from the job function is the job's one-line reason."""
    server = plumbing_server
    control = Path(server.config["Tomoscribe"]["StorageDirectory"]).parent.parent / "control"
    (control / "fail").write_text("the series is a scout\nnot a volume")
    try:
        folder, study_uid = write_study(tmp_path / "study", seed=12, n_slices=8)
        server.storescu(folder)
        job = wait_job_settled(server, study_uid, timeout=60)
    finally:
        (control / "fail").unlink()
    assert job["state"] == "failed" and job["reason"] == "the series is a scout not a volume"
    assert own_series(server, job["orthanc_study_id"]) == {}


def test_study_outside_the_models_scope_gets_no_job(plumbing_server: OrthancServer,
                                                    tmp_path: Path) -> None:
    """An MR study reaches the PACS; the model reads chest-abdomen CT: no job, and the reason."""
    server = plumbing_server

    def skipped() -> int:
        return int(server.get_json("/tomoscribe/health")["events"]["not_qualifying"])

    before = skipped()
    study_uid = generate_uid()
    write_series(tmp_path / "mr", n=12, modality="MR", slope=1.0, intercept=0.0,
                 study_uid=study_uid, description="T1 axial")
    server.storescu(tmp_path / "mr")
    server.wait_for(lambda: skipped() > before, STABLE_AGE + 30, what="the MR study skipped")
    assert job_for(server, study_uid) == []
    study_id = find_study(server, study_uid)
    resp = server.request("POST", f"/tomoscribe/studies/{study_id}/rerun",
                          headers={"X-Requested-With": "test"})
    assert resp.status == 422
    assert resp.json()["error"] == ("outside the model's scope: the model reads CT of the chest"
                                    " and abdomen, not MR")
    assert job_for(server, study_uid) == []


def test_plumbing_worker_killed_midjob_is_restarted(plumbing_server: OrthancServer,
                                                    tmp_path: Path) -> None:
    """PLUMBING TEST: SIGKILL the worker mid-job; a new worker finishes the job, once."""
    server = plumbing_server
    control = Path(server.config["Tomoscribe"]["StorageDirectory"]).parent.parent / "control"
    (control / "slow").write_text("120")
    try:
        folder, study_uid = write_study(tmp_path / "study", seed=13, n_slices=8)
        before = server.get_json("/tomoscribe/health")
        server.storescu(folder)
        started = control / "started"
        server.wait_for(started.exists, 60, what="the job function to start")
        victim = int(started.read_text())
        assert victim == before["worker_pid"]
        os.kill(victim, signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            health = server.get_json("/tomoscribe/health")
            ok = health["worker_alive"] and health["worker_pid"] != victim
            return health if ok else None

        health = server.wait_for(restarted, 30, what="a new worker")
        assert health["worker_restarts"] == before["worker_restarts"] + 1
        job = wait_job_settled(server, study_uid, timeout=60)  # lease 3 s, then re-claimed
    finally:
        for name in ("slow", "started"):
            (control / name).unlink(missing_ok=True)
    assert job["state"] == "done" and job["attempts"] == 2, job
    assert {m: len(ids) for m, ids in own_series(server, job["orthanc_study_id"]).items()} == {
        "SR": 1, "SEG": 1}


# -- the real thing: default job function (operators.app.run_app) -------------------------


def _run_app_missing() -> str | None:
    try:
        from operators.app import run_app  # noqa: F401
    except ImportError as exc:
        return f"operators.app.run_app is not importable yet ({exc})"
    return None


def test_real_app_end_to_end(tmp_path: Path) -> None:
    """C-STORE a phantom CT; the real app's SR + SEG land once in the same study.

    The plugin asks a question and a referring one: the SR holds both answers,
    the mask answering "segment the liver ." lands as its own SEG series and
    the SR points at it. Then a head CT without Body Part Examined: the job
    ends ``skipped`` with the image check's reason.
    """
    missing = _run_app_missing()
    if missing:
        pytest.skip(missing)
    folder, study_uid = write_study(tmp_path / "study", seed=7)
    from tomoscribe.model.scribe import DEFAULT_MODEL_DIR

    assert (DEFAULT_MODEL_DIR / "model.pt").is_file(), "the shipped default model is missing"
    questions = ["is there a lesion in the liver ?", "segment the liver ."]
    with orthanc_server(tmp_path / "server", {"LeaseSeconds": 30, "Questions": questions},
                        stable_age=STABLE_AGE) as server:
        t0 = time.monotonic()
        server.storescu(folder)
        job = wait_job_settled(server, study_uid, timeout=420)
        assert job["state"] == "done", f"{job['reason']}\n{server.worker_log()[-3000:]}"
        study_id = job["orthanc_study_id"]
        paths = check_outputs(server, study_id, tmp_path)
        dump = subprocess.run(["dsrdump", str(paths["SR"])], capture_output=True, text=True)
        assert dump.returncode == 0 and "error" not in dump.stderr.lower(), dump.stderr
        assert sr_text(paths["SR"]).strip(), "the SR has no text"
        texts = sr_text(paths["SR"])
        assert all(q in texts for q in questions), texts
        # the answer to a templated question is the report's: "Yes" exactly when
        # a finding sentence names the liver
        answer = texts.split(questions[0] + " | ", 1)[1]
        liver_reported = any(t.startswith("Liver:") for t in texts.split(" | "))
        assert answer.startswith("Yes" if liver_reported else "No"), texts
        qseg = pydicom.dcmread(paths["QSEG"])
        assert [s.SegmentLabel for s in qseg.SegmentSequence] == ["Q2: segment the liver"]
        assert qseg.SOPInstanceUID in sr_references(paths["SR"])
        print(f"study to report: {time.monotonic() - t0:.1f} s")

        server.wait_for(lambda: server.get_json("/tomoscribe/health")["events"][
            "already_known"] >= 1, 30, what="the second STABLE_STUDY")
        server.storescu(folder)
        time.sleep(STABLE_AGE + 3)
        jobs = job_for(server, study_uid)
        assert len(jobs) == 1 and jobs[0]["state"] == "done" and jobs[0]["attempts"] == 1
        # the default outputs: draft SR, SEG, the PDF report, the answer SEG, and the
        # measurement SR when a finding was measured; each exactly once
        after = {m: len(ids) for m, ids in own_series(server, study_id).items()}
        assert after == {kind: 1 for kind in paths}, after
        assert {"PDF", "QSEG"} <= set(after)

        # a head CT without Body Part Examined passes the plugin's header check; the
        # model's image check declines it in the worker: skipped, not failed, nothing stored
        from tomoscribe.phantom_head import make_head_phantom, write_head_series

        head = make_head_phantom(3, modality="CT")
        head_uid = generate_uid()
        write_head_series(head, tmp_path / "head", study_instance_uid=head_uid, body_part="")
        server.storescu(tmp_path / "head")
        skipped = wait_job_settled(server, head_uid, timeout=300)
        assert skipped["state"] == "skipped", skipped
        assert skipped["reason"].startswith(
            "the image does not look like CT of the chest and abdomen: "), skipped["reason"]
        assert own_series(server, skipped["orthanc_study_id"]) == {}
        assert server.get_json("/tomoscribe/health")["jobs"]["skipped"] == 1


def test_no_processes_left_behind(tmp_path: Path) -> None:
    """Stopping the server stops the worker too: nothing is left in the namespace."""
    with orthanc_server(tmp_path, {"JobFunction": f"{PLUMBING_JOB}:run_app"}) as server:
        pid = server.wait_for(lambda: server.get_json("/tomoscribe/health")["worker_pid"], 30,
                              what="the worker")
        assert pid in server.processes_in_netns()
        # the worker re-executed itself with what holoscan needs (stack, CUDA runtime path)
        server.wait_for(lambda: "ready" in server.worker_log(), 30, what="the worker")
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(ln.startswith("Max stack size") and "33554432" in ln
                   for ln in limits.splitlines()), limits
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ld = next((e for e in environ if e.startswith(b"LD_LIBRARY_PATH=")), b"")
        assert b"nvidia" in ld, ld
    assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert not Path(f"/proc/{server.pid}").exists() or _is_zombie(server.pid)
    assert "stopping (SIGTERM)" in server.worker_log()  # a clean stop, not a kill


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_missing_job_function_is_reported(tmp_path: Path) -> None:
    """A job function that cannot be imported: the worker exits 3, health says so, jobs wait."""
    with orthanc_server(tmp_path, {"JobFunction": "no_such_module_here:run_app"}) as server:
        health = server.wait_for(
            lambda: (h := server.get_json("/tomoscribe/health"))["worker_last_exit"] == 3 and h,
            30, what="the worker to give up")
        assert health["worker_restarts"] >= 1
        assert "cannot load the job function no_such_module_here:run_app" in server.worker_log()
