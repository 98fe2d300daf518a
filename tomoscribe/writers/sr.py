"""DICOM Comprehensive SR of a report, in the style of TID 2000.

The document tree::

    CONTAINER  (LN 18748-4) Diagnostic imaging report
      HAS CONCEPT MOD  CODE Language of Content Item and Descendants = English
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name /
                       Manufacturer / Model Name / Serial Number
      CONTAINS CONTAINER (DCM 121070) Findings
        CONTAINS TEXT (DCM 121071) Finding = finding.text        (one per finding)
          HAS PROPERTIES CODE (SCT 363698007) Finding Site = organ code
            HAS CONCEPT MOD CODE (SCT 272741003) Laterality   (a head structure whose
                                                               code lacks the side)
          INFERRED FROM  IMAGE (DCM 121080) Best illustration of finding  (key slices)
          INFERRED FROM  NUM (SCT 81827009) Diameter [mm]         (if size_mm)
          INFERRED FROM  NUM (SCT 118565006) Volume [ml]          (if volume_ml)
          INFERRED FROM  IMAGE (DCM 121191) Referenced Segment    (if a SEG is given)
      CONTAINS CONTAINER (DCM 121072) Impressions
        CONTAINS TEXT (DCM 121073) Impression = report.impression
      CONTAINS CONTAINER (99TOMO QA) Questions and answers        (if any)
        CONTAINS CONTAINER (99TOMO QAPAIR) Question and answer
          CONTAINS TEXT (99TOMO Q) Question, TEXT (99TOMO A) Answer,
                   IMAGE (99TOMO KEYSLICE) Key slice ...,
                   IMAGE (DCM 121191) Referenced Segment  (a referring answer's mask,
                                                           if the answer SEG is given)

A normal study (no findings) gets the model's full text as its single Finding.
The document is a draft: CompletionFlag PARTIAL, VerificationFlag UNVERIFIED,
PreliminaryFlag PRELIMINARY. It lands in the source study; patient and study
attributes and the evidence (every source instance the model read) come from
``volume.headers``. No ContentTemplateSequence is written: the Q/A section
uses local codes that TID 2000 does not define.
"""

from __future__ import annotations

import re

import highdicom as hd
from highdicom.sr import RelationshipTypeValues as Rel
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from tomoscribe import MANUFACTURER
from tomoscribe.errors import ReportError
from tomoscribe.report import Finding, Report
from tomoscribe.volume import Volume
from tomoscribe.writers import identity
from tomoscribe.writers.codes import structure_code, structure_laterality
from tomoscribe.writers.common import (
    check_segments,
    check_slice_index,
    source_headers,
    study_uid_of,
)
from tomoscribe.writers.seg import answer_label, answer_segment_numbers, segment_numbers

#: Coding scheme designator of tomoscribe's local codes (questions, answers).
LOCAL_SCHEME_DESIGNATOR = "99TOMO"
LOCAL_SCHEME_NAME = "tomoscribe local codes"

DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")
REFERENCED_SEGMENT = Code("121191", "DCM", "Referenced Segment")
MILLIMETER = Code("mm", "UCUM", "millimeter")
MILLILITER = Code("ml", "UCUM", "milliliter")
ENGLISH_US = Code("en-US", "RFC5646", "English (United States)")


def local_codes(scheme: str) -> dict[str, Code]:
    """The local concepts under ``scheme`` (a private designator, ``99...``)."""
    return {
        "qa": Code("QA", scheme, "Questions and answers"),
        "pair": Code("QAPAIR", scheme, "Question and answer"),
        "question": Code("Q", scheme, "Question"),
        "answer": Code("A", scheme, "Answer"),
        "key_slice": Code("KEYSLICE", scheme, "Key slice"),
    }


def _image_item(name: Code, volume: Volume, index: int, rel: Rel) -> hd.sr.ImageContentItem:
    ref = volume.slices[index]
    return hd.sr.ImageContentItem(
        name=name,
        referenced_sop_class_uid=ref.sop_class_uid,
        referenced_sop_instance_uid=ref.sop_instance_uid,
        referenced_frame_numbers=ref.frame_number,
        relationship_type=rel,
    )


