"""SR writer: a hand-made report on a small CT series, checked by real validators.

The CT series is built here from scratch (16 axial slices of 48x48, CT Image
Storage), written to disk and read back without pixel data, exactly as the
loader hands headers to the writers. The SR is checked with dciodvfy
(dicom3tools), dsrdump (dcmtk) and highdicom's reader.

The helpers ``make_series``, ``make_volume``, ``lesion_report``,
``normal_report`` and ``run_dciodvfy`` are also used by test_writers_seg.py.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import tomoscribe
from tomoscribe.errors import OutputError, ReportError
from tomoscribe.report import Answer, Finding, Report, Segment
from tomoscribe.volume import SliceRef, Volume
from tomoscribe.writers import (
    SR_SERIES_NUMBER,
    build_sr,
    is_tomoscribe_output,
    output_uids,
    write_outputs,
)

D, H, W = 16, 48, 48
SPACING = (0.8, 0.8)  # mm, rows / columns
THICKNESS = 2.5  # mm

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools")
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk")


# --------------------------------------------------------------------- fixtures
def make_series(folder: Path, seed: int = 0) -> list[Path]:
    """Write a 16-slice axial CT series (with pixels) to ``folder``; return the paths."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid, for_uid = (generate_uid() for _ in range(3))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(D):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AcquisitionNumber = 1
        ds.AccessionNumber = "ACC123"
        ds.Modality = "CT"
        ds.Manufacturer = "ACME"
        ds.ReferringPhysicianName = "Ref^Doctor"
        ds.StudyDescription = "CT abdomen"
        ds.SeriesDescription = "abdomen 2.5mm"
        ds.PatientName = "Test^Patient"
        ds.PatientID = "P0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "ABDOMEN"
        ds.KVP = "120"
        ds.SliceThickness = str(THICKNESS)
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "S1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-19.2, -19.2, -THICKNESS * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = -THICKNESS * k
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = H, W
        ds.PixelSpacing = list(SPACING)
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = rng.integers(-100, 100, (H, W), dtype=np.int16).tobytes()
        path = folder / f"ct{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_volume(paths: list[Path]) -> Volume:
    """Read the series back without pixel data and build its Volume by hand."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    headers.sort(key=lambda h: -float(h.ImagePositionPatient[2]))  # head first: k = 0 top
    first = headers[0]
    row_cos = np.array(first.ImageOrientationPatient[:3], float)
    col_cos = np.array(first.ImageOrientationPatient[3:], float)
    p0 = np.array(first.ImagePositionPatient, float)
    p1 = np.array(headers[1].ImagePositionPatient, float)
    affine = np.eye(4)
    affine[:3, 0] = p1 - p0
    affine[:3, 1] = col_cos * float(first.PixelSpacing[0])
    affine[:3, 2] = row_cos * float(first.PixelSpacing[1])
    affine[:3, 3] = p0
    return Volume(
        voxels=np.zeros((D, H, W), np.float32),
        affine=affine,
        slices=[SliceRef(str(h.SOPInstanceUID), str(h.SOPClassUID)) for h in headers],
        headers=headers,
        modality="CT",
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
    )


LIVER, LESION = 1, 2


def lesion_report() -> Report:
    """Two findings: a liver lesion (segment 2) and an enlarged liver (segment 1)."""
    label_map = np.zeros((D, H, W), np.uint8)
    label_map[3:12, 8:40, 6:30] = LIVER  # 9 slices of liver
    label_map[6:9, 18:24, 12:18] = LESION  # 3 slices of lesion inside it
    findings = [
        Finding("Hypodense lesion in the liver, 5.0 mm.", "liver", [7, 6, 8],
                segment=LESION, size_mm=5.0, volume_ml=0.07),
        Finding("The liver is enlarged.", "liver", [5], segment=LIVER, volume_ml=11.06),
    ]
    return Report(
        findings=findings,
        impression="Hypodense liver lesion; hepatomegaly.",
        text="Hypodense lesion in the liver, 5.0 mm. The liver is enlarged. "
             "Impression: hypodense liver lesion; hepatomegaly.",
        answers=[Answer("Is there a liver lesion?", "Yes, one lesion (Ø 5 mm ≥ 3 mm).", (7,)),
                 Answer("Is there a lung nodule?", "No.")],
        slice_scores=np.full(D, 1 / D, np.float32),
        label_map=label_map,
        segments=[Segment(LIVER, "liver", "liver", "organ"),
                  Segment(LESION, "liver lesion 1", "liver", "lesion")],
        model_name="tomoscribe-tiny",
        model_version="0.1.0",
    )


def normal_report() -> Report:
    """A normal study: no findings, no segments."""
    return Report(
        findings=[],
        impression="No focal abnormality detected.",
        text="No focal abnormality detected.",
        label_map=np.zeros((D, H, W), np.uint8),
    )


def run_dciodvfy(path: Path) -> str:
    """Run dciodvfy; fail on any line with 'Error'; return its output (warnings)."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    print(out)  # warnings are shown with pytest -s
    errors = [line for line in out.splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)
    return out


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return make_volume(make_series(tmp_path_factory.mktemp("ct")))


