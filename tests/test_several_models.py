"""One installation, several models: each reads the series in its own scope.

Two small untrained models are saved once per module: a chest-abdomen CT
model whose segmentation says "liver" everywhere, and a head MR model. Both
declare the header checks of their scope only (an untrained model's image
check would refuse whatever it reads). Studies are phantoms: a chest-abdomen
CT series and a head MR series in one study, each alone, and a head CT that
neither model reads.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch

from operators.app import STAGING_PREFIX, run_app
from tomoscribe.cli import EXIT_ERROR, EXIT_SKIPPED, main
from tomoscribe.domain import HEAD_MR as HEAD_DOMAIN
from tomoscribe.errors import ModelError, NoSeriesError, OutOfScopeError
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.phantom import SPLITS, make_phantom, write_dicom_series
from tomoscribe.phantom_head import make_head_phantom, write_head_series
from tomoscribe.report import ORGANS
from tomoscribe.scope import CHEST_ABDOMEN_CT, HEAD_MR
from tomoscribe.train import save_model

CT_NET = NetConfig(model_shape=(16, 32, 32), channels=(8, 8, 16, 16))
HEAD_NET = NetConfig.for_domain(HEAD_DOMAIN)
HEAD_NET.model_shape = (16, 32, 32)
HEAD_NET.channels = (8, 8, 16, 16)
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"
QUESTION = "is there a lesion ?"
LIVER_Q, CEREBELLUM_Q = "is there a lesion in the liver ?", "is the cerebellum normal ?"
CT_VERSION, HEAD_VERSION = "0.0.1-ct", "0.0.1-head"


def _ct_model(folder: Path) -> Path:
    torch.manual_seed(0)
    net = ScribeNet(CT_NET)
    bias = net.seg.out.bias
    assert bias is not None
    with torch.no_grad():  # "liver" everywhere: there is always a SEG
        net.seg.out.weight.zero_()
        bias.fill_(-10.0)
        bias[ORGANS.index("liver") + 1] = 10.0
    scope = dataclasses.replace(CHEST_ABDOMEN_CT, anatomy=()).to_dict()
    save_model(net, folder, {"version": CT_VERSION, "scope": scope})
    return folder


def _head_model(folder: Path) -> Path:
    torch.manual_seed(0)
    scope = dataclasses.replace(HEAD_MR, volumes=()).to_dict()
    save_model(ScribeNet(HEAD_NET), folder, {"version": HEAD_VERSION, "scope": scope})
    return folder


def _write_ct(folder: Path, body_part: str | None = None) -> None:
    write_dicom_series(make_phantom(5, lesion_probability=1.0, shape=(16, 48, 48)), folder,
                       study_instance_uid=STUDY_UID, patient_id="ROUTE1")
    if body_part is not None:
        for path in folder.iterdir():
            ds = pydicom.dcmread(path)
            ds.BodyPartExamined = body_part
            ds.save_as(path)


def _write_head(folder: Path) -> None:
    phantom = make_head_phantom(SPLITS["test"][3], plane="axial", shape=(16, 64, 64),
                                lesion_probability=1.0)
    write_head_series(phantom, folder, study_instance_uid=STUDY_UID, patient_id="ROUTE1")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("several")
    ct_model, head_model = _ct_model(base / "ct-model"), _head_model(base / "head-model")
    broken = base / "broken-head"  # a real error, after the CT model has written
    shutil.copytree(head_model, broken)
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    _write_ct(base / "both" / "ct")
    _write_head(base / "both" / "head")
    _write_head(base / "head_only")
    _write_ct(base / "neither", body_part="HEAD")  # a head CT: neither model reads it
    return {"ct": ct_model, "head": head_model, "broken": broken, "both": base / "both",
            "head_only": base / "head_only", "neither": base / "neither"}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _versions(files: list[Path]) -> list[str]:
    """The model version each output was written by (SoftwareVersions: [package, model])."""
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SoftwareVersions[1]) for p in files]


def test_a_study_with_both_series_gets_both_models_outputs(
    data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_app(data["both"], out, model_dir=[data["ct"], data["head"]],
                     questions=[QUESTION, LIVER_Q, CEREBELLUM_Q])
    assert result.models == ["ct-model", "head-model"] and result.skipped == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in result.written)
    srs = [p for p in result.written if p.name.startswith("SR_")]
    assert _versions(srs) == [CT_VERSION, HEAD_VERSION]  # SRs first, in the models' order
    kinds = [p.name.split("_")[0] for p in result.written]
    assert kinds == sorted(kinds, key=["SR", "SEG", "QSEG", "MEAS", "PDF"].index)
    read = {}
    for sr in srs:
        ds = pydicom.dcmread(sr)
        assert ds.StudyInstanceUID == STUDY_UID  # both report on the one study
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        read[str(ds.SoftwareVersions[1])] = str(evidence.SeriesInstanceUID)
    ct_series = pydicom.dcmread(next((data["both"] / "ct").iterdir())).SeriesInstanceUID
    head_series = pydicom.dcmread(next((data["both"] / "head").iterdir())).SeriesInstanceUID
    assert read == {CT_VERSION: ct_series, HEAD_VERSION: head_series}  # each its own series
    # explanation, report, answers and timings: each model's, marked with its name
    assert any(line.startswith("ct-model: ") and "chosen" in line for line in result.explanation)
    assert any(line.startswith("head-model: ") and "chosen" in line
               for line in result.explanation)
    assert result.report_text.startswith("[ct-model]\n") and "\n\n[head-model]\n" in \
        result.report_text
    # a question about one domain's structures goes to that domain's model only
    assert [q for q, _a in result.answers] == [
        f"[ct-model] {QUESTION}", f"[ct-model] {LIVER_Q}",
        f"[head-model] {QUESTION}", f"[head-model] {CEREBELLUM_Q}"]
    assert len(result.answer_slices) == 4
    assert f"ct-model: not asked {CEREBELLUM_Q!r}: it is about MR of the head" in \
        result.explanation
    assert f"head-model: not asked {LIVER_Q!r}: it is about CT of the chest and abdomen" in \
        result.explanation
    assert {"ct-model/language_model", "head-model/language_model", "total"} <= \
        set(result.timings)


def test_a_head_mr_study_gets_the_head_models_outputs_only(
    data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_app(data["head_only"], out, model_dir=[data["ct"], data["head"]])
    assert result.models == ["head-model"]
    assert set(_versions(result.written)) == {HEAD_VERSION}
    assert _leftovers(out) == sorted(p.name for p in result.written)
    [(label, reason)] = result.skipped
    assert label == "ct-model"
    assert reason.startswith("no series the model can read: the model reads CT of the chest "
                             "and abdomen, not MR")
    assert f"ct-model: skipped: {reason}" in result.explanation
    assert not result.report_text.startswith("[ct-model]")


def test_a_study_no_model_reads_is_skipped_with_each_models_reason(
    data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutOfScopeError) as info:
        run_app(data["neither"], out, model_dir=[data["ct"], data["head"]])
    text = str(info.value)
    assert "\n" not in text and text.startswith("no model reads this study: ct-model: ")
    assert "not Body Part Examined HEAD" in text
    assert "; head-model: no series the model can read: the model reads MR of the head, " \
           "not CT" in text
    assert _leftovers(out) == []


def test_a_real_error_of_one_model_publishes_nothing(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """The CT model has written (into staging) when the second model fails to load."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    with pytest.raises(ModelError):
        run_app(data["both"], out, model_dir=[data["ct"], data["broken"]])
    assert _leftovers(out) == ["earlier.txt"]