def check_report(report: Report, volume: Volume) -> None:
    """Refuse a malformed report with a one-line :class:`ReportError`.

    Checks: model identity; segments named, labels unique; every finding has
    text, a known structure, at least one key slice, every key slice in range,
    a segment (if any) that the report describes; a non-empty impression;
    every answer has a question, an answer and key slices in range.
    """
    identity.check_identity(report)
    check_segments(report)
    labels = {seg.label for seg in report.segments}
    for i, finding in enumerate(report.findings, start=1):
        what = f"finding {i}"
        if not finding.text or not finding.text.strip():
            raise ReportError(f"{what} has an empty text")
        structure_code(finding.structure)
        if not finding.key_slices:
            raise ReportError(f"{what} ({finding.text.strip()[:40]!r}) has no key slice")
        for index in finding.key_slices:
            check_slice_index(index, volume, what)
        if finding.segment is not None and finding.segment not in labels:
            raise ReportError(
                f"{what} refers to segment label {finding.segment}, which the report lacks"
            )
        for attr in ("size_mm", "volume_ml"):
            value = getattr(finding, attr)
            if value is not None and not (value >= 0 and value < float("inf")):
                raise ReportError(f"{what} has an invalid {attr} {value!r}")
    if not report.impression or not report.impression.strip():
        raise ReportError("the report has an empty impression")
    if not report.findings and not (report.text or "").strip():
        raise ReportError("the report has neither findings nor text")
    for i, answer in enumerate(report.answers, start=1):
        if not answer.question.strip() or not answer.answer.strip():
            raise ReportError(f"answer {i} has an empty question or answer")
        for index in answer.key_slices:
            check_slice_index(index, volume, f"answer {i}")


def _finding_item(
    finding: Finding,
    volume: Volume,
    seg: Dataset | None,
    seg_numbers: dict[int, int],
) -> hd.sr.TextContentItem:
    item = hd.sr.TextContentItem(
        name=codes.DCM.Finding, value=finding.text.strip(), relationship_type=Rel.CONTAINS
    )
    site = hd.sr.CodeContentItem(
        name=FINDING_SITE,
        value=structure_code(finding.structure),
        relationship_type=Rel.HAS_PROPERTIES,
    )
    laterality = structure_laterality(finding.structure)
    if laterality is not None:  # "Cerebral hemisphere" needs its side: written as
        # highdicom's FindingSite writes it in TID 1500 (HAS CONCEPT MOD Laterality)
        site.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
            name=codes.SCT.Laterality, value=laterality,
            relationship_type=Rel.HAS_CONCEPT_MOD)])
    children: list[hd.sr.ContentItem] = [site]
    children += [
        _image_item(codes.DCM.BestIllustrationOfFinding, volume, int(k), Rel.INFERRED_FROM)
        for k in finding.key_slices
    ]
    if finding.size_mm is not None:
        children.append(hd.sr.NumContentItem(
            name=codes.SCT.Diameter, value=round(float(finding.size_mm), 1), unit=MILLIMETER,
            relationship_type=Rel.INFERRED_FROM))
    if finding.volume_ml is not None:
        children.append(hd.sr.NumContentItem(
            name=codes.SCT.Volume, value=round(float(finding.volume_ml), 2), unit=MILLILITER,
            relationship_type=Rel.INFERRED_FROM))
    if seg is not None and finding.segment is not None and finding.segment in seg_numbers:
        children.append(hd.sr.ImageContentItem(
            name=REFERENCED_SEGMENT,
            referenced_sop_class_uid=seg.SOPClassUID,
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            referenced_segment_numbers=seg_numbers[finding.segment],
            relationship_type=Rel.INFERRED_FROM))
    item.ContentSequence = hd.sr.ContentSequence(children)
    return item