def _texts(sr: Dataset, name_value: str) -> list[str]:
    items = hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.TEXT,
                                           recursive=True)
    return [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == name_value]


def _image_refs(sr: Dataset) -> list[str]:
    items = hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.IMAGE,
                                           recursive=True)
    return [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items]


# ------------------------------------------------------------------------ tests
@needs_dciodvfy
@needs_dsrdump
def test_sr_validates_and_reads_back(series: Volume, tmp_path: Path) -> None:
    report = lesion_report()
    paths = write_outputs(report, series, tmp_path)
    sr_path = next(p for p in paths if p.name.startswith("SR_"))
    run_dciodvfy(sr_path)
    dump = subprocess.run(["dsrdump", "+Pl", str(sr_path)], capture_output=True, text=True,
                          timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "Hypodense lesion in the liver" in dump.stdout

    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == series.study_instance_uid
    assert sr.PatientID == "P0001" and str(sr.PatientName) == "Test^Patient"
    assert sr.CompletionFlag == "PARTIAL" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.Manufacturer == tomoscribe.MANUFACTURER
    assert sr.ManufacturerModelName == report.model_name
    assert list(sr.SoftwareVersions) == [tomoscribe.__version__, report.model_version]
    assert sr.SeriesNumber == SR_SERIES_NUMBER
    assert is_tomoscribe_output(sr)
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99TOMO"

    assert _texts(sr, "121071") == [f.text for f in report.findings]
    assert _texts(sr, "121073") == [report.impression]
    assert _texts(sr, "Q") == [a.question for a in report.answers]
    assert _texts(sr, "A") == [a.answer for a in report.answers]

    refs = _image_refs(sr)
    expected = [series.slices[k].sop_instance_uid for f in report.findings for k in f.key_slices]
    seg_uid = next(p for p in paths if p.name.startswith("SEG_")).name[4:-4]
    # key slices in the report's order (most relevant first), then the answer's
    assert [r for r in refs if r != seg_uid] == [*expected, series.slices[7].sop_instance_uid]
    assert seg_uid in refs  # findings with a segment reference the SEG
    evidence = {e.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for e in s.ReferencedSOPSequence}
    assert {s.sop_instance_uid for s in series.slices} | {seg_uid} == evidence
    # numbers survive the round trip
    nums = hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.NUM,
                                          recursive=True)
    values = sorted(float(n.MeasuredValueSequence[0].NumericValue) for n in nums)
    assert values == [0.07, 5.0, 11.06]


