"""SEG writer: the label map of a hand-made report, checked by dciodvfy and highdicom.

Uses the synthetic CT series and reports of test_writers_sr.py.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_writers_sr import (
    LESION,
    LIVER,
    lesion_report,
    make_series,
    make_volume,
    needs_dciodvfy,
    normal_report,
    run_dciodvfy,
)

import tomoscribe
from tomoscribe.errors import ReportError
from tomoscribe.report import Segment
from tomoscribe.volume import Volume
from tomoscribe.writers import SEG_SERIES_NUMBER, build_seg, build_sr, is_tomoscribe_output
from tomoscribe.writers.codes import STRUCTURE_CODES
from tomoscribe.writers.seg import segment_numbers


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return make_volume(make_series(tmp_path_factory.mktemp("ct"), seed=1))


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@needs_dciodvfy
def test_seg_validates_and_round_trips(series: Volume, tmp_path: Path) -> None:
    report = lesion_report()
    report.segments.append(Segment(3, "spleen", "spleen", "organ"))  # no voxels: skipped
    seg = build_seg(report, series)
    assert seg is not None
    path = _write(seg, tmp_path / "seg.dcm")
    run_dciodvfy(path)

    back = hd.seg.segread(path)
    assert back.SegmentationType == "BINARY"
    assert back.StudyInstanceUID == series.study_instance_uid
    assert back.FrameOfReferenceUID == series.frame_of_reference_uid
    assert back.Manufacturer == tomoscribe.MANUFACTURER
    assert back.ManufacturerModelName == report.model_name
    assert list(back.SoftwareVersions) == [tomoscribe.__version__, report.model_version]
    assert back.SeriesNumber == SEG_SERIES_NUMBER
    assert is_tomoscribe_output(back)
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_instance_uid

    # segments: liver (organ) then the lesion; the empty spleen is left out
    items = list(back.SegmentSequence)
    assert [i.SegmentLabel for i in items] == ["liver", "liver lesion 1"]
    assert [i.SegmentNumber for i in items] == [1, 2]
    assert segment_numbers(report) == {LIVER: 1, LESION: 2}
    liver, lesion = items
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert lesion.AnatomicRegionSequence[0].CodeValue == "10200004"
    for item in items:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == report.model_name
        assert algo.AlgorithmVersion == report.model_version
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI

    # every frame: one segment on one source slice, equal to the label map there
    label_map = report.label_map
    slice_of = {s.sop_instance_uid: k for k, s in enumerate(series.slices)}
    frames = back.pixel_array.reshape(-1, label_map.shape[1], label_map.shape[2])
    expected_frames = sum(int((label_map == lab).any(axis=(1, 2)).sum()) for lab in (1, 2))
    assert int(back.NumberOfFrames) == expected_frames == 12  # 9 liver + 3 lesion slices
    label_of = {1: LIVER, 2: LESION}
    for frame, item in zip(frames, back.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[src]
        np.testing.assert_array_equal(frame.astype(bool), label_map[k] == label_of[number])
        position = item.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position],
                                   series.index_to_lps(np.array([[k, 0, 0]]))[0])

    # highdicom's own reconstruction, in slice order
    uids = [s.sop_instance_uid for s in series.slices]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False)
    assert pixels.shape == label_map.shape
    for label, number in ((LIVER, 1), (LESION, 2)):
        assert int((pixels == number).sum()) == int((label_map == label).sum()) > 0
        np.testing.assert_array_equal(pixels == number, label_map == label)


def test_seg_uids_are_deterministic(series: Volume) -> None:
    a, b = build_seg(lesion_report(), series), build_seg(lesion_report(), series)
    assert a is not None and b is not None
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert (a.SegmentSequence[1].TrackingUID == b.SegmentSequence[1].TrackingUID)
    sr = build_sr(lesion_report(), series)
    assert a.SOPInstanceUID != sr.SOPInstanceUID
    assert a.SeriesInstanceUID != sr.SeriesInstanceUID


def test_no_voxels_no_seg(series: Volume) -> None:
    assert build_seg(normal_report(), series) is None
    report = lesion_report()
    report.label_map[:] = 0
    assert build_seg(report, series) is None


@needs_dciodvfy
def test_single_segment_seg_and_its_sr_reference(series: Volume, tmp_path: Path) -> None:
    """A SEG with only the lesion, and the SR that points at it by UID."""
    report = lesion_report()
    report.label_map[report.label_map == LIVER] = 0
    report.segments = [s for s in report.segments if s.label == LESION]
    report.findings = report.findings[:1]
    seg = build_seg(report, series)
    assert seg is not None and len(seg.SegmentSequence) == 1
    run_dciodvfy(_write(seg, tmp_path / "seg.dcm"))
    sr = build_sr(report, series, seg=seg)
    run_dciodvfy(_write(sr, tmp_path / "sr.dcm"))
    refs = hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.IMAGE,
                                          recursive=True)
    to_seg = [r for r in refs if r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              == seg.SOPInstanceUID]
    assert len(to_seg) == 1
    assert to_seg[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == 1


def test_sr_refuses_a_foreign_seg(series: Volume) -> None:
    seg = build_seg(lesion_report(), series)
    other = lesion_report()
    other.segments = [Segment(LIVER, "hepar", "liver", "organ"), other.segments[1]]
    with pytest.raises(ReportError, match="not built from this report"):
        build_sr(other, series, seg=seg)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([Segment(LIVER, "liver", "liver", "organ"), Segment(LESION, "", "liver", "lesion")],
         "label 2 has no name"),
        ([Segment(LIVER, "liver", "liver", "organ"), Segment(LESION, "x", "pancreas", "lesion")],
         "unknown structure 'pancreas'"),
        ([Segment(LIVER, "liver", "liver", "organ"), Segment(LESION, "x", "liver", "tumour")],
         "kind 'tumour'"),
        ([Segment(LIVER, "liver", "liver", "organ"), Segment(LIVER, "x", "liver", "lesion")],
         "share the label 1"),
    ],
)
def test_bad_segments_are_refused(series: Volume, segments: list[Segment], message: str) -> None:
    report = lesion_report()
    report.segments = segments
    with pytest.raises(ReportError, match=message):
        build_seg(report, series)


def test_every_organ_has_a_snomed_code() -> None:
    assert STRUCTURE_CODES["right kidney"].value == "9846003"
    assert STRUCTURE_CODES["left lung"].value == "44029006"
    assert all(c.scheme_designator == "SCT" for c in STRUCTURE_CODES.values())
