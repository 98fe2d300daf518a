"""Decode one chosen series into a :class:`~tomoscribe.volume.Volume`.

Headers were read by :func:`~tomoscribe.dicomio.scan.scan_folder`; here the
geometry is checked first (before any pixel is decoded), then the pixel data
of the series' files only is decoded, straight into a preallocated
``(D, H, W)`` float32 array, rescaled to Hounsfield units for CT.

Slices are ordered by their position projected on the slice normal (row
cosine x column cosine of ImageOrientationPatient), never by file name or
InstanceNumber. Classic single-frame CT/MR and enhanced multi-frame CT/MR
(per-frame functional groups) are read.

Decoding: uncompressed little-endian slices are read straight from the file
(one seek and one read, at the Pixel Data offset the header scan recorded).
Compressed series (JPEG 2000, JPEG-LS, JPEG...) of at least
:data:`PROCESS_MIN_FILES` files and :data:`PROCESS_MIN_PIXELS` pixels are
decoded by N decoders: this thread and N - 1 worker processes
(:mod:`tomoscribe.dicomio.decoder`), because the decoders pydicom uses
(pylibjpeg-openjpeg, pylibjpeg-libjpeg, pyjpegls) hold the GIL, so threads
do not run them in parallel. Workers leave each file's stored values in
shared memory; they are written into the preallocated float32 volume as they
arrive, so memory stays about one volume. N is the number of CPUs this process
may use (``os.sched_getaffinity``), at most :data:`MAX_PROCESSES`, unless the
``workers`` argument or the environment variable :data:`WORKERS_ENV` says
otherwise (``1``: no worker processes). With the default count the workers
are kept for the next series (started once per process, closed at exit); an
explicit ``workers`` count starts them for that series only. If the pool
cannot start, the series is decoded in this process and a note says so; if a
worker process dies, loading stops with a one-line :class:`DecodeWorkerError`
(the next series starts new workers).

MONOCHROME1 (the lowest value is displayed white) is made "higher is
brighter" (see :func:`_monochrome1`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array

from tomoscribe.dicomio.decoder import DecoderPool, PoolStartError, shared_pool
from tomoscribe.dicomio.frames import FrameGeometry, number_of_frames, slice_normal
from tomoscribe.dicomio.header import PixelLocation, raw_int, raw_text
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
#: decode a compressed series in worker processes when it has at least this many
#: files and pixels (starting a worker costs about 0.5 s: about 4 M pixels of JPEG 2000)
PROCESS_MIN_FILES = 8
PROCESS_MIN_PIXELS = 16_000_000
#: at most this many decoding processes by default
MAX_PROCESSES = 8
#: environment variable setting the number of decoding processes ("1": none)
WORKERS_ENV = "TOMOSCRIBE_DECODE_WORKERS"


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
    orientations = np.asarray([f.orientation for f in frames], dtype=np.float64)
    off = np.max(np.abs(orientations - orientations[0]), axis=1)
    if off.max() > ORIENTATION_TOL:
        f = frames[int(np.argmax(off > ORIENTATION_TOL))]
        raise GeometryError(
            f"series {series.uid} mixes slice orientations ({_name(series, first)} vs "
            f"{_name(series, f)}); it is not one volume"
        )
    spacings = np.asarray([f.pixel_spacing for f in frames], dtype=np.float64)
    ref_sp = spacings[0]
    close = np.all(np.abs(spacings - ref_sp) <= 1e-4 + SPACING_RTOL * np.abs(ref_sp), axis=1)
    if not close.all():
        f = frames[int(np.argmin(close))]
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
    """Slice origins must lie on the line through the first along ``normal``.

    A gantry-tilted CT (GantryDetectorTilt != 0) has slices perpendicular to
    the tilted gantry while the table moves along the patient axis, so each
    slice origin is shifted in-plane from the last: the voxel grid is sheared.
    Such a series is refused, on purpose, rather than read with a sheared
    affine: :class:`~tomoscribe.volume.Volume` promises an orthogonal grid
    (``affine[:3, 0]`` is the slice normal times the spacing, and
    ``Volume.spacing`` is what the model's resampling and the measurement
    writers use), so a sheared affine would be carried along and then
    silently ignored, misplacing findings by up to the accumulated shift
    (tens of mm over a tilted head CT). Resampling onto an orthogonal grid
    first is the honest fix; the message says so, with the tilt angle when
    the headers give it.
    """
    origin = slots[0].position
    worst = 0.0
    for s in slots:
        off = s.position - origin
        perp = off - np.dot(off, normal) * normal
        worst = max(worst, float(np.linalg.norm(perp)))
    if worst > max(0.01, SHEAR_FRACTION * pixel):
        header = series.headers[slots[0].frame.file_index]
        tilt = raw_text(header, 0x00181120)
        try:
            angle = float(tilt) if tilt else 0.0
        except ValueError:
            angle = 0.0
        cause = (
            f"acquired with a gantry tilt of {angle:g} degrees"
            if angle and math.isfinite(angle)
            else "gantry tilt or a sheared stack"
        )
        raise GeometryError(
            f"series {series.uid}: slice origins stray up to {worst:.3g} mm from the slice normal "
            f"({cause}); tomoscribe reads only orthogonal grids, resample (de-tilt) the series "
            "first"
        )


#: uncompressed little-endian transfer syntaxes -> explicit VR?
_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _syntax(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None)
    return (raw_text(meta, 0x00020010) or "") if meta else ""


def is_compressed(header: Dataset) -> bool:
    """Whether ``header``'s pixel data need a decoder (not uncompressed little endian)."""
    return _syntax(header) not in _NATIVE_LITTLE_ENDIAN


