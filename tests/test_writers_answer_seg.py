"""The answer SEG: masks that answer referring questions, checked by dciodvfy and highdicom.

Uses the synthetic CT series and reports of test_writers_sr.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from test_writers_seg import _write
from test_writers_sr import (
    LESION,
    LIVER,
    lesion_report,
    make_series,
    make_volume,
    needs_dciodvfy,
    run_dciodvfy,
)

from tomoscribe.errors import ReportError
from tomoscribe.report import Answer, Report
from tomoscribe.volume import Volume
from tomoscribe.writers import build_answer_seg, build_outputs, build_seg, build_sr
from tomoscribe.writers.codes import answer_coding
from tomoscribe.writers.identity import ANSWERS_SERIES_NUMBER
from tomoscribe.writers.seg import answer_label


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return make_volume(make_series(tmp_path_factory.mktemp("ct"), seed=2))


def _referring_report(overlap: bool = True) -> Report:
    """The lesion report asked three more questions; two were answered with a mask.

    With ``overlap`` the masks are the liver (with its lesion) and the lesion;
    without, the liver's upper slices and the lesion.
    """
    report = lesion_report()
    liver = report.label_map > 0 if overlap else (report.label_map == LIVER) & (
        np.arange(report.label_map.shape[0])[:, None, None] < 5)
    lesion = report.label_map == LESION
    report.answers = [
        *report.answers,
        Answer("segment the liver .", "Segmented: 11.1 ml.", (5,), liver),
        Answer("segment the lesions in the spleen .", "None."),
        Answer("segment the lesions in the liver .", "Segmented: 0.1 ml.", (7,), lesion),
    ]
    return report


def _masks_back(seg: hd.seg.Segmentation, series: Volume) -> dict[int, np.ndarray]:
    """Each segment of ``seg`` as a ``(D, H, W)`` bool volume on the series' slices."""
    by_uid = {s.sop_instance_uid: k for k, s in enumerate(series.slices)}
    out = {int(i.SegmentNumber): np.zeros(series.shape, bool) for i in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, *series.shape[1:])
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[number][by_uid[src]] |= frame.astype(bool)
    return out


@needs_dciodvfy
@pytest.mark.parametrize("overlap", [True, False])
def test_answer_seg_validates_and_holds_each_mask(series: Volume, tmp_path: Path,
                                                  overlap: bool) -> None:
    report = _referring_report(overlap)
    seg = build_answer_seg(report, series)
    assert seg is not None
    run_dciodvfy(_write(seg, tmp_path / "qseg.dcm"))
    back = hd.seg.segread(tmp_path / "qseg.dcm")
    assert back.SeriesNumber == ANSWERS_SERIES_NUMBER
    assert back.StudyInstanceUID == series.study_instance_uid
    main = build_seg(report, series)
    assert main is not None
    assert back.SeriesInstanceUID != main.SeriesInstanceUID
    assert back.SOPInstanceUID != main.SOPInstanceUID

    items = list(back.SegmentSequence)
    # the answers with a mask, in answer order, labelled by their question
    assert [i.SegmentLabel for i in items] == ["Q3: segment the liver",
                                               "Q5: segment the lesions in the liver"]
    liver, lesion = items
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert lesion.AnatomicRegionSequence[0].CodeValue == "10200004"

    masks = _masks_back(back, series)
    np.testing.assert_array_equal(masks[1], report.answers[2].mask)
    np.testing.assert_array_equal(masks[2], report.answers[4].mask)
    # only the slices a mask touches are stored
    touched = {int(k) for a in report.answers if a.mask is not None
               for k in np.flatnonzero(a.mask.any(axis=(1, 2)))}
    refs = {i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for i in back.PerFrameFunctionalGroupsSequence}
    assert refs == {series.slices[k].sop_instance_uid for k in touched}


@needs_dciodvfy
def test_sr_references_each_answer_mask(series: Volume, tmp_path: Path) -> None:
    report = _referring_report()
    seg, qseg = build_seg(report, series), build_answer_seg(report, series)
    assert seg is not None and qseg is not None
    sr = build_sr(report, series, seg=seg, answer_seg=qseg)
    run_dciodvfy(_write(sr, tmp_path / "sr.dcm"))
    pairs = [c for c in hd.sr.utils.find_content_items(
        sr, value_type=hd.sr.ValueTypeValues.CONTAINER, recursive=True)
        if c.ConceptNameCodeSequence[0].CodeValue == "QAPAIR"]
    assert len(pairs) == len(report.answers)
    refs = []
    for pair in pairs:
        to_qseg = [i for i in pair.ContentSequence if i.ValueType == "IMAGE"
                   and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == qseg.SOPInstanceUID]
        refs.append([int(i.ReferencedSOPSequence[0].ReferencedSegmentNumber) for i in to_qseg])
    assert refs == [[], [], [1], [], [2]]
    # both SEGs are evidence of the SR
    uids = {ref.ReferencedSOPInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for series_item in s.ReferencedSeriesSequence
            for ref in series_item.ReferencedSOPSequence}
    assert {seg.SOPInstanceUID, qseg.SOPInstanceUID} <= uids


def test_build_outputs_writes_the_answer_seg_after_the_seg(series: Volume) -> None:
    names = [name for name, _ds in build_outputs(_referring_report(), series)]
    assert [n.split("_")[0] for n in names] == ["SR", "SEG", "QSEG"]
    # no answer with a mask: no answer SEG
    assert [n.split("_")[0] for n, _ in build_outputs(lesion_report(), series)] == ["SR", "SEG"]


def test_no_mask_no_answer_seg(series: Volume) -> None:
    assert build_answer_seg(lesion_report(), series) is None
    report = _referring_report()
    report.answers = [dataclasses.replace(a, mask=np.zeros(series.shape, bool))
                      if a.mask is not None else a for a in report.answers]
    assert build_answer_seg(report, series) is None


def test_answer_seg_is_deterministic_and_refuses_bad_input(series: Volume) -> None:
    a, b = build_answer_seg(_referring_report(), series), build_answer_seg(_referring_report(),
                                                                           series)
    assert a is not None and b is not None
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SegmentSequence[0].TrackingUID == b.SegmentSequence[0].TrackingUID
    report = _referring_report()
    report.answers[2] = dataclasses.replace(report.answers[2], mask=np.ones((2, 2, 2), bool))
    with pytest.raises(ReportError, match="answer 3 has a mask of shape"):
        build_answer_seg(report, series)
    # an SR given an answer SEG of another report is refused
    other = _referring_report()
    other.answers[2] = dataclasses.replace(other.answers[2], question="segment the spleen .")
    with pytest.raises(ReportError, match=r"answer segmentation .* not built from this report"):
        build_sr(other, series, answer_seg=a)


@pytest.mark.parametrize(
    ("question", "category", "kind", "region"),
    [
        ("segment the liver .", "91723000", "10200004", None),
        ("segment the lesions in the right lung .", "49755003", "27925004", "3341006"),
        ("Segment the lesions in the left kidney.", "49755003", "367643001", "18639004"),
        ("segment the lesions .", "49755003", "52988006", None),
        ("segment that .", "91723000", "91723000", None),
    ],
)
def test_answer_coding(question: str, category: str, kind: str, region: str | None) -> None:
    coding = answer_coding(question)
    assert (coding.category.value, coding.type.value) == (category, kind)
    assert (coding.anatomic_region.value if coding.anatomic_region else None) == region


def test_answer_label_fits_a_long_string() -> None:
    assert answer_label(2, "segment the liver .") == "Q2: segment the liver"
    assert len(answer_label(10, "segment " + "very " * 30 + "long")) == 64
