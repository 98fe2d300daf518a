"""Small synthetic CT/MR series written as real DICOM files, for tests.

Each slice's pixel values encode its slice index (see :func:`expected_stored`),
so a test can check that a loader put every slice in the right place. Not a phantom: for anatomy
like test data see ``tomoscribe.phantom``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
ENHANCED_MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
COMPREHENSIVE_SR = UID("1.2.840.10008.5.1.4.1.1.88.33")

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def expected_stored(k: int, rows: int, columns: int) -> np.ndarray:
    """Stored values ``(rows, columns)`` int16 of the slice at sorted index ``k``.

    Value ``k * 10 + (r + c) % 7``: the slice index is ``value // 10``.
    """
    r = np.arange(rows)[:, None]
    c = np.arange(columns)[None, :]
    return (k * 10 + (r + c) % 7).astype(np.int16)


def _base(
    modality: str,
    sop_class: UID,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    series_number: int,
    description: str,
    image_type: Sequence[str],
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.StudyDescription = "synthetic study"
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "SYNTH001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Manufacturer = "synthetic"
    ds.PatientPosition = "HFS"
    ds.ImageType = list(image_type)
    return ds


def _pixels(ds: Dataset, rows: int, columns: int, photometric: str = "MONOCHROME2") -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1


def save_dicom(ds: Dataset, path: Path, syntax: UID = ExplicitVRLittleEndian) -> None:
    """Write ``ds`` as a DICOM Part 10 file (file meta built from the dataset)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def slice_positions(
    n: int,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 2.5,
    origin: Sequence[float] = (-40.0, -40.0, 10.0),
) -> list[tuple[float, float, float]]:
    """ImagePositionPatient of ``n`` evenly spaced slices along the slice normal."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, col)
    o = np.asarray(origin, dtype=np.float64)
    return [tuple(float(x) for x in o + k * spacing * normal) for k in range(n)]  # type: ignore[misc]


def write_series(
    folder: Path,
    n: int = 10,
    rows: int = 32,
    columns: int = 32,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 2.5,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    positions: Sequence[Sequence[float]] | None = None,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    description: str = "AX synthetic",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    thickness: float | None = None,
    seed: int = 0,
    photometric: str = "MONOCHROME2",
    syntax: UID = ExplicitVRLittleEndian,
    gantry_tilt: float | None = None,
) -> list[Path]:
    """Write ``n`` single-frame slices into ``folder`` with shuffled file names.

    Slice ``k`` (in order along the normal) stores :func:`expected_stored` ``(k)``;
    InstanceNumber runs in the opposite direction and file names are random,
    so neither can be used to sort.

    Args:
        folder: created if missing.
        n: number of slices.
        rows: H.
        columns: W.
        orientation: ImageOrientationPatient.
        spacing: distance between slices in mm.
        pixel_spacing: PixelSpacing (row, column) in mm.
        positions: explicit ImagePositionPatient per slice (overrides ``spacing``).
        modality: "CT" (CT Image Storage) or "MR" (MR Image Storage).
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        study_uid: StudyInstanceUID (new if ``None``).
        series_uid: SeriesInstanceUID (new if ``None``).
        series_number: SeriesNumber.
        description: SeriesDescription.
        image_type: ImageType.
        thickness: SliceThickness (``spacing`` if ``None``).
        seed: shuffles file names.
        photometric: PhotometricInterpretation (the stored values are the same).
        syntax: transfer syntax; a compressed one (RLE Lossless, JPEG 2000
            Lossless...) is encoded with pydicom's encoders.
        gantry_tilt: GantryDetectorTilt in degrees (written only; give sheared
            ``positions`` for a tilted stack).

    Returns:
        The written paths, in slice order ``k``.
    """
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    pos = (
        [tuple(p) for p in positions]
        if positions is not None
        else slice_positions(n, orientation, spacing)
    )
    rng = np.random.default_rng(seed)
    names = rng.permutation(len(pos))
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    paths = []
    for k, p in enumerate(pos):
        ds = _base(
            modality,
            sop_class,
            study_uid,
            series_uid,
            for_uid,
            series_number,
            description,
            image_type,
        )
        ds.InstanceNumber = len(pos) - k
        ds.ImagePositionPatient = [f"{v:.6g}" for v in p]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
        ds.SliceThickness = f"{thickness if thickness is not None else spacing:.6g}"
        ds.RescaleSlope = f"{slope:.6g}"
        ds.RescaleIntercept = f"{intercept:.6g}"
        ds.RescaleType = "HU" if modality == "CT" else "US"
        _pixels(ds, rows, columns, photometric)
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = f"{gantry_tilt:.6g}"
        stored = expected_stored(k, rows, columns)
        if syntax == ExplicitVRLittleEndian:
            ds.PixelData = stored.tobytes()
        else:
            ds.compress(syntax, stored)
        path = Path(folder) / f"img{int(names[k]):04d}"
        save_dicom(ds, path, syntax)
        paths.append(path)
    return paths


def write_enhanced(
    path: Path,
    n: int = 6,
    rows: int = 16,
    columns: int = 16,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 3.0,
    pixel_spacing: tuple[float, float] = (0.9, 0.9),
    modality: str = "MR",
    slope: float = 2.0,
    intercept: float = 5.0,
    frame_order: Sequence[int] | None = None,
) -> Path:
    """Write one enhanced multi-frame instance with per-frame positions.

    Frame ``i`` holds slice ``frame_order[i]`` (default: reversed order), so
    the loader must sort by position. Orientation and pixel measures are in the
    shared functional groups; positions and rescale values are per frame.

    Returns:
        ``path``.
    """
    order = list(frame_order) if frame_order is not None else list(range(n))[::-1]
    sop_class = ENHANCED_MR_IMAGE if modality == "MR" else ENHANCED_CT_IMAGE
    ds = _base(
        modality,
        sop_class,
        generate_uid(),
        generate_uid(),
        generate_uid(),
        7,
        "enhanced synthetic",
        ("ORIGINAL", "PRIMARY", "VOLUME", "NONE"),
    )
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    _pixels(ds, rows, columns)
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    shared.PlaneOrientationSequence = DicomSequence([ori])
    meas = Dataset()
    meas.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
    meas.SliceThickness = f"{spacing:.6g}"
    shared.PixelMeasuresSequence = DicomSequence([meas])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    positions = slice_positions(n, orientation, spacing)
    per_frame = []
    frames = []
    for k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [f"{v:.6g}" for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([pos])
        val = Dataset()
        val.RescaleSlope = f"{slope:.6g}"
        val.RescaleIntercept = f"{intercept:.6g}"
        val.RescaleType = "US"
        item.PixelValueTransformationSequence = DicomSequence([val])
        per_frame.append(item)
        frames.append(expected_stored(k, rows, columns))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    save_dicom(ds, Path(path))
    return Path(path)


def write_sr(path: Path, study_uid: str | None = None) -> Path:
    """Write a minimal Comprehensive SR instance (no pixel data) to ``path``."""
    ds = _base(
        "SR",
        COMPREHENSIVE_SR,
        study_uid or generate_uid(),
        generate_uid(),
        generate_uid(),
        99,
        "report",
        (),
    )
    del ds.ImageType
    del ds.FrameOfReferenceUID
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    save_dicom(ds, Path(path))
    return Path(path)
