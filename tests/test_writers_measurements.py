"""TID 1500 measurement SR of a phantom study: dciodvfy, dsrdump, highdicom read-back.

The study is phantom seed 9 (a liver lesion and a left-lung nodule) written as
a real CT series and loaded by tomoscribe.dicomio. The report is built from
the phantom's ground-truth labels on the loaded grid, the way
``Scribe.generate`` builds one from its segmentation (findings per lesion,
key slices by area), so the test does not depend on the model's training state.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from tomoscribe.dicomio import DEFAULT_RULES, load_series, scan_folder, select_series
from tomoscribe.errors import ReportError
from tomoscribe.phantom import LESION_LABEL, ORGAN_LABELS, make_phantom, render, write_dicom_series
from tomoscribe.report import Answer, Finding, Report, Segment
from tomoscribe.volume import Volume
from tomoscribe.writers import build_seg, write_outputs
from tomoscribe.writers.identity import MEASUREMENTS_SERIES_NUMBER, output_uids
from tomoscribe.writers.measurements import build_measurement_sr, finding_mask

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools")
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk")

LESION_BASE = 10
SHAPE = (40, 96, 96)


def phantom_volume(folder: Path) -> Volume:
    """Phantom seed 9 written as a CT series and loaded back (voxels in HU)."""
    write_dicom_series(make_phantom(9, shape=SHAPE), folder)
    return load_series(select_series(scan_folder(folder), DEFAULT_RULES).chosen)


def phantom_report(volume: Volume) -> Report:
    """A report from the phantom's ground-truth labels on ``volume``'s grid."""
    _, truth = render(make_phantom(9, shape=SHAPE), volume.affine, volume.shape, noise=False)
    names = {v: k for k, v in ORGAN_LABELS.items()}
    label_map = np.where((truth > 1) & (truth != LESION_LABEL), truth, 0).astype(np.uint8)
    segments = [Segment(int(v), names[int(v)], names[int(v)], "organ")
                for v in np.unique(label_map) if v]
    comps, n = ndimage.label(truth == LESION_LABEL)
    findings = []
    _, row_mm, col_mm = volume.spacing
    voxel_ml = float(np.prod(volume.spacing)) / 1e3
    for c in range(1, n + 1):
        mask = comps == c
        around = truth[ndimage.binary_dilation(mask, iterations=2) & ~mask]
        organ = names[int(np.bincount(around[(around > 1) & (around != LESION_LABEL)]).argmax())]
        label = LESION_BASE + c
        label_map[mask] = label
        segments.append(Segment(label, f"{organ} lesion {c}", organ, "lesion"))
        area = mask.sum(axis=(1, 2))
        key = [int(k) for k in np.argsort(-area, kind="stable")[:3] if area[k] > 0]
        rr, cc = np.nonzero(mask[key[0]])
        pts = np.stack([rr * row_mm, cc * col_mm], axis=1)
        size = float(np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()) + row_mm
        findings.append(Finding(f"Lesion in the {organ}, {size:.0f} mm.", organ, key,
                                segment=label, size_mm=round(size, 1),
                                volume_ml=round(float(mask.sum() * voxel_ml), 2)))
    findings.append(Finding("The liver is of normal size.", "liver", [volume.shape[0] // 2]))
    return Report(
        findings=findings,
        impression="Focal lesions in " + " and ".join(f.structure for f in findings[:-1]) + ".",
        text=" ".join(f.text for f in findings),
        answers=[Answer("Is there a liver lesion?", "Yes.", tuple(findings[0].key_slices))],
        slice_scores=np.full(volume.shape[0], 1 / volume.shape[0], np.float32),
        label_map=label_map,
        segments=sorted(segments, key=lambda s: s.label),
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Volume]:
    volume = phantom_volume(tmp_path_factory.mktemp("phantom9"))
    return phantom_report(volume), volume


def run_dciodvfy(path: Path) -> None:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def _on_boundary(points: np.ndarray, mask: np.ndarray) -> bool:
    """Every ``(column, row)`` corner touches a mask pixel and a background pixel."""
    m = np.pad(mask, 1)
    for x, y in points.astype(int):
        around = m[y:y + 2, x:x + 2]  # pixels (y-1..y, x-1..x) of the unpadded mask
        if not (around.any() and not around.all()):
            return False
    return True


@needs_dciodvfy
@needs_dsrdump
def test_measurement_sr_validates_and_reads_back(case: tuple[Report, Volume],
                                                 tmp_path: Path) -> None:
    report, volume = case
    assert sum(f.segment is not None for f in report.findings) == 2  # liver lesion, lung nodule
    seg = build_seg(report, volume)
    assert seg is not None
    sr = build_measurement_sr(report, volume, seg)
    assert sr is not None
    path = tmp_path / "m.dcm"
    sr.save_as(path, enforce_file_format=True)
    run_dciodvfy(path)
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout

    back = hd.sr.srread(path)
    assert back.SeriesNumber == MEASUREMENTS_SERIES_NUMBER
    assert back.VerificationFlag == "UNVERIFIED"
    study = volume.study_instance_uid
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == output_uids(
        study, report.model_version, "measurements")
    groups = back.content.get_planar_roi_measurement_groups()
    measured = [f for f in report.findings if f.segment is not None]
    assert len(groups) == len(measured)
    for group, finding in zip(groups, measured, strict=True):
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert np.array_equal(points[0], points[-1]) and len(points) >= 5  # closed
        k = finding.key_slices[0]
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == volume.slices[k].sop_instance_uid
        mask = np.asarray(report.label_map[k] == finding.segment)
        assert np.array_equal(points, np.round(points))  # pixel corners
        assert _on_boundary(points, mask)
        drawn = finding_mask(report, finding, 1)
        names = {m.name.value: m for m in group.get_measurements()}
        assert names["103339001"].value == pytest.approx(finding.size_mm, abs=0.05)
        _, rmm, cmm = volume.spacing
        assert names["42798000"].value == pytest.approx(drawn.sum() * rmm * cmm, abs=0.1)
        assert group.finding_sites[0].value.value == {"liver": "10200004",
                                                "left lung": "44029006"}[finding.structure]
        seg_refs = [i for i in group[0].ContentSequence if i.ValueType == "IMAGE"]
        assert seg_refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert group.tracking_uid and group.tracking_identifier
    # deterministic: the same job gives the same bytes-relevant identifiers
    again = build_measurement_sr(report, volume, seg)
    assert again is not None and again.SOPInstanceUID == sr.SOPInstanceUID


def test_no_measured_finding_gives_none(case: tuple[Report, Volume]) -> None:
    report, volume = case
    plain = Report(findings=[f for f in report.findings if f.segment is None],
                   impression="x.", text="x.", label_map=report.label_map,
                   segments=report.segments)
    assert build_measurement_sr(plain, volume) is None


def test_bad_reports_are_refused(case: tuple[Report, Volume]) -> None:
    report, volume = case
    first = report.findings[0]
    out_of_range = Report(findings=[Finding(first.text, first.structure, [volume.shape[0]],
                                            first.segment)],
                          impression="x.", text="x.", label_map=report.label_map,
                          segments=report.segments)
    with pytest.raises(ReportError, match="out of range"):
        build_measurement_sr(out_of_range, volume)
    empty_slice = int(np.flatnonzero((report.label_map == first.segment).sum(axis=(1, 2)) == 0)[0])
    empty = Report(findings=[Finding(first.text, first.structure, [empty_slice], first.segment)],
                   impression="x.", text="x.", label_map=report.label_map,
                   segments=report.segments)
    with pytest.raises(ReportError, match="no voxel on its key slice"):
        build_measurement_sr(empty, volume)
    no_text = Report(findings=[Finding(" ", first.structure, first.key_slices, first.segment)],
                     impression="x.", text="x.", label_map=report.label_map,
                     segments=report.segments)
    with pytest.raises(ReportError, match="empty text"):
        build_measurement_sr(no_text, volume)


def test_without_seg_no_segment_reference(case: tuple[Report, Volume], tmp_path: Path) -> None:
    report, volume = case
    sr = build_measurement_sr(report, volume)  # without a SEG: no segment references
    assert sr is not None
    path = tmp_path / "m.dcm"
    sr.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    assert "Referenced Segment" not in str(ds.ContentSequence)
    assert "Image Region" in str(ds.ContentSequence)  # every group keeps its outline


def test_write_outputs_all_or_nothing(case: tuple[Report, Volume], tmp_path: Path) -> None:
    report, volume = case
    written = write_outputs(report, volume, tmp_path / "ok", measurements=True, pdf=True)
    assert [p.name.split("_")[0] for p in written] == ["SR", "SEG", "MEAS", "PDF"]
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == sorted(p.name for p in written)
    first = report.findings[0]
    bad = Report(findings=[*report.findings[1:], Finding(first.text, first.structure,
                                                         [volume.shape[0] + 3], first.segment)],
                 impression="x.", text="x.", label_map=report.label_map,
                 segments=report.segments)
    with pytest.raises(ReportError, match="out of range"):
        write_outputs(bad, volume, tmp_path / "bad", measurements=True, pdf=True)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
