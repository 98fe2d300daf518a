"""Decode one chosen series into a :class:`~tomoscribe.volume.Volume`.

Headers were read by :func:`~tomoscribe.dicomio.scan.scan_folder`; here the
geometry is checked first (before any pixel is decoded), then the pixel data
of the series' files only is decoded, straight into a preallocated
``(D, H, W)`` float32 array, rescaled to Hounsfield units for CT.

Slices are ordered by their position projected on the slice normal (row
cosine x column cosine of ImageOrientationPatient), never by file name or
InstanceNumber. Classic single-frame CT/MR and enhanced multi-frame CT/MR
(per-frame functional groups) are read.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array

from tomoscribe.dicomio.frames import FrameGeometry, frames_of, number_of_frames, slice_normal
from tomoscribe.dicomio.scan import SeriesInfo
from tomoscribe.errors import GeometryError
from tomoscribe.volume import SliceRef, Volume

#: largest difference between direction cosines still called "the same orientation"
ORIENTATION_TOL = 1e-3
#: relative tolerance on PixelSpacing between slices
SPACING_RTOL = 1e-3
#: positions closer than this fraction of the median spacing (or 1e-3 mm) are the same slot
DUPLICATE_FRACTION = 0.01
#: a step between slices larger than this multiple of the median is a missing slice
GAP_FACTOR = 1.5
#: steps may differ from the median by this fraction before spacing counts as uneven
UNEVEN_TOL = 0.1
#: slice origins may stray from the line along the normal by this fraction of a pixel
SHEAR_FRACTION = 0.1
#: decode with threads when the series has at least this many files
PARALLEL_MIN_FILES = 16


@dataclass
class _Slot:
    """One slice of the output volume: the frame kept and its ignored twins."""

    position: np.ndarray
    distance: float
    frame: FrameGeometry
    twins: list[FrameGeometry]


def _name(series: SeriesInfo, frame: FrameGeometry) -> str:
    path = series.files[frame.file_index]
    label = path.name
    if frame.frame is not None:
        label += f" frame {frame.frame + 1}"
    return label


def _check_common(series: SeriesInfo, frames: list[FrameGeometry]) -> None:
    """Same rows/columns, orientation, pixel spacing and frame of reference everywhere."""
    first = frames[0]
    for f in frames:
        if f.orientation is None:
            raise GeometryError(f"{_name(series, f)} has no ImageOrientationPatient")
        if f.position is None:
            raise GeometryError(f"{_name(series, f)} has no ImagePositionPatient")
        if f.pixel_spacing is None:
            raise GeometryError(f"{_name(series, f)} has no PixelSpacing")
        if f.rows <= 0 or f.columns <= 0:
            raise GeometryError(f"{_name(series, f)} has no Rows/Columns")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise GeometryError(f"series {series.uid} mixes image sizes ({shown})")
    ref = np.asarray(first.orientation)
    for f in frames:
        if np.max(np.abs(np.asarray(f.orientation) - ref)) > ORIENTATION_TOL:
            raise GeometryError(
                f"series {series.uid} mixes slice orientations ({_name(series, first)} vs "
                f"{_name(series, f)}); it is not one volume"
            )
    ref_sp = np.asarray(first.pixel_spacing)
    for f in frames:
        if not np.allclose(f.pixel_spacing, ref_sp, rtol=SPACING_RTOL, atol=1e-4):  # type: ignore[arg-type]
            raise GeometryError(
                f"series {series.uid} mixes pixel spacings ({tuple(ref_sp)} vs {f.pixel_spacing})"
            )
    fors = {f.frame_of_reference_uid for f in frames}
    if len(fors) > 1:
        raise GeometryError(
            f"series {series.uid} mixes {len(fors)} frames of reference; it is not one volume"
        )


def _unit_cosines(orientation: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if abs(nr - 1) > 0.01 or abs(nc - 1) > 0.01 or abs(float(np.dot(row, col))) > 0.01:
        raise GeometryError(
            f"ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors"
        )
    return row / nr, col / nc


def _slots(
    series: SeriesInfo, frames: list[FrameGeometry], normal: np.ndarray
) -> tuple[list[_Slot], float]:
    """Frames sorted along ``normal`` and grouped by position; the median step (mm)."""
    positions = np.asarray([f.position for f in frames], dtype=np.float64)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    steps = np.diff(distance[order])
    moving = steps[steps > 1e-3]
    median = float(np.median(moving)) if moving.size else 0.0
    same = max(1e-3, DUPLICATE_FRACTION * median)
    slots: list[_Slot] = []
    for i in order:
        f = frames[int(i)]
        if (
            slots
            and abs(distance[i] - slots[-1].distance) <= same
            and np.linalg.norm(positions[i] - slots[-1].position) <= max(same, 1e-2)
        ):
            slots[-1].twins.append(f)
            continue
        slots.append(_Slot(positions[i], float(distance[i]), f, []))
    return slots, median


def _check_spacing(series: SeriesInfo, slots: list[_Slot]) -> float:
    """Uniform spacing along the normal, else :class:`GeometryError`; returns it (mm)."""
    dist = np.asarray([s.distance for s in slots])
    steps = np.diff(dist)
    median = float(np.median(steps))
    if median <= 0:
        raise GeometryError(f"series {series.uid}: slices do not advance along their normal")
    for i, step in enumerate(steps):
        if step > GAP_FACTOR * median:
            missing = round(step / median) - 1
            raise GeometryError(
                f"series {series.uid}: gap of {step:.3g} mm between slices at {dist[i]:.2f} and "
                f"{dist[i + 1]:.2f} mm along the normal (median spacing {median:.3g} mm); "
                f"about {max(missing, 1)} slice(s) missing"
            )
    deviation = np.abs(steps - median)
    worst = int(np.argmax(deviation))
    if deviation[worst] > UNEVEN_TOL * median:
        raise GeometryError(
            f"series {series.uid}: uneven slice spacing, {steps.min():.3g} to {steps.max():.3g} mm "
            f"(median {median:.3g} mm; worst between {dist[worst]:.2f} and "
            f"{dist[worst + 1]:.2f} mm)"
        )
    return float((dist[-1] - dist[0]) / (len(dist) - 1))


def _spacing_note(slots: list[_Slot], spacing: float) -> str | None:
    """A note when steps stray more than 1% from the mean spacing (still accepted)."""
    steps = np.diff([s.distance for s in slots])
    worst = float(np.max(np.abs(steps - spacing)))
    if worst > 0.01 * spacing:
        return (
            f"slice spacing varies by up to {worst:.3g} mm around {spacing:.4g} mm; "
            "the volume uses the mean"
        )
    return None


def _check_shear(series: SeriesInfo, slots: list[_Slot], normal: np.ndarray, pixel: float) -> None:
    """Slice origins must lie on the line through the first along ``normal``."""
    origin = slots[0].position
    worst = 0.0
    for s in slots:
        off = s.position - origin
        perp = off - np.dot(off, normal) * normal
        worst = max(worst, float(np.linalg.norm(perp)))
    if worst > max(0.01, SHEAR_FRACTION * pixel):
        raise GeometryError(
            f"series {series.uid}: slice origins stray up to {worst:.3g} mm from the slice normal "
            "(gantry tilt or sheared stack); resample it to an orthogonal grid first"
        )


#: uncompressed little-endian transfer syntaxes -> explicit VR?
_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _native_pixels(path: Path, header: Dataset) -> np.ndarray | None:
    """Stored values ``(1, H, W)`` of an uncompressed single-frame file, read directly.

    Parsing the whole file again (as :func:`pydicom.pixels.pixel_array` does)
    costs as much as the scan did; for the common case, a little-endian
    uncompressed single-frame image whose Pixel Data element ends the file,
    the values are read straight from the bytes. Returns ``None`` (use
    pydicom) whenever anything differs from that case: other transfer syntax,
    several frames or samples, BitsStored != BitsAllocated, trailing elements,
    a length that does not match Rows x Columns.
    """
    meta = getattr(header, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    explicit = _NATIVE_LITTLE_ENDIAN.get(syntax)
    if explicit is None:
        return None
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        bits, stored_bits = int(header.BitsAllocated), int(header.BitsStored)
        signed = int(header.PixelRepresentation)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if (
        samples != 1
        or "NumberOfFrames" in header
        or bits not in (8, 16)
        or stored_bits != bits
        or signed not in (0, 1)
        or rows <= 0
        or columns <= 0
    ):
        return None
    nbytes = rows * columns * bits // 8
    length = nbytes + (nbytes & 1)  # values are padded to an even length
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = 12 if explicit else 8  # tag, [VR, reserved,] length
    start = len(data) - length - head
    if start < 0 or data[start : start + 4] != _PIXEL_DATA_TAG:
        return None
    if explicit:
        if data[start + 4 : start + 6] not in (b"OW", b"OB"):
            return None
        declared = int.from_bytes(data[start + 8 : start + 12], "little")
    else:
        declared = int.from_bytes(data[start + 4 : start + 8], "little")
    if declared != length:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    return np.frombuffer(data, dtype=dtype, count=rows * columns, offset=start + head).reshape(
        1, rows, columns
    )


def _decode(series: SeriesInfo, file_index: int) -> np.ndarray:
    """Stored pixel values of one file as ``(F, H, W)``."""
    path: Path = series.files[file_index]
    direct = _native_pixels(path, series.headers[file_index])
    if direct is not None:
        return direct
    try:
        arr = pixel_array(path)
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise GeometryError(f"cannot decode pixel data of {path.name}: {reason[:200]}") from err
    header = series.headers[file_index]
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        raise GeometryError(f"{path.name} is a colour image, not a CT/MR slice")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise GeometryError(f"{path.name}: unexpected pixel array shape {arr.shape}")
    return arr


def _fill(out: np.ndarray, k: int, stored: np.ndarray, frame: FrameGeometry) -> None:
    """``out[k] = stored * slope + intercept`` in place, float32."""
    view = out[k]
    view[...] = stored
    if frame.slope != 1.0:
        view *= np.float32(frame.slope)
    if frame.intercept != 0.0:
        view += np.float32(frame.intercept)


@dataclass
class GeometryPlan:
    """The grid a series will be read into, worked out from headers alone.

    Attributes:
        slots: one entry per output slice, ordered along the slice normal.
        spacing: slice spacing in mm (first to last position over ``D - 1``).
        normal: ``(3,)`` unit slice normal (row cosine x column cosine).
        row: ``(3,)`` unit row direction cosine (along a row, i.e. columns increase).
        col: ``(3,)`` unit column direction cosine (down a column, rows increase).
        pixel_spacing: ``(row spacing, column spacing)`` in mm.
        rows: H.
        columns: W.
        frame_of_reference_uid: shared FrameOfReferenceUID.
    """

    slots: list[_Slot]
    spacing: float
    normal: np.ndarray
    row: np.ndarray
    col: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    frame_of_reference_uid: str


def plan_geometry(series: SeriesInfo) -> GeometryPlan:
    """Check that ``series`` forms one regular 3D grid, from its headers only.

    Args:
        series: a series from :func:`scan_folder`.

    Returns:
        The slice order and geometry :func:`load_series` will use.

    Raises:
        GeometryError: fewer than 2 slices; mixed orientation, image size,
            pixel spacing or frame of reference; missing position; missing or
            unevenly spaced slices; a sheared stack; a multi-frame image
            without per-frame positions.
    """
    for i, h in enumerate(series.headers):
        if number_of_frames(h) > 1 and "PerFrameFunctionalGroupsSequence" not in h:
            raise GeometryError(
                f"{series.files[i].name} is a multi-frame image without per-frame positions "
                "(no PerFrameFunctionalGroupsSequence); cannot place its frames"
            )
    frames = [f for i, h in enumerate(series.headers) for f in frames_of(h, i)]
    frames = [f for f in frames if f.rows or f.columns]
    if len(frames) < 2:
        raise GeometryError(
            f"series {series.uid} has {len(frames)} image(s); a volume needs at least 2 slices"
        )
    _check_common(series, frames)
    first = frames[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    row, col = _unit_cosines(first.orientation)
    normal = slice_normal(first.orientation)
    slots, _ = _slots(series, frames, normal)
    if len(slots) < 2:
        raise GeometryError(
            f"series {series.uid}: all {len(frames)} images share one position; a volume needs "
            "at least 2 slice positions"
        )
    spacing = _check_spacing(series, slots)
    _check_shear(series, slots, normal, min(first.pixel_spacing))
    return GeometryPlan(
        slots=slots,
        spacing=spacing,
        normal=normal,
        row=row,
        col=col,
        pixel_spacing=first.pixel_spacing,
        rows=first.rows,
        columns=first.columns,
        frame_of_reference_uid=first.frame_of_reference_uid,
    )


def load_series(series: SeriesInfo, workers: int | None = None) -> Volume:
    """Decode ``series`` into a :class:`Volume` (see ``tomoscribe/volume.py``).

    Args:
        series: a series from :func:`scan_folder` (after selection).
        workers: decoding threads; ``None`` picks ``min(4, cpu count)`` for
            series of at least 16 files, else 1.

    Returns:
        A volume whose voxels are ``(D, H, W)`` float32 (HU for CT), ordered
        along the slice normal, with the affine, slice references and headers.

    Raises:
        GeometryError: the series is not one regular 3D grid (see
            :func:`plan_geometry`), duplicates at one position differ, or a
            file's pixel data cannot be decoded.
    """
    plan = plan_geometry(series)
    slots = plan.slots
    notes: list[str] = []
    spacing_note = _spacing_note(slots, plan.spacing)
    if spacing_note:
        notes.append(spacing_note)
    exact_twins = [
        t
        for s in slots
        for t in s.twins
        if (t.sop_instance_uid, t.frame) == (s.frame.sop_instance_uid, s.frame.frame)
    ]
    pixel_twins = [
        (k, t)
        for k, s in enumerate(slots)
        for t in s.twins
        if (t.sop_instance_uid, t.frame) != (s.frame.sop_instance_uid, s.frame.frame)
    ]
    if exact_twins:
        notes.append(f"dropped {len(exact_twins)} repeated reference(s) to the same image")

    depth, height, width = len(slots), plan.rows, plan.columns
    voxels = np.empty((depth, height, width), dtype=np.float32)

    # file -> [(frame index or None, slot k)]
    jobs: dict[int, list[tuple[int | None, int]]] = {}
    for k, s in enumerate(slots):
        jobs.setdefault(s.frame.file_index, []).append((s.frame.frame, k))

    def run(file_index: int) -> None:
        stored = _decode(series, file_index)
        header = series.headers[file_index]
        if "ModalityLUTSequence" in header and "RescaleSlope" not in header:
            # a lookup table instead of slope/intercept (rare for CT/MR)
            stored = apply_modality_lut(stored, header)
        for frame_no, k in jobs[file_index]:
            idx = 0 if frame_no is None else frame_no
            if idx >= stored.shape[0] or stored.shape[1:] != (height, width):
                raise GeometryError(
                    f"{series.files[file_index].name}: pixel data {stored.shape} does not match "
                    f"{height}x{width} frame {idx + 1}"
                )
            _fill(voxels, k, stored[idx], slots[k].frame)

    n_workers = (
        workers
        if workers is not None
        else (min(4, os.cpu_count() or 1) if len(jobs) >= PARALLEL_MIN_FILES else 1)
    )
    if n_workers > 1:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for fut in [pool.submit(run, fi) for fi in jobs]:
                fut.result()
    else:
        for fi in jobs:
            run(fi)

    if pixel_twins:
        conflicts = []
        for k, twin in pixel_twins:
            stored = _decode(series, twin.file_index)
            idx = 0 if twin.frame is None else twin.frame
            other = np.empty((1, height, width), dtype=np.float32)
            if idx >= stored.shape[0] or stored.shape[1:] != (height, width):
                conflicts.append((k, twin))
                continue
            _fill(other, 0, stored[idx], twin)
            if not np.array_equal(other[0], voxels[k]):
                conflicts.append((k, twin))
        if conflicts:
            k, twin = conflicts[0]
            raise GeometryError(
                f"series {series.uid}: {len(conflicts)} slice position(s) hold different images "
                f"(e.g. {_name(series, slots[k].frame)} and {_name(series, twin)} at "
                f"{slots[k].distance:.2f} mm); the series mixes acquisitions, echoes or phases"
            )
        notes.append(
            f"dropped {len(pixel_twins)} duplicate slice(s) identical to another at the same "
            "position"
        )

    affine = np.eye(4, dtype=np.float64)
    row_spacing, col_spacing = plan.pixel_spacing
    affine[:3, 0] = plan.normal * plan.spacing
    affine[:3, 1] = plan.col * row_spacing
    affine[:3, 2] = plan.row * col_spacing
    affine[:3, 3] = slots[0].position

    used: list[int] = list(dict.fromkeys(s.frame.file_index for s in slots))
    header0 = series.headers[slots[0].frame.file_index]
    return Volume(
        voxels=voxels,
        affine=affine,
        slices=[
            SliceRef(
                sop_instance_uid=s.frame.sop_instance_uid,
                sop_class_uid=s.frame.sop_class_uid,
                frame_number=None if s.frame.frame is None else s.frame.frame + 1,
            )
            for s in slots
        ],
        headers=[series.headers[i] for i in used],
        modality=series.modality or str(header0.get("Modality", "")),
        study_instance_uid=series.study_uid,
        series_instance_uid=series.uid,
        frame_of_reference_uid=plan.frame_of_reference_uid,
        notes=notes,
    )
