"""Find the DICOM series in a folder, reading headers only.

:func:`scan_folder` walks a folder of any layout (PACS export, DICOMDIR media,
one flat folder, files without extension), reads every file's header up to the
pixel data and groups instances into :class:`SeriesInfo` records by
StudyInstanceUID and SeriesInstanceUID. No pixel data is decoded here.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from tomoscribe.dicomio.frames import (
    FrameGeometry,
    frames_of,
    number_of_frames,
    orientation_label,
    slice_normal,
)
from tomoscribe.dicomio.header import PixelLocation, raw_text, read_header
from tomoscribe.errors import InputError

#: Media Storage Directory Storage: a DICOMDIR index, not an instance.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: how many examples of skipped files a note names
_NOTE_EXAMPLES = 3


@dataclass
class SeriesInfo:
    """One series as seen from its headers.

    Attributes:
        uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        modality: Modality ("CT", "MR", "SR", ...; "" when absent).
        description: SeriesDescription ("" when absent).
        body_part: BodyPartExamined ("" when absent).
        series_number: SeriesNumber or ``None``.
        sop_class_uid: the SOP class most instances of the series have.
        sop_class_uids: every SOP class seen in the series.
        image_type: ImageType values of the first instance, upper case.
        orientation: "Axial", "Coronal", "Sagittal", "Oblique", "Mixed" (images
            of the series lie in different planes), or "" when the headers
            carry no ImageOrientationPatient.
        slice_count: number of 2D images (frames summed over instances).
        pixel_spacing: PixelSpacing ``(row, column)`` in mm of the first image.
        slice_thickness: SliceThickness in mm of the first image.
        slice_spacing: median distance in mm between neighbouring image
            positions along the slice normal (``None`` if not computable).
        files: one path per instance.
        headers: one dataset (no pixel data) per instance, same order as ``files``.
        pixel_locations: where each file's uncompressed Pixel Data value starts
            (``None`` when unknown; may be empty), same order as ``files``.
    """

    uid: str
    study_uid: str
    modality: str = ""
    description: str = ""
    body_part: str = ""
    series_number: int | None = None
    sop_class_uid: str = ""
    sop_class_uids: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ()
    orientation: str = ""
    slice_count: int = 0
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    slice_spacing: float | None = None
    files: list[Path] = field(default_factory=list, repr=False)
    headers: list[Dataset] = field(default_factory=list, repr=False)
    pixel_locations: list[PixelLocation | None] = field(default_factory=list, repr=False)
    _frames: list[FrameGeometry] | None = field(default=None, init=False, repr=False, compare=False)
    _frames_key: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def frames(self) -> list[FrameGeometry]:
        """Every frame's geometry (:func:`frames_of` over :attr:`headers`), worked out once.

        Scan, selection and loading all need it; it is recomputed when
        :attr:`headers` holds other dataset objects, not when a header is
        edited in place (build a new record for that).
        """
        key = tuple(id(h) for h in self.headers)
        if self._frames is None or key != self._frames_key:
            self._frames = [f for i, h in enumerate(self.headers) for f in frames_of(h, i)]
            self._frames_key = key
        return self._frames

    @property
    def sop_class_name(self) -> str:
        """Human name of :attr:`sop_class_uid` (the UID itself if unknown)."""
        name = UID(self.sop_class_uid).name if self.sop_class_uid else "no SOP class"
        return str(name).removesuffix(" Storage") if name else self.sop_class_uid

    @property
    def instance_count(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        """A short one-line description, e.g. ``#3 'AX 1mm' CT 120 Axial slices 1.0 mm``."""
        parts = []
        if self.series_number is not None:
            parts.append(f"#{self.series_number}")
        if self.description:
            parts.append(repr(self.description))
        parts.append(self.modality or "?")
        parts.append(self.sop_class_name)
        parts.append(
            f"{self.slice_count} {self.orientation + ' ' if self.orientation else ''}images"
        )
        thick = self.slice_thickness or self.slice_spacing
        if thick:
            parts.append(f"{thick:g} mm")
        return " ".join(parts)


@dataclass
class StudyIndex:
    """What :func:`scan_folder` found.

    Attributes:
        root: the scanned folder (or file).
        series: every series found, ordered by study, series number, then UID.
        files_seen: regular files looked at.
        files_dicom: files read as DICOM instances and indexed.
        notes: one line per thing skipped on the way (non-DICOM files,
            DICOMDIR, unreadable files, repeated instances).
    """

    root: Path
    series: list[SeriesInfo] = field(default_factory=list)
    files_seen: int = 0
    files_dicom: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def study_uids(self) -> list[str]:
        """The StudyInstanceUIDs present, in order of :attr:`series`."""
        return list(dict.fromkeys(s.study_uid for s in self.series))

    def get(self, series_uid: str) -> SeriesInfo:
        """The series with SeriesInstanceUID ``series_uid`` (KeyError if absent)."""
        for s in self.series:
            if s.uid == series_uid:
                return s
        raise KeyError(series_uid)