@needs_dciodvfy
@needs_dsrdump
def test_normal_study_still_gets_an_sr(series: Volume, tmp_path: Path) -> None:
    paths = write_outputs(normal_report(), series, tmp_path)
    assert [p.name[:3] for p in paths] == ["SR_"]  # no voxels, no SEG
    run_dciodvfy(paths[0])
    assert subprocess.run(["dsrdump", str(paths[0])], capture_output=True).returncode == 0
    sr = hd.sr.srread(paths[0])
    assert _texts(sr, "121071") == ["No focal abnormality detected."]
    assert _texts(sr, "121073") == ["No focal abnormality detected."]
    assert _image_refs(sr) == []


def test_uids_are_deterministic(series: Volume, tmp_path: Path) -> None:
    a = build_sr(lesion_report(), series)
    b = build_sr(lesion_report(), series)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == output_uids(
        series.study_instance_uid, "0.1.0", "sr")
    other = lesion_report()
    other.model_version = "0.2.0"
    assert build_sr(other, series).SOPInstanceUID != a.SOPInstanceUID
    assert output_uids("1.2.3", "0.1.0", "sr") != output_uids("1.2.3", "0.1.0", "seg")
    first = write_outputs(lesion_report(), series, tmp_path / "one")
    second = write_outputs(lesion_report(), series, tmp_path / "one")
    assert [p.name for p in first] == [p.name for p in second]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in first)


def _break(change: str) -> Report:
    report = lesion_report()
    if change == "empty text":
        report.findings[0].text = "  "
    elif change == "slice out of range":
        report.findings[0].key_slices = [3, D]
    elif change == "negative slice":
        report.findings[1].key_slices = [-1]
    elif change == "no key slice":
        report.findings[1].key_slices = []
    elif change == "unknown segment":
        report.findings[0].segment = 9
    elif change == "unnamed segment":
        report.segments[1] = Segment(LESION, " ", "liver", "lesion")
    elif change == "unknown structure":
        report.findings[0].structure = "pancreas"
    elif change == "empty impression":
        report.impression = ""
    elif change == "label without segment":
        report.label_map[0, 0, 0] = 7
    elif change == "label map shape":
        report.label_map = report.label_map[:-1]
    elif change == "answer slice":
        report.answers = [Answer("Q?", "A.", (99,))]
    return report


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("empty text", "finding 1 has an empty text"),
        ("slice out of range", "key slice 16 is out of range 0..15"),
        ("negative slice", "key slice -1 is out of range"),
        ("no key slice", "has no key slice"),
        ("unknown segment", "segment label 9"),
        ("unnamed segment", "has no name"),
        ("unknown structure", "unknown structure 'pancreas'"),
        ("empty impression", "empty impression"),
        ("label without segment", r"label\(s\) \[7\] that no segment"),
        ("label map shape", "label map has shape"),
        ("answer slice", "answer 1: key slice 99"),
    ],
)
def test_malformed_report_is_refused(series: Volume, tmp_path: Path, change: str,
                                     message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ReportError, match=message) as info:
        write_outputs(_break(change), series, out)
    assert "\n" not in str(info.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_volume_without_headers_is_refused(series: Volume) -> None:
    bare = copy.copy(series)
    bare.headers = []
    with pytest.raises(ReportError, match="no source headers"):
        build_sr(normal_report(), bare)


def test_full_disk_leaves_nothing(series: Volume, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the SR is on disk, the SEG hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match="No space left on device") as info:
        write_outputs(lesion_report(), series, tmp_path)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"Manufacturer": "tomoscribe", "SeriesDescription": "x"}, True),
        ({"Manufacturer": " TomoScribe "}, True),
        ({"Manufacturer": "ACME", "SeriesDescription": "tomoscribe draft report"}, True),
        ({"0008,0070": {"Name": "Manufacturer", "Value": "tomoscribe"}}, True),
        ({"Manufacturer": "ACME", "SeriesDescription": "abdomen 2.5mm"}, False),
        ({}, False),
    ],
)
def test_is_tomoscribe_output_on_orthanc_tags(tags: dict[str, object], expected: bool) -> None:
    assert is_tomoscribe_output(tags) is expected


def test_is_tomoscribe_output_on_source(series: Volume) -> None:
    assert not is_tomoscribe_output(series.headers[0])
