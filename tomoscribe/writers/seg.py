"""DICOM Segmentation (SEG) of a report's label map.

:func:`build_seg` turns :attr:`Report.label_map` (``(D, H, W)`` uint8 on the
source grid) into a BINARY highdicom Segmentation of the source series: one
segment per :attr:`Report.segments` entry that has voxels, numbered 1..N in
label order, coded with :mod:`tomoscribe.writers.codes`, identified as
tomoscribe's AI algorithm. Frame ``k`` of the label map is stored against the
source instance of ``Volume.slices[k]``; frames without any segment are left
out.

:func:`build_answer_seg` writes the masks that answer referring questions
("segment the liver .") as a second SEG, a series of its own.

Laterality: where a segment's coding has one (a head structure whose code
does not say its side, :data:`~tomoscribe.writers.codes.STRUCTURE_LATERALITY`),
an organ segment gets it as the Segmented Property Type Modifier Code Sequence
(0062,0011) of its type, a lesion segment as the Anatomic Region Modifier
Sequence (0008,2220) of its anatomic region. highdicom's SegmentDescription
has no parameter for either; they are added to the built description, which
the Segmentation constructor keeps as the item of its SegmentSequence.

Decision: a report whose label map holds no voxel of any segment gets no SEG
(:func:`build_seg` returns ``None``): an empty segmentation says nothing a
viewer can show, and a SEG needs at least one frame.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tomoscribe import MANUFACTURER, SOFTWARE_NAME
from tomoscribe.errors import ReportError
from tomoscribe.report import Report
from tomoscribe.volume import Volume
from tomoscribe.writers import identity
from tomoscribe.writers.codes import SegmentCoding, answer_coding, segment_coding
from tomoscribe.writers.common import check_segments, source_headers, study_uid_of


def _checked_label_map(report: Report, volume: Volume) -> np.ndarray:
    """The label map as ``(D, H, W)`` uint8, checked against the volume and segments."""
    label_map = np.asarray(report.label_map)
    if label_map.shape != volume.shape:
        raise ReportError(
            f"label map has shape {label_map.shape}, the volume {volume.shape}"
        )
    if not np.issubdtype(label_map.dtype, np.integer) and label_map.dtype != np.bool_:
        raise ReportError(f"label map has dtype {label_map.dtype}; expected integers")
    if label_map.size and (int(label_map.min()) < 0 or int(label_map.max()) > 255):
        raise ReportError("label map values must lie in 0..255")
    label_map = label_map.astype(np.uint8, copy=False)
    known = {seg.label for seg in report.segments}
    present = {int(v) for v in np.unique(label_map)} - {0}
    unknown = sorted(present - known)
    if unknown:
        raise ReportError(f"label map holds label(s) {unknown} that no segment describes")
    return label_map


def segment_numbers(report: Report) -> dict[int, int]:
    """Segment number in the SEG of each label that has voxels, ``{label: number}``.

    Numbers run 1..N in increasing label order; segments without voxels are
    left out (and have no number).
    """
    label_map = np.asarray(report.label_map)
    present = {int(v) for v in np.unique(label_map)} if label_map.size else set()
    labels = sorted(seg.label for seg in report.segments if seg.label in present)
    return {label: number for number, label in enumerate(labels, start=1)}


def segment_tracking_uid(study_uid: str, model_version: str, label: int) -> str:
    """Deterministic Tracking UID of one segment (same job, same UID)."""
    return str(generate_uid(entropy_srcs=[SOFTWARE_NAME, study_uid, model_version,
                                          "segment", str(label)]))


def _source_images(volume: Volume, headers: list[Dataset]) -> list[Dataset]:
    """One header per slice, in slice order (``label_map[k]`` <-> result ``[k]``)."""
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    images: list[Dataset] = []
    seen: set[str] = set()
    for k, ref in enumerate(volume.slices):
        if ref.frame_number is not None or int(by_uid.get(ref.sop_instance_uid, Dataset())
                                               .get("NumberOfFrames", 1) or 1) > 1:
            raise ReportError("SEG of a multi-frame source series is not supported yet")
        if ref.sop_instance_uid not in by_uid:
            raise ReportError(f"slice {k} refers to instance {ref.sop_instance_uid} "
                              "which the volume's headers lack")
        if ref.sop_instance_uid in seen:
            raise ReportError(f"slice {k} repeats source instance {ref.sop_instance_uid}")
        seen.add(ref.sop_instance_uid)
        images.append(by_uid[ref.sop_instance_uid])
    return images


def _description(number: int, label: str, coding: SegmentCoding,
                 algorithm: hd.AlgorithmIdentificationSequence,
                 tracking_uid: str) -> hd.seg.SegmentDescription:
    """The SegmentDescription of one segment, its label also its Tracking ID.

    A coding's laterality becomes a modifier of its anatomic region (a lesion)
    or of its property type (an organ). Both sequences are type 3 in the
    Segment Description macro; highdicom's SegmentDescription takes neither,
    so they are set on the items it built. The Segmentation constructor
    stores the description objects themselves as its SegmentSequence items
    (``_add_segment_descriptions``, highdicom 0.28), so they survive.
    """
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=coding.category,
        segmented_property_type=coding.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid,
        tracking_id=label,
        anatomic_regions=None if coding.anatomic_region is None
        else [coding.anatomic_region],
    )
    if coding.laterality is not None:
        modifier = [hd.sr.CodedConcept.from_code(coding.laterality)]
        if coding.anatomic_region is not None:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = modifier
        else:
            description.SegmentedPropertyTypeCodeSequence[0] \
                .SegmentedPropertyTypeModifierCodeSequence = modifier
    return description


def build_seg(report: Report, volume: Volume) -> hd.seg.Segmentation | None:
    """Build the SEG of ``report``'s label map on ``volume``'s source series.

    Args:
        report: the model's report; ``label_map`` is ``(D, H, W)`` on the
            volume's grid, ``segments`` describes its non-zero values.
        volume: the volume the report was made from, with its source headers.

    Returns:
        A BINARY Segmentation with one segment per non-empty report segment,
        or ``None`` when no segment has any voxel.

    Raises:
        ReportError: a malformed report (unnamed or duplicate segment, unknown
            structure or label, label map of the wrong shape) or a volume whose
            headers cannot be referenced.
    """
    identity.check_identity(report)
    check_segments(report)
    label_map = _checked_label_map(report, volume)
    headers = source_headers(volume)
    study_uid = study_uid_of(volume)
    numbers = segment_numbers(report)
    if not numbers:
        return None
    source_images = _source_images(volume, headers)

    lut = np.zeros(256, dtype=np.uint8)
    descriptions: list[hd.seg.SegmentDescription] = []
    algorithm = identity.algorithm_identification(report)
    for segment in sorted(report.segments, key=lambda s: s.label):
        if segment.label not in numbers:
            continue
        number = numbers[segment.label]
        lut[segment.label] = number
        descriptions.append(_description(
            number, segment.name, segment_coding(segment), algorithm,
            segment_tracking_uid(study_uid, report.model_version, segment.label)))
    pixel_array = lut[label_map]  # (D, H, W) segment numbers 0..N
    return _segmentation(report, volume, source_images, pixel_array, descriptions, "seg")


#: Per output kind: series number, series description, content description.
_SERIES = {
    "seg": (identity.SEG_SERIES_NUMBER, identity.SEG_SERIES_DESCRIPTION,
            f"{SOFTWARE_NAME} draft segmentation"),
    "answers": (identity.ANSWERS_SERIES_NUMBER, identity.ANSWERS_SERIES_DESCRIPTION,
                f"{SOFTWARE_NAME} masks answering referring questions"),
}


def _segmentation(report: Report, volume: Volume, source_images: list[Dataset],
                  pixel_array: np.ndarray, descriptions: list[hd.seg.SegmentDescription],
                  kind: str) -> hd.seg.Segmentation:
    """The BINARY Segmentation of ``pixel_array`` (frame ``k`` <-> ``source_images[k]``)."""
    series_number, series_description, content_description = _SERIES[kind]
    series_uid, sop_uid = identity.output_uids(study_uid_of(volume), report.model_version, kind)
    try:
        return hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=report.model_name,
            software_versions=identity.software_versions(report),
            device_serial_number=identity.device_serial_number(report),
            content_label="TOMOSCRIBE",
            content_description=content_description,
            content_creator_name=None,
            omit_empty_frames=True,
            series_description=identity.describe_series(series_description, report),
            contributing_equipment=[identity.contributing_equipment(report)],
            specific_character_set="ISO_IR 192",  # UTF-8: model text is free Unicode
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(f"cannot build the segmentation: {exc}") from exc


def answer_label(index: int, question: str) -> str:
    """SegmentLabel of the mask answering question ``index`` (1-based), at most 64 characters."""
    text = " ".join(question.split()).rstrip(" .?")
    return f"Q{index}: {text}"[:64]


def answer_segment_numbers(report: Report) -> dict[int, int]:
    """Segment number in the answer SEG of each answer with a mask, ``{answer index: number}``.

    Answer indices are 0-based positions in :attr:`Report.answers`; numbers
    run 1..N in that order over the answers whose mask has voxels.
    """
    with_mask = [i for i, a in enumerate(report.answers)
                 if a.mask is not None and bool(np.asarray(a.mask).any())]
    return {i: number for number, i in enumerate(with_mask, start=1)}


def build_answer_seg(report: Report, volume: Volume) -> hd.seg.Segmentation | None:
    """Build the SEG of the masks that answer referring questions ("segment the ...").

    One segment per :class:`~tomoscribe.report.Answer` whose mask has voxels,
    numbered 1..N in answer order, labelled with the question
    (:func:`answer_label`) and coded by what it names
    (:func:`~tomoscribe.writers.codes.answer_coding`). It is a series of its
    own (:data:`~tomoscribe.writers.identity.ANSWERS_SERIES_NUMBER`): the
    masks overlap the report's segments (a liver lesion is in the liver
    segment and in the answer to "segment the liver"), and a radiologist can
    show or hide the answers apart from the report's segmentation.

    Only the slices that some mask touches are stored, so the frame array
    stays small. Masks that overlap each other are stored as one frame set
    per segment (a ``(frames, H, W, N)`` array), others as a label map.

    Returns:
        The Segmentation, or ``None`` when no answer has a non-empty mask.

    Raises:
        ReportError: a mask of the wrong shape, or a volume whose headers
            cannot be referenced.
    """
    identity.check_identity(report)
    numbers = answer_segment_numbers(report)
    if not numbers:
        return None
    masks: list[np.ndarray] = []
    for i in numbers:
        mask = np.asarray(report.answers[i].mask)
        if mask.shape != volume.shape:
            raise ReportError(f"answer {i + 1} has a mask of shape {mask.shape}, "
                              f"the volume {volume.shape}")
        masks.append(mask.astype(bool, copy=False))
    study_uid = study_uid_of(volume)
    images = _source_images(volume, source_headers(volume))
    touched = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks]))
    algorithm = identity.algorithm_identification(report)
    descriptions: list[hd.seg.SegmentDescription] = []
    for i, number in numbers.items():
        question = report.answers[i].question
        label = answer_label(i + 1, question)
        descriptions.append(_description(
            number, label, answer_coding(question), algorithm,
            str(generate_uid(entropy_srcs=[
                SOFTWARE_NAME, study_uid, report.model_version, "answer", str(i), question]))))
    stack = np.stack([m[touched] for m in masks], axis=-1)  # (F, H, W, N) bool
    if int(stack.sum(axis=-1, dtype=np.uint8).max()) <= 1:  # no voxel in two masks
        pixel_array = (stack * np.arange(1, len(masks) + 1, dtype=np.uint8)).sum(
            axis=-1, dtype=np.uint8)
    else:
        pixel_array = stack
    return _segmentation(report, volume, [images[int(k)] for k in touched], pixel_array,
                         descriptions, "answers")