def test_models_of_one_version_or_listed_twice_are_refused(
    data: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match=r"models head-model and broken-head both have version "
                                         r"0\.0\.1-head: their outputs would get the same UIDs"):
        run_app(data["both"], tmp_path / "a", model_dir=[data["head"], data["broken"]])
    with pytest.raises(ModelError, match="is listed twice"):
        run_app(data["both"], tmp_path / "b", model_dir=[str(data["ct"]), data["ct"]])
    assert _leftovers(tmp_path / "a") == _leftovers(tmp_path / "b") == []


def test_a_study_without_image_series_is_still_an_error(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """Not a skip: no series qualifies under the rules for any model (as with one model)."""
    from pydicom.data import get_testdata_file

    sr_only = tmp_path / "sr_only"
    sr_only.mkdir()
    shutil.copy(str(get_testdata_file("test-SR.dcm")), sr_only / "report.dcm")
    with pytest.raises(NoSeriesError, match=r"^no series qualifies") as info:
        run_app(sr_only, tmp_path / "out", model_dir=[data["ct"], data["head"]])
    assert not isinstance(info.value, OutOfScopeError)


# ---------------------------------------------------------------- the CLI


def test_cli_repeated_model_names(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """``-m`` twice, by packaged names; then a study none of them reads: exit 3, nothing."""
    package = tmp_path / "package"
    package.mkdir()
    (package / "weights-ct").symlink_to(data["ct"])
    (package / "weights-head").symlink_to(data["head"])
    monkeypatch.setattr("tomoscribe.scope.PACKAGE_DIR", package)
    out = tmp_path / "out"
    assert main(["run", "-i", str(data["head_only"]), "-o", str(out), "-m", "ct",
                 "-m", "head"]) == 0
    captured = capfd.readouterr()
    assert "ct: skipped: no series the model can read" in captured.out
    assert "[head]" in captured.out and "wrote " in captured.out
    assert set(_versions(sorted(out.iterdir()))) == {HEAD_VERSION}

    none = tmp_path / "none"
    assert main(["run", "-i", str(data["neither"]), "-o", str(none), "-m", "ct",
                 "-m", "head"]) == EXIT_SKIPPED
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tomoscribe: skipped: no model reads this study: ")
    assert _leftovers(none) == []

    assert main(["run", "-i", str(data["both"]), "-o", str(none), "-m", "ct",
                 "-m", "head-ct"]) == EXIT_ERROR
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["tomoscribe: error: no model named 'head-ct': the packaged models are "
                   f"default, ct, head, and there is no folder {Path.cwd() / 'head-ct'}"]
    assert _leftovers(none) == []


def test_cli_models_listed_in_the_settings(
    data: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(f"tomoscribe:\n  model: [{data['ct']}, {data['head']}]\n"
                      "  outputs: {seg: false, measurements: false, pdf: false}\n")
    out = tmp_path / "out"
    assert main(["run", "-i", str(data["both"]), "-o", str(out), "-c", str(config)]) == 0
    assert [p.name[:3] for p in sorted(out.iterdir())] == ["SR_", "SR_"]
    assert sorted(_versions(sorted(out.iterdir()))) == [CT_VERSION, HEAD_VERSION]
    assert capfd.readouterr().err.count("tomoscribe:") == 0


@pytest.fixture(autouse=True)
def _no_staging_left(tmp_path: Path) -> Iterator[None]:
    yield
    for p in tmp_path.rglob(f"{STAGING_PREFIX}*"):
        raise AssertionError(f"staging folder left behind: {p}")