def _looks_like_raw_dataset(path: Path) -> bool:
    """Whether a file without preamble starts like a little-endian dataset.

    Some exporters write DICOM without the 128-byte preamble and ``DICM``
    prefix. Such a file starts with an element of group 0x0002 or 0x0008.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    if len(head) < 4:
        return False
    group = int.from_bytes(head[:2], "little")
    return group in (0x0002, 0x0008)


def _read_header(path: Path) -> tuple[Dataset, PixelLocation | None] | str:
    """The header of ``path`` and its pixel location, or why it is skipped ("not DICOM: ...")."""
    location = None
    try:
        try:
            ds, location = read_header(path)
        except InvalidDicomError:
            if not _looks_like_raw_dataset(path):
                return "not DICOM"
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, EOFError) as err:
        return f"unreadable: {' '.join(str(err).split())[:120]}"
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    except Exception as err:  # pydicom raises many kinds on corrupt input
        return f"unreadable: {type(err).__name__}: {' '.join(str(err).split())[:120]}"
    media_class = raw_text(ds.file_meta, 0x00020002) if ds.file_meta else None
    if media_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    missing = [
        kw for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if kw not in ds
    ]
    if missing:
        return f"not a DICOM instance (no {', '.join(missing)})"
    return ds, location


def _walk(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), sorted, no symlink loops."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                found.append(p)
    return found


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _build_series(
    uid: str,
    study_uid: str,
    files: list[Path],
    headers: list[Dataset],
    locations: list[PixelLocation | None],
) -> SeriesInfo:
    first = headers[0]
    classes = Counter(raw_text(h, 0x00080016) or "" for h in headers)
    record = SeriesInfo(uid=uid, study_uid=study_uid, files=files, headers=headers,
                        pixel_locations=locations)  # fmt: skip
    frames = record.frames()
    geometry = [f for f in frames if f.orientation is not None]
    orientation = geometry[0].orientation if geometry else None
    spacing: float | None = None
    if orientation is not None:
        try:
            normal = slice_normal(orientation)
        except ValueError:
            normal = None
        if normal is not None:
            dist = np.sort(
                [float(np.dot(normal, f.position)) for f in geometry if f.position is not None]
            )
            steps = np.diff(dist)
            steps = steps[steps > 1e-3]
            if steps.size:
                spacing = float(np.median(steps))
    label = orientation_label(orientation)
    if orientation is not None and any(
        max(abs(a - b) for a, b in zip(f.orientation, orientation, strict=True)) > 1e-3
        for f in geometry
        if f.orientation is not None
    ):
        label = "Mixed"
    image_type = tuple(str(v).strip().upper() for v in (first.get("ImageType") or ()))
    record.modality = str(first.get("Modality", "") or "")
    record.description = str(first.get("SeriesDescription", "") or "").strip()
    record.body_part = str(first.get("BodyPartExamined", "") or "").strip()
    record.series_number = _int_or_none(first.get("SeriesNumber"))
    record.sop_class_uid = classes.most_common(1)[0][0]
    record.sop_class_uids = tuple(classes)
    record.image_type = image_type
    record.orientation = label
    record.slice_count = sum(number_of_frames(h) for h in headers if "Rows" in h)
    record.pixel_spacing = frames[0].pixel_spacing if frames else None
    record.slice_thickness = frames[0].slice_thickness if frames else None
    record.slice_spacing = spacing
    return record


def _note(notes: list[str], what: str, paths: list[Path], root: Path) -> None:
    if not paths:
        return
    names = []
    for p in paths[:_NOTE_EXAMPLES]:
        try:
            names.append(str(p.relative_to(root)) if p != root else p.name)
        except ValueError:
            names.append(str(p))
    more = f" and {len(paths) - _NOTE_EXAMPLES} more" if len(paths) > _NOTE_EXAMPLES else ""
    notes.append(f"skipped {len(paths)} {what}: {', '.join(names)}{more}")


def scan_folder(path: Path | str) -> StudyIndex:
    """Index the DICOM series under ``path`` from their headers.

    Args:
        path: a folder (walked recursively, any layout and file names) or one file.

    Returns:
        A :class:`StudyIndex` whose series hold headers without pixel data.

    Raises:
        InputError: ``path`` does not exist, or holds no readable DICOM instance.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"input {root} does not exist")
    files = _walk(root)
    index = StudyIndex(root=root, files_seen=len(files))

    skipped: dict[str, list[Path]] = {}
    unreadable: list[tuple[Path, str]] = []
    groups: dict[
        tuple[str, str], tuple[list[Path], list[Dataset], list[PixelLocation | None]]
    ] = {}
    seen_sops: dict[str, Path] = {}
    repeated: list[Path] = []
    for p in files:
        got = _read_header(p)
        if isinstance(got, str):
            if got.startswith("unreadable"):
                unreadable.append((p, got))
            else:
                skipped.setdefault(got, []).append(p)
            continue
        ds, location = got
        sop = raw_text(ds, 0x00080018) or ""
        if sop in seen_sops:
            repeated.append(p)
            continue
        seen_sops[sop] = p
        key = (raw_text(ds, 0x0020000D) or "", raw_text(ds, 0x0020000E) or "")
        paths, headers, locations = groups.setdefault(key, ([], [], []))
        paths.append(p)
        headers.append(ds)
        locations.append(location)
        index.files_dicom += 1

    for what, paths in skipped.items():
        label = "DICOMDIR index file(s)" if what == "DICOMDIR" else f"file(s), {what}"
        _note(index.notes, label, paths, root)
    for p, why in unreadable[:_NOTE_EXAMPLES]:
        _note(index.notes, f"file, {why}", [p], root)
    if len(unreadable) > _NOTE_EXAMPLES:
        index.notes.append(f"skipped {len(unreadable) - _NOTE_EXAMPLES} more unreadable files")
    _note(index.notes, "file(s) repeating an instance already read", repeated, root)

    if not groups:
        raise InputError(f"no DICOM files found in {root} ({len(files)} files read, none DICOM)")

    series = [
        _build_series(series_uid, study_uid, p, h, loc)
        for (study_uid, series_uid), (p, h, loc) in groups.items()
    ]
    series.sort(
        key=lambda s: (
            s.study_uid,
            s.series_number if s.series_number is not None else 1 << 30,
            s.uid,
        )
    )
    index.series = series
    return index