def _native_layout(header: Dataset) -> tuple[np.dtype, int, int, int] | None:
    """``(dtype, rows, columns, unused high bits)`` of a native one-frame image, or ``None``."""
    if _syntax(header) not in _NATIVE_LITTLE_ENDIAN:
        return None
    rows, columns = raw_int(header, 0x00280010), raw_int(header, 0x00280011)
    bits, stored_bits = raw_int(header, 0x00280100), raw_int(header, 0x00280101)
    signed = raw_int(header, 0x00280103)
    samples = raw_int(header, 0x00280002)
    if (
        samples not in (None, 1)
        or "NumberOfFrames" in header
        or bits not in (8, 16)
        or not stored_bits
        or not 0 < stored_bits <= bits
        or signed not in (0, 1)
        or not rows
        or not columns
        or rows <= 0
        or columns <= 0
    ):
        return None
    assert bits is not None
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}"), rows, columns, bits - stored_bits


def _clear_unused_bits(arr: np.ndarray, unused: int) -> np.ndarray:
    """Drop the ``unused`` high bits (BitsStored < BitsAllocated) as pydicom does.

    PS3.5 8.1.1: the unused bits' values cannot be assumed; a left then right
    shift in the stored dtype masks them (unsigned) or sign-extends from the
    top stored bit (signed), which is what :func:`pydicom.pixels.pixel_array`
    returns.
    """
    if unused:
        if not arr.flags.writeable:
            arr = arr.copy()
        np.left_shift(arr, unused, out=arr)
        np.right_shift(arr, unused, out=arr)
    return arr


def _native_pixels(
    path: Path, header: Dataset, location: PixelLocation | None = None
) -> np.ndarray | None:
    """Stored values ``(1, H, W)`` of an uncompressed single-frame file, read directly.

    Parsing the whole file again (as :func:`pydicom.pixels.pixel_array` does)
    costs as much as the scan did; for the common case, a little-endian
    uncompressed single-frame image, the values are read straight from the
    file: at ``location`` (recorded by the header scan) with one seek and one
    read, else from the end of the file when the Pixel Data element ends it.
    Unused high bits (BitsStored < BitsAllocated) are cleared as pydicom
    clears them. Returns ``None`` (use pydicom) whenever anything differs from
    that case: other transfer syntax, several frames or samples, a length that
    does not match Rows x Columns.
    """
    layout = _native_layout(header)
    if layout is None:
        return None
    dtype, rows, columns, unused = layout
    nbytes = rows * columns * dtype.itemsize
    length = nbytes + (nbytes & 1)  # values are padded to an even length
    if location is not None and location.length == length:
        out = np.empty((1, rows, columns), dtype=dtype)
        try:
            with path.open("rb") as fh:
                fh.seek(location.offset)
                got = fh.readinto(out.data.cast("B"))
        except OSError:
            return None
        return _clear_unused_bits(out, unused) if got == nbytes else None
    explicit = _NATIVE_LITTLE_ENDIAN[_syntax(header)]
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
    arr = np.frombuffer(data, dtype=dtype, count=rows * columns, offset=start + head)
    return _clear_unused_bits(arr.reshape(1, rows, columns), unused)


def _decode_path(path: Path) -> np.ndarray:
    """Stored pixel values of one file as ``(F, H, W)``, decoded by pydicom."""
    try:
        arr = pixel_array(path)
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise GeometryError(f"cannot decode pixel data of {path.name}: {reason[:200]}") from err
    return arr


def _decode(series: SeriesInfo, file_index: int) -> np.ndarray:
    """Stored pixel values of one file, decoded in this process."""
    path: Path = series.files[file_index]
    locations = series.pixel_locations
    location = locations[file_index] if len(locations) == len(series.files) else None
    direct = _native_pixels(path, series.headers[file_index], location)
    if direct is not None:
        return direct
    return _decode_path(path)


