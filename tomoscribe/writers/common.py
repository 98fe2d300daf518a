"""Checks and helpers shared by the SR and SEG builders.

Everything here either returns something a builder can use as-is or raises
:class:`~tomoscribe.errors.ReportError` with a one-line reason.
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset

from tomoscribe.errors import ReportError
from tomoscribe.report import Report
from tomoscribe.volume import Volume
from tomoscribe.writers.codes import segment_coding

#: Type 2 patient / study attributes highdicom reads from the first source
#: header; an anonymised source may lack them, and type 2 allows them empty.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def source_headers(volume: Volume) -> list[Dataset]:
    """The volume's source headers, checked and ready to hand to highdicom.

    Returns shallow copies (the volume is never modified) in which missing
    type 2 patient/study attributes are present and empty.

    Raises:
        ReportError: no headers, a header without SOP Instance UID, or headers
            from more than one study / a study other than the volume's.
    """
    if not volume.headers:
        raise ReportError("the volume carries no source headers; cannot reference the source study")
    out: list[Dataset] = []
    studies: set[str] = set()
    for header in volume.headers:
        sop_uid = str(header.get("SOPInstanceUID", "") or "")
        if not sop_uid or not header.get("SOPClassUID"):
            raise ReportError("a source header has no SOPInstanceUID or SOPClassUID")
        study = str(header.get("StudyInstanceUID", "") or "")
        if not study:
            raise ReportError(f"source instance {sop_uid} has no StudyInstanceUID")
        studies.add(study)
        ds = copy.copy(header)
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
        out.append(ds)
    if len(studies) != 1:
        raise ReportError(f"the source headers belong to {len(studies)} studies; expected one")
    study_uid = studies.pop()
    if volume.study_instance_uid and volume.study_instance_uid != study_uid:
        raise ReportError(
            f"the volume says study {volume.study_instance_uid} but its headers say {study_uid}"
        )
    return out


def study_uid_of(volume: Volume) -> str:
    """StudyInstanceUID the outputs land in: the source study."""
    return str(source_headers(volume)[0].StudyInstanceUID)


def check_slice_index(index: int, volume: Volume, what: str) -> int:
    """Return ``index`` if it is a valid slice of ``volume``, else raise ReportError."""
    depth = volume.shape[0]
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise ReportError(f"{what}: key slice {index!r} is not an integer")
    if not 0 <= int(index) < depth:
        raise ReportError(f"{what}: key slice {int(index)} is out of range 0..{depth - 1}")
    return int(index)


def check_segments(report: Report) -> None:
    """Segments must have a name, a unique label 1..255, a known structure and kind.

    Raises:
        ReportError: the first problem found.
    """
    seen: set[int] = set()
    for seg in report.segments:
        if not seg.name or not seg.name.strip():
            raise ReportError(f"segment with label {seg.label} has no name")
        if len(seg.name) > 64 or "\\" in seg.name:
            raise ReportError(
                f"segment name {seg.name[:70]!r} is longer than 64 characters or has a backslash"
            )
        if not 1 <= int(seg.label) <= 255:
            raise ReportError(f"segment {seg.name!r} has label {seg.label}; expected 1..255")
        if seg.label in seen:
            raise ReportError(f"two segments share the label {seg.label}")
        seen.add(int(seg.label))
        segment_coding(seg)  # known structure and kind
