"""Synthetic CT chest-abdomen phantoms with ground truth, and their DICOM series.

A phantom is an analytic body: an elliptic-cylinder trunk with a fat layer,
a spine, two lungs, liver, spleen and two kidneys as jittered ellipsoids with
realistic Hounsfield units, and 0-3 focal lesions (liver and spleen hypodense
lesions, lung nodules, kidney cysts) of 10-35 mm. Everything is defined in
patient coordinates (LPS, millimetres), so the same phantom can be rendered on
any grid: an acquisition grid (what a scanner would store, written as DICOM)
or directly on the model's grid.

Every random choice comes from ``numpy.random.default_rng(seed)``, so a seed
identifies a phantom: training, validation and test sets are disjoint seed
ranges (:data:`SPLITS`).

Run ``python -m tomoscribe.phantom --seed 7 --out DIR`` to write one study.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from tomoscribe.report import LESION_KINDS, ORGANS

#: Disjoint seed ranges. Training draws from ``train``; the benchmark only
#: ever uses ``test``.
SPLITS: dict[str, range] = {
    "train": range(0, 1_000_000),
    "val": range(1_000_000, 1_001_000),
    "test": range(2_000_000, 2_001_000),
}

#: Label values of the ground-truth label map: organs 1..7 in ORGANS order,
#: every lesion :data:`LESION_LABEL`.
ORGAN_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(ORGANS)}
LESION_LABEL = len(ORGANS) + 1
NUM_CLASSES = LESION_LABEL + 1  # background included

_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 45.0,
    "bone": 500.0,
    "right lung": -850.0,
    "left lung": -850.0,
    "liver": 60.0,
    "spleen": 50.0,
    "right kidney": 35.0,
    "left kidney": 35.0,
}
_LESION_HU = {"hypodense lesion": 5.0, "nodule": 35.0, "cyst": 0.0}


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in LPS mm: centre, semi-axes (x, y, z)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]

    def mask(self, pts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        x, y, z = pts
        cx, cy, cz = self.centre
        rx, ry, rz = self.radii
        return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2) <= 1.0


@dataclass(frozen=True)
class Lesion:
    """A focal lesion: the organ it lies in, its kind, centre and diameter."""

    organ: str
    kind: str
    centre: tuple[float, float, float]
    diameter_mm: float


@dataclass
class Phantom:
    """The analytic description of one phantom (no voxels).

    Attributes:
        seed: the seed it was drawn from.
        body: semi-axes (x, y) of the trunk in mm.
        organs: organ name -> ellipsoid.
        lesions: focal findings (may be empty: a normal study).
        z_range: (inferior, superior) extent of the scanned range in mm.
        noise_hu: standard deviation of the image noise.
        spacing: acquisition voxel size (slice, row, column) in mm.
        shape: acquisition grid (slices, rows, columns).
    """

    seed: int
    body: tuple[float, float]
    organs: dict[str, Ellipsoid]
    lesions: list[Lesion]
    z_range: tuple[float, float]
    noise_hu: float
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    extra: dict[str, float] = field(default_factory=dict)

    def acquisition_affine(self) -> np.ndarray:
        """Affine of the axial acquisition grid, index (k, r, c) -> LPS mm."""
        dz, dr, dc = self.spacing
        _d, h, w = self.shape
        aff = np.eye(4)
        aff[:3, 0] = (0.0, 0.0, dz)  # slices go superior
        aff[:3, 1] = (0.0, dr, 0.0)  # rows go posterior
        aff[:3, 2] = (dc, 0.0, 0.0)  # columns go to the patient's left
        aff[:3, 3] = (-(w - 1) * dc / 2.0, -(h - 1) * dr / 2.0, self.z_range[0])
        return aff


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def make_phantom(
    seed: int,
    *,
    lesion_probability: float = 0.7,
    shape: tuple[int, int, int] | None = None,
) -> Phantom:
    """Draw a phantom from ``seed``.

    Args:
        seed: identifies the phantom (see :data:`SPLITS`).
        lesion_probability: chance that the study has at least one lesion.
        shape: acquisition grid (slices, rows, columns); random when ``None``.
    """
    rng = np.random.default_rng(seed)
    s = _u(rng, 0.88, 1.12)  # patient size
    bx, by = 165.0 * s * _u(rng, 0.93, 1.07), 115.0 * s * _u(rng, 0.9, 1.1)

    def jit(v: float, amount: float = 8.0) -> float:
        return v + _u(rng, -amount, amount)

    def scale(r: float) -> float:
        return r * s * _u(rng, 0.88, 1.12)

    # z = 0 at the dome of the liver; lungs above, kidneys below.
    organs = {
        "right lung": Ellipsoid(
            (jit(-75 * s), jit(0), jit(75)), (scale(58), scale(78), scale(105))
        ),
        "left lung": Ellipsoid((jit(75 * s), jit(0), jit(80)), (scale(55), scale(76), scale(100))),
        "liver": Ellipsoid((jit(-55 * s), jit(-5), jit(-55)), (scale(85), scale(75), scale(62))),
        "spleen": Ellipsoid((jit(88 * s), jit(35), jit(-45)), (scale(32), scale(45), scale(48))),
        "right kidney": Ellipsoid(
            (jit(-62 * s, 5), jit(55, 5), jit(-125)), (scale(28), scale(26), scale(50))
        ),
        "left kidney": Ellipsoid(
            (jit(62 * s, 5), jit(55, 5), jit(-118)), (scale(28), scale(26), scale(50))
        ),
    }
    z_lo = -195.0 + _u(rng, -25, 15)
    z_hi = 175.0 + _u(rng, -15, 25)

    lesions: list[Lesion] = []
    if rng.random() < lesion_probability:
        n = int(rng.choice([1, 1, 1, 2, 2, 3]))
        weights = np.array([0.3, 0.15, 0.15, 0.1, 0.15, 0.15])
        names = ["liver", "right lung", "left lung", "spleen", "right kidney", "left kidney"]
        for _ in range(50):
            if len(lesions) >= n:
                break
            organ = str(rng.choice(names, p=weights / weights.sum()))
            ell = organs[organ]
            diam = _u(rng, 10.0, 35.0)
            r = diam / 2.0
            # a centre well inside the organ: inner ellipsoid shrunk by the radius + margin
            inner = [max(ax - r - 4.0, 0.0) for ax in ell.radii]
            if min(inner) <= 1.0:
                continue
            for _try in range(20):
                p = rng.uniform(-1, 1, 3)
                if float(np.sum(p**2)) <= 1.0:
                    break
            centre = tuple(float(ell.centre[i] + p[i] * inner[i]) for i in range(3))
            if not (z_lo + r + 5 < centre[2] < z_hi - r - 5):
                continue
            if any(
                np.linalg.norm(np.subtract(centre, o.centre)) < (diam + o.diameter_mm) / 2 + 5
                for o in lesions
            ):
                continue
            lesions.append(Lesion(organ, LESION_KINDS[organ], centre, diam))  # type: ignore[arg-type]

    if shape is None:
        dz = float(rng.choice([2.5, 3.0, 4.0, 5.0]))
        slices = int(np.ceil((z_hi - z_lo) / dz)) + 1
        cols = int(rng.choice([96, 112, 128]))
        shape = (slices, cols, cols)
    d, _h, w = shape
    fov = 2 * bx + _u(rng, 30, 90)
    dc = fov / w
    dz = (z_hi - z_lo) / max(d - 1, 1)
    return Phantom(
        seed=seed,
        body=(bx, by),
        organs=organs,
        lesions=lesions,
        z_range=(z_lo, z_hi),
        noise_hu=_u(rng, 6.0, 22.0),
        spacing=(dz, dc, dc),
        shape=shape,
        extra={"fat": _u(rng, 8.0, 25.0), "contrast": _u(rng, -10.0, 25.0)},
    )


def muscle_contrast_to_noise(phantom: Phantom, organ: str) -> float:
    """How visible ``organ`` is against muscle: ``|organ HU - muscle HU| / noise``.

    The study-wide contrast shift moves every soft-tissue organ together, so
    in some studies an organ is as dense as the muscle beside it (a kidney at
    45 HU among 45 HU muscle) and only its borders with fat, bone or other
    organs show in the image. The benchmark scores organ Dice apart for such
    studies.
    """
    level = _HU[organ] + (phantom.extra.get("contrast", 0.0)
                          if organ not in ("right lung", "left lung") else 0.0)
    return abs(level - _HU["muscle"]) / max(phantom.noise_hu, 1e-6)


def grid_points(
    affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS coordinates ``(x, y, z)`` in mm of every voxel of a grid, each ``(D, H, W)`` float32.

    Args:
        affine: ``(4, 4)`` index ``(k, r, c)`` -> LPS mm.
        shape: ``(D, H, W)``.
    """
    d, h, w = shape
    k, r, c = np.meshgrid(
        np.arange(d, dtype=np.float32),
        np.arange(h, dtype=np.float32),
        np.arange(w, dtype=np.float32),
        indexing="ij",
    )
    a = affine.astype(np.float32)
    x = a[0, 0] * k + a[0, 1] * r + a[0, 2] * c + a[0, 3]
    y = a[1, 0] * k + a[1, 1] * r + a[1, 2] * c + a[1, 3]
    z = a[2, 0] * k + a[2, 1] * r + a[2, 2] * c + a[2, 3]
    return x, y, z