def _check_stored(series: SeriesInfo, file_index: int, arr: np.ndarray) -> np.ndarray:
    """``arr`` as ``(F, H, W)`` stored values of one grey-scale image, else GeometryError."""
    path = series.files[file_index]
    header = series.headers[file_index]
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        raise GeometryError(f"{path.name} is a colour image, not a CT/MR slice")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise GeometryError(f"{path.name}: unexpected pixel array shape {arr.shape}")
    return arr


def _fill(out: np.ndarray, k: int, stored: np.ndarray, frame: FrameGeometry) -> None:
    """``out[k] = stored * slope + intercept`` in place, float32, in one pass where possible."""
    view = out[k]
    if frame.slope != 1.0:
        np.multiply(stored, np.float32(frame.slope), out=view, dtype=np.float32)
        if frame.intercept != 0.0:
            view += np.float32(frame.intercept)
    elif frame.intercept != 0.0:
        np.add(stored, np.float32(frame.intercept), out=view, dtype=np.float32)
    else:
        view[...] = stored


def _stored_range(header: Dataset) -> tuple[float, float] | None:
    """The smallest and largest stored value BitsStored/PixelRepresentation allow."""
    bits = raw_int(header, 0x00280101) or raw_int(header, 0x00280100)
    signed = raw_int(header, 0x00280103) or 0
    if not bits or bits > 32:
        return None
    if signed:
        return float(-(1 << (bits - 1))), float((1 << (bits - 1)) - 1)
    return 0.0, float((1 << bits) - 1)


def _monochrome1(series: SeriesInfo, header: Dataset) -> str:
    """What is done to a MONOCHROME1 series: ``"keep"`` or ``"invert"``.

    MONOCHROME1 says the lowest value is displayed white. Radiologists, and
    the model, expect higher values brighter, so values are mirrored within
    their range after rescaling: ``v' = lo + hi - v``, where ``[lo, hi]`` is
    the range BitsStored/PixelRepresentation allow, rescaled. Range and
    spacing of values are kept, only their order reverses.

    Except Hounsfield units: for CT whose RescaleType is absent or "HU", the
    rescaled values are HU, a physical scale defined by the Modality LUT
    (PS3.3 C.7.6.3.1.2: the photometric interpretation applies after it,
    to display only). Inverting them would turn air into bone, so they are
    kept as they are (higher HU is already denser, and brighter in every CT
    window) and a note says the series was MONOCHROME1.
    """
    rescale_type = (raw_text(header, 0x00281054) or "").upper()
    modality = (series.modality or raw_text(header, 0x00080060) or "").upper()
    if modality == "CT" and rescale_type in ("", "HU"):
        return "keep"
    return "invert"


def _values(series: SeriesInfo, file_index: int, decoded: np.ndarray) -> np.ndarray:
    """Checked ``(F, H, W)`` values of one file, through its Modality LUT if it has one."""
    stored = _check_stored(series, file_index, decoded)
    header = series.headers[file_index]
    if "ModalityLUTSequence" in header and "RescaleSlope" not in header:
        # a lookup table instead of slope/intercept (rare for CT/MR)
        stored = apply_modality_lut(stored, header)
    return stored


def _invert(voxels: np.ndarray, k: int, series: SeriesInfo, frame: FrameGeometry) -> None:
    """Mirror slice ``k`` within its rescaled value range (MONOCHROME1 -> higher is brighter)."""
    header = series.headers[frame.file_index]
    view = voxels[k]
    if "ModalityLUTSequence" in header and "RescaleSlope" not in header:
        try:
            table = np.asarray(header.ModalityLUTSequence[0].LUTData, dtype=np.float64)
            lo, hi = float(table.min()), float(table.max())
        except (AttributeError, IndexError, TypeError, ValueError):
            lo, hi = float(view.min()), float(view.max())
    else:
        bounds = _stored_range(header)
        if bounds is None:
            lo, hi = float(view.min()), float(view.max())
        else:
            lo, hi = (b * frame.slope + frame.intercept for b in bounds)
    np.subtract(np.float32(lo + hi), view, out=view)


def available_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``, else ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_processes() -> int:
    """Decoding processes for a compressed series: :data:`WORKERS_ENV`, else the CPUs."""
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        try:
            return max(1, int(text))
        except ValueError:
            pass  # a malformed setting: use the default
    return min(MAX_PROCESSES, available_cpus())