def _container(name: Code, items: list[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=name, relationship_type=Rel.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _checked_numbers(seg: Dataset, study_uid: str, what: str,
                     expected: dict[int, tuple[int, str]], exact: bool) -> dict[int, int]:
    """``{key: segment number}`` once ``seg`` is shown to be the report's ``what``.

    Args:
        seg: the SEG given to the SR.
        study_uid: the report's study.
        what: "segmentation" or "answer segmentation", for the messages.
        expected: key -> (segment number, the label that segment must carry).
        exact: the SEG holds no other segment.
    """
    if str(seg.get("StudyInstanceUID", "")) != study_uid:
        raise ReportError(f"the {what} given to the SR belongs to another study")
    by_number = {int(item.SegmentNumber): str(item.SegmentLabel)
                 for item in seg.get("SegmentSequence", [])}
    if (exact and len(by_number) != len(expected)) or any(
            by_number.get(number) != label for number, label in expected.values()):
        raise ReportError(f"the {what} given to the SR was not built from this report")
    return {key: number for key, (number, _label) in expected.items()}


def _check_seg(seg: Dataset, report: Report, study_uid: str) -> dict[int, int]:
    """Segment numbers of ``seg`` by report label, after checking it is this report's SEG."""
    expected = {label: (number, report.segment(label).name)
                for label, number in segment_numbers(report).items()}
    return _checked_numbers(seg, study_uid, "segmentation", expected, exact=False)


def _check_answer_seg(seg: Dataset, report: Report, study_uid: str) -> dict[int, int]:
    """Segment numbers of the answer SEG by answer index, after checking it is this report's."""
    expected = {i: (number, answer_label(i + 1, report.answers[i].question))
                for i, number in answer_segment_numbers(report).items()}
    return _checked_numbers(seg, study_uid, "answer segmentation", expected, exact=True)


def build_sr(
    report: Report,
    volume: Volume,
    *,
    seg: Dataset | None = None,
    answer_seg: Dataset | None = None,
    questions_scheme: str = LOCAL_SCHEME_DESIGNATOR,
) -> hd.sr.ComprehensiveSR:
    """Build the draft SR of ``report`` in ``volume``'s study.

    Args:
        report: the model's report (slice indices refer to ``volume.slices``).
        volume: the volume it was made from, with its source headers.
        seg: the SEG built from the same report (:func:`build_seg`), if any:
            findings with a segment then reference it, and it joins the evidence.
        answer_seg: the SEG of the referring answers' masks
            (:func:`~tomoscribe.writers.seg.build_answer_seg`), if any: each
            answer with a mask references its segment there, and it joins the
            evidence.
        questions_scheme: coding scheme designator of the local question /
            answer codes; declared in CodingSchemeIdentificationSequence.

    Returns:
        A Comprehensive SR (PARTIAL, UNVERIFIED) with deterministic UIDs.

    Raises:
        ReportError: a malformed report (see :func:`check_report`), a volume
            without usable headers, or a ``seg`` that does not match.
    """
    if not re.fullmatch(r"99[A-Z0-9_]{1,14}", questions_scheme):
        raise ReportError(f"local coding scheme {questions_scheme!r} must look like '99XXXX'")
    check_report(report, volume)
    headers = source_headers(volume)
    study_uid = study_uid_of(volume)
    seg_numbers = _check_seg(seg, report, study_uid) if seg is not None else {}
    answer_numbers = (_check_answer_seg(answer_seg, report, study_uid)
                      if answer_seg is not None else {})
    local = local_codes(questions_scheme)

    observer = identity.device_observer(report)
    language = hd.sr.LanguageOfContentItemAndDescendants(
        hd.sr.CodedConcept.from_code(ENGLISH_US)
    )
    root_items: list[hd.sr.ContentItem] = [*iter(language), *iter(observer)]

    if report.findings:
        finding_items: list[hd.sr.ContentItem] = [
            _finding_item(f, volume, seg, seg_numbers) for f in report.findings
        ]
    else:  # a normal study: the model's own words, e.g. "No focal abnormality detected."
        finding_items = [hd.sr.TextContentItem(
            name=codes.DCM.Finding, value=report.text.strip(), relationship_type=Rel.CONTAINS)]
    root_items.append(_container(codes.DCM.Findings, finding_items))
    root_items.append(_container(codes.DCM.Impressions, [hd.sr.TextContentItem(
        name=codes.DCM.Impression, value=report.impression.strip(),
        relationship_type=Rel.CONTAINS)]))

    if report.answers:
        pairs: list[hd.sr.ContentItem] = []
        for i, answer in enumerate(report.answers):
            pair_items: list[hd.sr.ContentItem] = [
                hd.sr.TextContentItem(name=local["question"], value=answer.question.strip(),
                                      relationship_type=Rel.CONTAINS),
                hd.sr.TextContentItem(name=local["answer"], value=answer.answer.strip(),
                                      relationship_type=Rel.CONTAINS),
            ]
            pair_items += [_image_item(local["key_slice"], volume, int(k), Rel.CONTAINS)
                           for k in answer.key_slices]
            if answer_seg is not None and i in answer_numbers:
                pair_items.append(hd.sr.ImageContentItem(
                    name=REFERENCED_SEGMENT,
                    referenced_sop_class_uid=answer_seg.SOPClassUID,
                    referenced_sop_instance_uid=answer_seg.SOPInstanceUID,
                    referenced_segment_numbers=answer_numbers[i],
                    relationship_type=Rel.CONTAINS))
            pairs.append(_container(local["pair"], pair_items))
        root_items.append(_container(local["qa"], pairs))

    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT)
    root.ContentSequence = hd.sr.ContentSequence(root_items)

    evidence: list[Dataset] = list(headers)
    evidence += [d for d in (seg, answer_seg) if d is not None]
    series_uid, sop_uid = identity.output_uids(study_uid, report.model_version, "sr")
    scheme = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=questions_scheme,
        name=LOCAL_SCHEME_NAME,
        responsible_organization=MANUFACTURER,
    )
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=root,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            coding_schemes=[scheme],
            **identity.draft_sr_attributes(
                report,
                series_number=identity.SR_SERIES_NUMBER,
                series_description=identity.SR_SERIES_DESCRIPTION,
            ),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(f"cannot build the SR: {exc}") from exc
    return sr
