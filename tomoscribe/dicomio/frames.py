"""Per-frame geometry read from DICOM headers, for classic and enhanced objects.

A classic CT/MR instance is one frame whose geometry sits at the top level
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, RescaleSlope...).
An enhanced multi-frame instance (Enhanced CT/MR Image Storage) keeps it in
functional group macros, per frame (PerFrameFunctionalGroupsSequence) or shared
by all frames (SharedFunctionalGroupsSequence). :func:`frames_of` hides the
difference: one :class:`FrameGeometry` per frame, whatever the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from tomoscribe.dicomio.header import raw_int, raw_text

#: |component| of the slice normal above which a plane is named after that axis
#: (about 25 degrees off the axis); below it the plane is "Oblique".
ORIENTATION_AXIS_COS = 0.9

_AXIS_LABELS = ("Sagittal", "Coronal", "Axial")


@dataclass(frozen=True)
class FrameGeometry:
    """Geometry and value mapping of one frame (one 2D image) of an instance.

    Attributes:
        file_index: index of the instance in its :class:`SeriesInfo` files.
        frame: 0-based frame index in a multi-frame instance, ``None`` for a
            single-frame instance.
        position: ImagePositionPatient (mm, LPS) or ``None`` if absent.
        orientation: ImageOrientationPatient (row cosine, column cosine) or ``None``.
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` in mm or ``None``.
        slice_thickness: SliceThickness in mm or ``None``.
        slope: RescaleSlope (1.0 when absent).
        intercept: RescaleIntercept (0.0 when absent).
        rows: Rows.
        columns: Columns.
        sop_instance_uid: SOPInstanceUID of the instance.
        sop_class_uid: SOPClassUID of the instance.
        frame_of_reference_uid: FrameOfReferenceUID ("" when absent).
    """

    file_index: int
    frame: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    slope: float
    intercept: float
    rows: int
    columns: int
    sop_instance_uid: str
    sop_class_uid: str
    frame_of_reference_uid: str


def _floats(ds: Dataset, tag: int, n: int) -> tuple[float, ...] | None:
    """Element ``tag`` of ``ds`` as ``n`` finite floats, or ``None`` if absent or malformed.

    Reads the raw text of the element (see :func:`~tomoscribe.dicomio.header.raw_text`)
    rather than pydicom's converted value: converting DS values costs more
    than reading the whole header.
    """
    text = raw_text(ds, tag)
    if not text:
        return None
    try:
        out = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _float(ds: Dataset, tag: int) -> float | None:
    got = _floats(ds, tag, 1)
    return None if got is None else got[0]


def _macro(per_frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of functional group ``sequence``, per-frame before shared."""
    for group in (per_frame, shared):
        if group is None:
            continue
        seq = group.get(sequence)
        if seq:
            item: Dataset = seq[0]
            return item
    return None


def _has(ds: Dataset, tag: int) -> bool:
    """``tag in ds`` without pydicom's tag parsing (this runs for every header, often)."""
    try:
        return tag in ds._dict
    except AttributeError:
        return tag in ds


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames of ``ds`` (1 when absent or malformed)."""
    if not _has(ds, 0x00280008):
        return 1
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def is_enhanced(ds: Dataset) -> bool:
    """Whether ``ds`` carries per-frame or shared functional groups."""
    return _has(ds, 0x52009230) or _has(ds, 0x52009229)


def frames_of(ds: Dataset, file_index: int) -> list[FrameGeometry]:
    """One :class:`FrameGeometry` per frame of ``ds`` (a header without pixels).

    Args:
        ds: the instance's header dataset.
        file_index: stored in every returned frame.

    Returns:
        ``NumberOfFrames`` entries for an enhanced instance; one entry with
        ``frame=None`` for a single-frame instance; for a legacy multi-frame
        instance without functional groups, one entry per frame that all carry
        the top-level geometry (the loader refuses those when they collide).
    """
    n_frames = number_of_frames(ds)
    rows = raw_int(ds, 0x00280010) or 0
    columns = raw_int(ds, 0x00280011) or 0
    sop_instance_uid = raw_text(ds, 0x00080018) or ""
    sop_class_uid = raw_text(ds, 0x00080016) or ""
    for_uid = raw_text(ds, 0x00200052) or ""

    def make(frame: int | None, pos: Any, ori: Any, meas: Any, val: Any) -> FrameGeometry:
        """One frame from its position, orientation, measures and value items."""
        slope = _float(val, 0x00281053) if val is not None else None
        intercept = _float(val, 0x00281052) if val is not None else None
        return FrameGeometry(
            file_index=file_index,
            frame=frame,
            position=_floats(pos, 0x00200032, 3)  # type: ignore[arg-type]
            if pos is not None
            else None,
            orientation=_floats(ori, 0x00200037, 6)  # type: ignore[arg-type]
            if ori is not None
            else None,
            pixel_spacing=_floats(meas, 0x00280030, 2)  # type: ignore[arg-type]
            if meas is not None
            else None,
            slice_thickness=_float(meas, 0x00180050) if meas is not None else None,
            slope=1.0 if slope is None else slope,
            intercept=0.0 if intercept is None else intercept,
            rows=rows,
            columns=columns,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            frame_of_reference_uid=for_uid,
        )

    if not is_enhanced(ds):
        return [make(None if n_frames == 1 else i, ds, ds, ds, ds) for i in range(n_frames)]

    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared: Dataset | None = shared_seq[0] if shared_seq else None
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = []
    for i in range(n_frames):
        per_frame: Dataset | None = per_frame_seq[i] if i < len(per_frame_seq) else None
        out.append(
            make(
                i,
                _macro(per_frame, shared, "PlanePositionSequence"),
                _macro(per_frame, shared, "PlaneOrientationSequence"),
                _macro(per_frame, shared, "PixelMeasuresSequence"),
                _macro(per_frame, shared, "PixelValueTransformationSequence"),
            )
        )
    return out


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit slice normal ``(3,)``: row cosine x column cosine (DICOM IOP order)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError("ImageOrientationPatient rows and columns are parallel")
    return normal / norm


def orientation_label(orientation: tuple[float, ...] | None) -> str:
    """ "Axial", "Coronal", "Sagittal", "Oblique", or "" when unknown."""
    if orientation is None:
        return ""
    try:
        normal = slice_normal(orientation)
    except ValueError:
        return ""
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < ORIENTATION_AXIS_COS:
        return "Oblique"
    return _AXIS_LABELS[axis]


def dominant_plane(orientation: tuple[float, ...] | None) -> str:
    """The plane nearest the slices ("Axial"/"Coronal"/"Sagittal"), never "Oblique".

    This is the rule MONAI Deploy's series selector applies to an
    ``ImageOrientationPatient`` condition. Returns "" when unknown.
    """
    if orientation is None:
        return ""
    try:
        normal = slice_normal(orientation)
    except ValueError:
        return ""
    return _AXIS_LABELS[int(np.argmax(np.abs(normal)))]