def _decode_in_processes(
    series: SeriesInfo,
    files: list[int],
    processes: int,
    place: Callable[[int, np.ndarray], None],
    keep: bool = False,
) -> str | None:
    """Decode ``files`` of ``series`` with ``processes`` decoders, calling ``place``.

    The decoders are this thread and ``processes - 1`` worker processes; they
    take files one at a time from one queue, so this thread decodes from the
    first moment while the workers start. Each file's stored values are
    written into the volume (``place``) as soon as they are decoded, so no
    more than a few slices per worker wait in memory. With ``keep``, the
    workers are the process-wide pool (:func:`~tomoscribe.dicomio.decoder.shared_pool`),
    kept for the next series; else they are started for this series and ended.

    Returns:
        ``None`` when done; a note when the workers could not be started (the
        caller then decodes in this process).

    Raises:
        DecodeWorkerError: a worker process died.
        GeometryError: a file could not be decoded (as in this process).
    """
    try:
        with shared_pool(processes - 1) if keep else DecoderPool(processes - 1) as pool:
            pool.run([(fi, str(series.files[fi])) for fi in files], place,
                     f"series {series.uid}", local=lambda p: _decode_path(Path(p)))
    except PoolStartError as err:
        return f"decoding processes could not start ({_reason(err)}); decoded in one process"
    return None


def _reason(err: BaseException) -> str:
    return (" ".join(str(err).split()) or type(err).__name__)[:160]


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
    frames = list(series.frames())
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
        workers: decoding processes for a compressed series, else decoding
            threads; 1 decodes everything in this thread. ``None`` picks
            :func:`default_processes` processes (``$TOMOSCRIBE_DECODE_WORKERS``,
            else the usable CPUs) for a compressed series large enough to
            pay for them (:data:`PROCESS_MIN_FILES`, :data:`PROCESS_MIN_PIXELS`),
            kept for later series, else ``min(4, CPUs)`` threads for series
            of at least 16 files. An explicit count starts its worker
            processes for this call only.

    Returns:
        A volume whose voxels are ``(D, H, W)`` float32 (HU for CT), ordered
        along the slice normal, with the affine, slice references and headers.

    Raises:
        GeometryError: the series is not one regular 3D grid (see
            :func:`plan_geometry`), duplicates at one position differ, or a
            file's pixel data cannot be decoded.
        DecodeWorkerError: a decoding worker process died.
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

    def place(file_index: int, decoded: np.ndarray) -> None:
        stored = _values(series, file_index, decoded)
        for frame_no, k in jobs[file_index]:
            idx = 0 if frame_no is None else frame_no
            if idx >= stored.shape[0] or stored.shape[1:] != (height, width):
                raise GeometryError(
                    f"{series.files[file_index].name}: pixel data {stored.shape} does not match "
                    f"{height}x{width} frame {idx + 1}"
                )
            _fill(voxels, k, stored[idx], slots[k].frame)

    def run(file_index: int) -> None:
        place(file_index, _decode(series, file_index))

    files = list(jobs)
    processes = 1
    if len(files) >= 2 and any(is_compressed(series.headers[fi]) for fi in files):
        if workers is not None:
            processes = min(workers, len(files))
        elif len(files) >= PROCESS_MIN_FILES and depth * height * width >= PROCESS_MIN_PIXELS:
            processes = default_processes()
    done_in_pool = False
    if processes > 1:
        # the default pool is kept for later series; an explicit count gets its own
        note = _decode_in_processes(series, files, processes, place, keep=workers is None)
        if note:
            notes.append(note)
        else:
            done_in_pool = True
    if not done_in_pool:
        n_threads = (
            workers
            if workers is not None
            else (min(4, available_cpus()) if len(jobs) >= PARALLEL_MIN_FILES else 1)
        )
        if n_threads > 1:
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                for fut in [pool.submit(run, fi) for fi in files]:
                    fut.result()
        else:
            for fi in files:
                run(fi)

    if pixel_twins:
        conflicts = []
        for k, twin in pixel_twins:
            stored = _values(series, twin.file_index, _decode(series, twin.file_index))
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

    monochrome1 = [
        k
        for k, s in enumerate(slots)
        if (raw_text(series.headers[s.frame.file_index], 0x00280004) or "").upper()
        == "MONOCHROME1"
    ]
    if monochrome1:
        header = series.headers[slots[monochrome1[0]].frame.file_index]
        if _monochrome1(series, header) == "keep":
            notes.append(
                "MONOCHROME1 series: values kept as Hounsfield units (the photometric "
                "interpretation only says how to display them)"
            )
        else:
            for k in monochrome1:
                _invert(voxels, k, series, slots[k].frame)
            notes.append(
                f"MONOCHROME1 series: {len(monochrome1)} slice(s) inverted within their value "
                "range so that higher values are brighter"
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