def render(
    phantom: Phantom, affine: np.ndarray, shape: tuple[int, int, int], *, noise: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render a phantom on a grid.

    Args:
        phantom: what to render.
        affine: ``(4, 4)`` index ``(k, r, c)`` -> LPS mm of the grid.
        shape: ``(D, H, W)``.
        noise: add Gaussian noise (seeded by the phantom's seed).

    Returns:
        ``(hu, labels)``: ``(D, H, W)`` float32 Hounsfield units and uint8
        labels (:data:`ORGAN_LABELS`, :data:`LESION_LABEL`).
    """
    pts = grid_points(affine, shape)
    x, y, z = pts
    inside_z = (z >= phantom.z_range[0] - 1e-3) & (z <= phantom.z_range[1] + 1e-3)

    bx, by = phantom.body
    fat = phantom.extra.get("fat", 15.0)
    contrast = phantom.extra.get("contrast", 0.0)
    body = (((x / bx) ** 2 + (y / by) ** 2) <= 1.0) & inside_z
    inner = ((x / (bx - fat)) ** 2 + (y / (by - fat)) ** 2) <= 1.0
    hu = np.full(shape, _HU["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    hu[body] = _HU["fat"]
    hu[body & inner] = _HU["muscle"]
    labels[body] = ORGAN_LABELS["body"]
    spine = ((x / 22.0) ** 2 + ((y - (by - fat - 40.0)) / 22.0) ** 2 <= 1.0) & body
    hu[spine] = _HU["bone"]
    for name in ORGANS[1:]:
        m = phantom.organs[name].mask(pts) & body & ~spine
        hu[m] = _HU[name] + (contrast if name not in ("right lung", "left lung") else 0.0)
        labels[m] = ORGAN_LABELS[name]
    for les in phantom.lesions:
        rad = les.diameter_mm / 2.0
        m = Ellipsoid(les.centre, (rad, rad, rad)).mask(pts) & body
        hu[m] = _LESION_HU[les.kind]
        labels[m] = LESION_LABEL
    if noise:
        rng = np.random.default_rng(phantom.seed + 7_777_777)
        hu += rng.normal(0.0, phantom.noise_hu, size=shape).astype(np.float32)
    return hu, labels


def render_acquisition(phantom: Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render on the phantom's own acquisition grid: ``(hu, labels, affine)``."""
    aff = phantom.acquisition_affine()
    hu, labels = render(phantom, aff, phantom.shape)
    return hu, labels, aff


def report_text(phantom: Phantom) -> str:
    """The ground-truth report in the grammar the default model writes.

    One finding line per organ with lesions, in :data:`ORGANS` order, then an
    impression line. A normal study reads ``"no focal abnormality ."``.
    """
    from tomoscribe.model.text import findings_to_text

    return findings_to_text([(les.organ, les.kind) for les in phantom.lesions])


def phantom_slice(sop_class: str, sop_uid: str, series: dict[str, Any], *, instance: int,
                  position: np.ndarray, slice_location: float) -> Dataset:
    """One single-frame image of a phantom series, without its Pixel Data.

    Args:
        sop_class: SOP Class UID (CT or MR Image Storage).
        sop_uid: its SOP Instance UID.
        series: the attributes every image of the series shares (keyword -> value).
        instance: InstanceNumber.
        position: ImagePositionPatient (LPS mm).
        slice_location: SliceLocation.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for keyword, value in series.items():
        setattr(ds, keyword, value)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.SliceLocation = round(float(slice_location), 4)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def write_dicom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    series_number: int = 2,
) -> list[Path]:
    """Write the phantom's acquisition as a single-frame CT series.

    One file per slice, int16 with RescaleSlope 1 / RescaleIntercept -1024,
    axial, with deterministic UIDs derived from the seed (so a re-send of the
    same phantom is the same study).

    Returns:
        The paths written, in slice order.
    """
    from pydicom.uid import CTImageStorage, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    hu, _labels, aff = render_acquisition(phantom)
    seed = phantom.seed
    study_uid = study_instance_uid or generate_uid(entropy_srcs=["tomoscribe-phantom", str(seed)])
    series_uid = generate_uid(entropy_srcs=["tomoscribe-phantom-series", study_uid, str(seed)])
    frame_uid = generate_uid(entropy_srcs=["tomoscribe-phantom-for", study_uid])
    pid = patient_id or f"PHANTOM{seed:07d}"
    date = (_dt.date(2026, 1, 1) + _dt.timedelta(days=seed % 300)).strftime("%Y%m%d")
    dz, dr, dc = phantom.spacing
    paths: list[Path] = []
    raw = np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16)
    series = {
        "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": frame_uid, "PositionReferenceIndicator": "",
        "AcquisitionNumber": 1, "PatientName": f"Phantom^{seed}", "PatientID": pid,
        "PatientBirthDate": "19700101", "PatientSex": "O", "StudyDate": date, "SeriesDate": date,
        "StudyTime": "101500", "SeriesTime": "101500", "AccessionNumber": f"ACC{seed:07d}",
        "StudyID": str(seed % 100000), "ReferringPhysicianName": "",
        "StudyDescription": "CT CHEST ABDOMEN (synthetic phantom)",
        "SeriesDescription": "Axial 5mm phantom", "Modality": "CT",
        "Manufacturer": "tomoscribe-phantom", "BodyPartExamined": "CHEST",
        "SeriesNumber": series_number, "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "PatientPosition": "HFS", "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "SliceThickness": round(dz, 4), "PixelSpacing": [round(dr, 6), round(dc, 6)],
        "Rows": int(hu.shape[1]), "Columns": int(hu.shape[2]), "PixelRepresentation": 1,
        "RescaleIntercept": -1024, "RescaleSlope": 1, "RescaleType": "HU",
        "WindowCenter": 40, "WindowWidth": 400, "KVP": 120,
    }
    for k in range(hu.shape[0]):
        sop_uid = generate_uid(entropy_srcs=["tomoscribe-phantom-sop", series_uid, str(k)])
        pos = aff[:3, 3] + k * aff[:3, 0]
        ds = phantom_slice(CTImageStorage, sop_uid, series, instance=k + 1, position=pos,
                           slice_location=float(pos[2]))
        ds.PixelData = raw[k].tobytes()
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m tomoscribe.phantom --seed N --out DIR``: write one phantom study."""
    parser = argparse.ArgumentParser(prog="python -m tomoscribe.phantom", description=__doc__)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--normal", action="store_true", help="no lesions")
    args = parser.parse_args(argv)
    ph = make_phantom(args.seed, lesion_probability=0.0 if args.normal else 1.0)
    paths = write_dicom_series(ph, args.out)
    print(f"wrote {len(paths)} slices to {args.out}")
    print(report_text(ph))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
