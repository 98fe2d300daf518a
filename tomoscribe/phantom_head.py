"""Synthetic head phantoms (MR, and CT) with ground truth, and their DICOM series.

The second anatomy of tomoscribe's phantoms, after the chest-abdomen CT of
:mod:`tomoscribe.phantom`. A head is a set of analytic shapes in patient
coordinates (LPS, millimetres, origin near the centre of the brain):

- scalp (fat), skull (cortical bone), cerebrospinal fluid around the brain,
  soft tissue below the skull base;
- two cerebral hemispheres (a 3.5 mm cortex of grey matter over white
  matter) split by a CSF-filled falx, the cerebellum below the tentorium,
  the brainstem, two lateral ventricles of random size, the eyes;
- 0-3 focal lesions of 10-35 mm, each in a hemisphere or the cerebellum and
  clear of the ventricles: a *mass* (solid; with surrounding oedema in
  60 % of cases) or a *cyst* (fluid, like CSF).

MR studies draw one weighting per study (T1, T2 or FLAIR, each with its own
tissue contrast: CSF dark on T1 and FLAIR, bright on T2), a smooth
multiplicative bias field, Rician noise and an arbitrary intensity scale
(MR values have no unit), and one acquisition plane: axial, sagittal or
coronal, 2D slices 3-5 mm thick with a 0-1 mm gap, 192-256 matrix. A head CT
(``modality="CT"``) renders the same anatomy in Hounsfield units on an axial
grid.

Label map values: :data:`STRUCTURE_LABELS` (1 head, 2 right cerebral
hemisphere, 3 left cerebral hemisphere, 4 cerebellum, 5 lateral ventricles)
and :data:`LESION_LABEL` for every lesion; oedema keeps the label of the
tissue it lies in. Seeds split into training, validation and test ranges as
for the chest-abdomen phantoms (:data:`tomoscribe.phantom.SPLITS`).

The default model is not trained on these: its declared scope
(:mod:`tomoscribe.scope`) is chest-abdomen CT, and a head series is refused.
They are the data for a head model, and the inputs of the scope tests.

Run ``python -m tomoscribe.phantom_head --seed 7 --out DIR`` to write one study.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tomoscribe.domain import HEAD_MR
from tomoscribe.model.text import findings_to_text
from tomoscribe.phantom import SPLITS, Ellipsoid, grid_points, phantom_slice

__all__ = [
    "HEAD_STRUCTURES",
    "LESION_KINDS",
    "LESION_LABEL",
    "SPLITS",
    "STRUCTURE_LABELS",
    "HeadLesion",
    "HeadPhantom",
    "head_report_text",
    "make_head_phantom",
    "render_head",
    "render_head_acquisition",
    "write_head_series",
]

#: Structures of the head phantom, in label order (label = index + 1).
HEAD_STRUCTURES: tuple[str, ...] = (
    "head",
    "right cerebral hemisphere",
    "left cerebral hemisphere",
    "cerebellum",
    "lateral ventricles",
)
STRUCTURE_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(HEAD_STRUCTURES)}
LESION_LABEL = len(HEAD_STRUCTURES) + 1
NUM_CLASSES = LESION_LABEL + 1  # background included

#: where lesions lie, and how often
LESION_SITES: dict[str, float] = {
    "right cerebral hemisphere": 0.4,
    "left cerebral hemisphere": 0.4,
    "cerebellum": 0.2,
}
#: kinds of focal lesion, and how often
LESION_KINDS: dict[str, float] = {"mass": 0.65, "cyst": 0.35}

SEQUENCES = ("T1", "T2", "FLAIR")

#: relative signal of each tissue per weighting (white matter on T1 about 0.7),
#: and Hounsfield units for CT
_SIGNAL: dict[str, dict[str, float]] = {
    "T1": {"air": 0.0, "fat": 0.95, "bone": 0.05, "csf": 0.12, "gm": 0.48, "wm": 0.70,
           "mass": 0.36, "cyst": 0.10, "oedema": 0.40, "eye": 0.10, "soft": 0.38},
    "T2": {"air": 0.0, "fat": 0.65, "bone": 0.04, "csf": 1.00, "gm": 0.62, "wm": 0.42,
           "mass": 0.78, "cyst": 0.98, "oedema": 0.86, "eye": 0.95, "soft": 0.30},
    "FLAIR": {"air": 0.0, "fat": 0.55, "bone": 0.04, "csf": 0.06, "gm": 0.58, "wm": 0.42,
              "mass": 0.80, "cyst": 0.08, "oedema": 0.84, "eye": 0.06, "soft": 0.32},
    "CT": {"air": -1000.0, "fat": -100.0, "bone": 900.0, "csf": 8.0, "gm": 38.0, "wm": 28.0,
           "mass": 48.0, "cyst": 8.0, "oedema": 18.0, "eye": 10.0, "soft": 45.0},
}

#: scanner parameters written per weighting: (TR ms, TE ms, TI ms or None, echo train)
_TIMING: dict[str, tuple[float, float, float | None, int]] = {
    "T1": (550.0, 12.0, None, 1),
    "T2": (4200.0, 95.0, None, 14),
    "FLAIR": (9000.0, 110.0, 2500.0, 20),
}

#: ImageOrientationPatient per plane: (row direction, column direction)
_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class HeadLesion:
    """A focal lesion: the structure it lies in, its kind, centre, diameter and oedema rim."""

    site: str
    kind: str
    centre: tuple[float, float, float]
    diameter_mm: float
    oedema_mm: float = 0.0


@dataclass
class HeadPhantom:
    """The analytic description of one head (no voxels).

    Attributes:
        seed: the seed it was drawn from.
        modality: ``"MR"`` or ``"CT"``.
        sequence: ``"T1"``, ``"T2"``, ``"FLAIR"`` (MR) or ``"CT"``.
        plane: acquisition plane, ``"axial"``, ``"sagittal"`` or ``"coronal"``.
        shapes: named ellipsoids (``"skin"``, ``"cerebrum"``, ...).
        lesions: focal findings (may be empty: a normal study).
        spacing: acquisition voxel size (slice step, row, column) in mm.
        thickness: slice thickness in mm (the slice step minus the gap).
        shape: acquisition grid (slices, rows, columns).
        origin: LPS position of the first voxel of the first slice.
        noise: noise level (relative to white matter on MR; HU on CT).
        scale: stored value of signal 1.0 (MR).
        bias: coefficients of the bias field (MR).
    """

    seed: int
    modality: str
    sequence: str
    plane: str
    shapes: dict[str, Ellipsoid]
    lesions: list[HeadLesion]
    spacing: tuple[float, float, float]
    thickness: float
    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    noise: float
    scale: float = 1.0
    bias: tuple[float, ...] = ()
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def orientation(self) -> tuple[float, ...]:
        """ImageOrientationPatient of the acquisition."""
        row, col = _PLANES[self.plane]
        return (*row, *col)

    def acquisition_affine(self) -> np.ndarray:
        """Affine of the acquisition grid, index (k, r, c) -> LPS mm."""
        row, col = (np.array(v) for v in _PLANES[self.plane])
        normal = np.cross(row, col)
        dk, dr, dc = self.spacing
        aff = np.eye(4)
        aff[:3, 0] = normal * dk
        aff[:3, 1] = col * dr
        aff[:3, 2] = row * dc
        aff[:3, 3] = self.origin
        return aff


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _resized(ell: Ellipsoid, grow: float = 0.0, factor: float = 1.0) -> Ellipsoid:
    """``ell`` with its radii times ``factor`` plus ``grow`` mm."""
    rx, ry, rz = ell.radii
    return Ellipsoid(ell.centre, (rx * factor + grow, ry * factor + grow, rz * factor + grow))


def _inside(ell: Ellipsoid, p: np.ndarray, grow: float = 0.0) -> float:
    """Squared normalised distance of ``p`` from ``ell``'s centre, radii grown by ``grow`` mm."""
    return float(sum(((p[i] - ell.centre[i]) / (ell.radii[i] + grow)) ** 2 for i in range(3)))


def make_head_phantom(
    seed: int,
    *,
    modality: str = "MR",
    lesion_probability: float = 0.7,
    sequence: str | None = None,
    plane: str | None = None,
    shape: tuple[int, int, int] | None = None,
) -> HeadPhantom:
    """Draw a head phantom from ``seed``.

    Args:
        seed: identifies the phantom (see :data:`SPLITS`).
        modality: ``"MR"`` or ``"CT"`` (CT: axial, Hounsfield units).
        lesion_probability: chance that the study has at least one lesion.
        sequence: MR weighting (``"T1"``, ``"T2"``, ``"FLAIR"``); random when ``None``.
        plane: acquisition plane; random for MR when ``None`` (half axial), axial for CT.
        shape: acquisition grid (slices, rows, columns); random when ``None``.
    """
    if modality not in ("MR", "CT"):
        raise ValueError(f"modality must be MR or CT, not {modality!r}")
    rng = np.random.default_rng(seed + 31_000_000)  # not the chest phantom of the same seed
    s = _u(rng, 0.9, 1.1)

    def jit(v: float, amount: float = 3.0) -> float:
        return v + _u(rng, -amount, amount)

    skin = Ellipsoid((0.0, jit(5.0), jit(-10.0)), (76 * s * _u(rng, 0.95, 1.05),
                                                   96 * s * _u(rng, 0.95, 1.05), 100 * s))
    scalp, bone = _u(rng, 4.0, 7.0), _u(rng, 5.0, 8.0)
    vent = _u(rng, 0.7, 1.5)  # ventricle size: small to enlarged
    shapes = {
        "skin": skin,
        "skull": _resized(skin, -scalp),
        "cranium": _resized(skin, -scalp - bone),
        "cerebrum": Ellipsoid((0.0, jit(0.0), jit(16.0 * s)), (62 * s, 82 * s, 62 * s)),
        "cerebellum": Ellipsoid((0.0, jit(48.0 * s), jit(-40.0 * s)), (46 * s, 26 * s, 20 * s)),
        "brainstem": Ellipsoid((0.0, 16.0 * s, -42.0 * s), (12 * s, 12 * s, 32 * s)),
        "right ventricle": Ellipsoid((-11 * s, jit(-2.0), jit(18.0 * s)),
                                     (6 * s * vent, 24 * s, 9 * s * vent)),
        "left ventricle": Ellipsoid((11 * s, jit(-2.0), jit(18.0 * s)),
                                    (6 * s * vent, 24 * s, 9 * s * vent)),
        "right eye": Ellipsoid((-32 * s, -78 * s, -26 * s), (11.5, 11.5, 11.5)),
        "left eye": Ellipsoid((32 * s, -78 * s, -26 * s), (11.5, 11.5, 11.5)),
    }

    lesions: list[HeadLesion] = []
    if rng.random() < lesion_probability:
        n = int(rng.choice([1, 1, 1, 2, 2, 3]))
        sites = list(LESION_SITES)
        p_site = np.array([LESION_SITES[k] for k in sites])
        kinds = list(LESION_KINDS)
        p_kind = np.array([LESION_KINDS[k] for k in kinds])
        for _ in range(80):
            if len(lesions) >= n:
                break
            site = str(rng.choice(sites, p=p_site / p_site.sum()))
            kind = str(rng.choice(kinds, p=p_kind / p_kind.sum()))
            diam = _u(rng, 10.0, 25.0 if site == "cerebellum" else 35.0)
            r = diam / 2.0
            ell = shapes["cerebellum" if site == "cerebellum" else "cerebrum"]
            inner = np.array([max(a - r - 4.0, 0.0) for a in ell.radii])
            if inner.min() <= 1.0:
                continue
            p = rng.uniform(-1.0, 1.0, 3)
            if float(np.sum(p**2)) > 1.0:
                continue
            centre = np.array(ell.centre) + p * inner
            side = -1.0 if site.startswith("right") else 1.0
            if site != "cerebellum" and centre[0] * side < r + 3.0:
                continue  # the whole lesion on its own side of the falx
            if site != "cerebellum" and _inside(shapes["cerebellum"], centre, r + 3.0) <= 1.0:
                continue
            if any(_inside(shapes[v], centre, r + 3.0) <= 1.0
                   for v in ("right ventricle", "left ventricle")):
                continue
            if any(np.linalg.norm(centre - np.array(o.centre)) < r + o.diameter_mm / 2
                   + o.oedema_mm + 6.0 for o in lesions):
                continue
            oedema = _u(rng, 3.0, 8.0) if kind == "mass" and rng.random() < 0.6 else 0.0
            lesions.append(HeadLesion(site, kind, (float(centre[0]), float(centre[1]),
                                                   float(centre[2])), diam, oedema))

    if modality == "CT":
        sequence, plane = "CT", plane or "axial"
    else:
        sequence = sequence or str(rng.choice(SEQUENCES))
        plane = plane or str(rng.choice(["axial", "axial", "sagittal", "coronal"]))
    if plane not in _PLANES:
        raise ValueError(f"plane must be one of {sorted(_PLANES)}, not {plane!r}")

    # in-plane field of view and matrix; slices across the head along the normal
    row, col = (np.array(v) for v in _PLANES[plane])
    normal = np.cross(row, col)
    fov = _u(rng, 220.0, 250.0)
    if modality == "CT":
        matrix = int(rng.choice([256, 320]))
        thickness, gap = float(rng.choice([2.5, 3.0, 5.0])), 0.0
    else:
        matrix = int(rng.choice([192, 224, 256]))
        thickness, gap = float(rng.choice([3.0, 4.0, 5.0])), float(rng.choice([0.0, 0.5, 1.0]))
    step = thickness + gap
    # the slices cover the head along the normal's axis (axial: from the skull base up)
    axis = int(np.argmax(np.abs(normal)))
    lo = [-skin.radii[0] - 6.0, skin.centre[1] - skin.radii[1] - 6.0, -75.0 * s + _u(rng, -10, 10)]
    hi = [skin.radii[0] + 6.0, skin.centre[1] + skin.radii[1] + 6.0,
          skin.centre[2] + skin.radii[2] + 4.0]
    if shape is None:
        shape = (int(np.ceil((hi[axis] - lo[axis]) / step)) + 1, matrix, matrix)
    d, h, w = shape
    step = (hi[axis] - lo[axis]) / max(d - 1, 1)
    pix = fov / w
    # in-plane: centred on the head (a little above its middle, so the vertex is in)
    origin = np.array([0.0, skin.centre[1], 15.0]) - row * pix * (w - 1) / 2.0 - col * pix * (
        h - 1) / 2.0
    origin[axis] = lo[axis] if normal[axis] > 0 else hi[axis]  # slice 0 at one end
    noise = _u(rng, 4.0, 9.0) if modality == "CT" else _u(rng, 0.02, 0.06)
    return HeadPhantom(
        seed=seed,
        modality=modality,
        sequence=sequence,
        plane=plane,
        shapes=shapes,
        lesions=lesions,
        spacing=(step, pix, pix),
        thickness=thickness,
        shape=shape,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        noise=noise,
        scale=_u(rng, 800.0, 3000.0),
        bias=tuple(_u(rng, -0.15, 0.15) for _ in range(4)),
        extra={"field_strength": float(rng.choice([1.5, 3.0]))},
    )


def render_head(
    phantom: HeadPhantom, affine: np.ndarray, shape: tuple[int, int, int], *, noise: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render a head phantom on a grid.

    Args:
        phantom: what to render.
        affine: ``(4, 4)`` index ``(k, r, c)`` -> LPS mm of the grid.
        shape: ``(D, H, W)``.
        noise: add noise (Rician on MR, Gaussian on CT) and, on MR, the bias field.

    Returns:
        ``(values, labels)``: ``(D, H, W)`` float32 signal (MR: relative, white
        matter near 0.4-0.7 before :attr:`HeadPhantom.scale`; CT: Hounsfield
        units) and uint8 labels (:data:`STRUCTURE_LABELS`, :data:`LESION_LABEL`).
    """
    pts = grid_points(affine, shape)
    x, y, z = pts
    sig = _SIGNAL[phantom.sequence]
    sh = phantom.shapes
    values = np.full(shape, sig["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    def paint(mask: np.ndarray, tissue: str, label: int | None = None) -> None:
        values[mask] = sig[tissue]
        if label is not None:
            labels[mask] = label

    head = sh["skin"].mask(pts) & (z > -75.0 - 40.0)
    paint(head, "fat", STRUCTURE_LABELS["head"])
    paint(sh["skull"].mask(pts) & head, "bone")
    cranium = sh["cranium"].mask(pts) & head
    paint(cranium, "csf")
    paint(cranium & (z < sh["cerebellum"].centre[2] - 8.0), "soft")  # skull base, face, neck
    cerebellum = sh["cerebellum"].mask(pts) & cranium
    tentorium = _resized(sh["cerebellum"], 2.0)
    cerebrum = sh["cerebrum"].mask(pts) & cranium & ~tentorium.mask(pts) & (np.abs(x) > 1.0)
    white = _resized(sh["cerebrum"], -3.5)
    paint(cerebrum, "gm")
    paint(cerebrum & white.mask(pts) & (np.abs(x) > 4.5), "wm")
    labels[cerebrum & (x < 0)] = STRUCTURE_LABELS["right cerebral hemisphere"]
    labels[cerebrum & (x > 0)] = STRUCTURE_LABELS["left cerebral hemisphere"]
    paint(cerebellum, "gm", STRUCTURE_LABELS["cerebellum"])
    cb_white = _resized(sh["cerebellum"], factor=0.6)
    paint(cerebellum & cb_white.mask(pts), "wm")
    paint(sh["brainstem"].mask(pts) & cranium & ~cerebellum, "wm")
    for side in ("right", "left"):
        paint(sh[f"{side} ventricle"].mask(pts) & cerebrum, "csf",
              STRUCTURE_LABELS["lateral ventricles"])
        paint(sh[f"{side} eye"].mask(pts) & head, "eye")
    brain = cerebrum | cerebellum
    for les in phantom.lesions:
        r = les.diameter_mm / 2.0
        if les.oedema_mm > 0:
            outer = r + les.oedema_mm
            rim = Ellipsoid(les.centre, (outer, outer, outer)).mask(pts) & brain
            rim &= labels != STRUCTURE_LABELS["lateral ventricles"]
            values[rim & (labels != LESION_LABEL)] = sig["oedema"]
        m = Ellipsoid(les.centre, (r, r, r)).mask(pts) & brain
        paint(m, les.kind, LESION_LABEL)
    if noise:
        rng = np.random.default_rng(phantom.seed + 41_000_000)
        if phantom.modality == "CT":
            values += rng.normal(0.0, phantom.noise, size=shape).astype(np.float32)
        else:
            a, b, c, q = phantom.bias
            field_ = 1.0 + a * x / 100.0 + b * y / 100.0 + c * z / 100.0 + q * (
                (x**2 + y**2 + z**2) / 100.0**2 - 1.0)
            values *= np.clip(field_, 0.5, 1.5).astype(np.float32)
            sigma = phantom.noise * sig["wm"] if sig["wm"] > 0 else phantom.noise
            n1 = rng.normal(0.0, sigma, size=shape).astype(np.float32)
            n2 = rng.normal(0.0, sigma, size=shape).astype(np.float32)
            values = np.sqrt((values + n1) ** 2 + n2**2)
    return values, labels


def render_head_acquisition(phantom: HeadPhantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render on the phantom's own acquisition grid: ``(values, labels, affine)``."""
    aff = phantom.acquisition_affine()
    values, labels = render_head(phantom, aff, phantom.shape)
    return values, labels, aff


def head_report_text(phantom: HeadPhantom) -> str:
    """The ground-truth report, in the head domain's grammar.

    One line per site with lesions (in :data:`LESION_SITES` order), kinds in
    :data:`LESION_KINDS` order, then an impression; a normal study reads
    ``"no focal abnormality . impression : normal study ."``
    (:func:`tomoscribe.model.text.findings_to_text` with
    :data:`tomoscribe.domain.HEAD_MR`).
    """
    return findings_to_text([(les.site, les.kind) for les in phantom.lesions], HEAD_MR)


def write_head_series(
    phantom: HeadPhantom,
    out_dir: Path,
    *,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    series_number: int = 3,
    body_part: str = "HEAD",
) -> list[Path]:
    """Write the phantom's acquisition as a single-frame MR (or CT) series.

    MR: unsigned 16-bit values without a rescale (MR values have no unit),
    the weighting's TR / TE / TI, the plane's orientation. CT: int16 with
    RescaleIntercept -1024. UIDs derive from the seed, so a re-send of the
    same phantom is the same study.

    Args:
        phantom: what to write.
        out_dir: created if missing.
        study_instance_uid: default: derived from the seed.
        patient_id: default: ``HEAD`` and the seed.
        series_number: SeriesNumber.
        body_part: BodyPartExamined; ``""`` leaves the attribute out.

    Returns:
        The paths written, in slice order.
    """
    from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    values, _labels, aff = render_head_acquisition(phantom)
    seed, mr = phantom.seed, phantom.modality == "MR"
    sop_class = MRImageStorage if mr else CTImageStorage
    study_uid = study_instance_uid or generate_uid(entropy_srcs=["tomoscribe-head", str(seed)])
    series_uid = generate_uid(entropy_srcs=["tomoscribe-head-series", study_uid, str(seed),
                                            phantom.sequence])
    frame_uid = generate_uid(entropy_srcs=["tomoscribe-head-for", study_uid])
    date = (_dt.date(2026, 1, 1) + _dt.timedelta(days=seed % 300)).strftime("%Y%m%d")
    if mr:
        raw = np.clip(np.rint(values * phantom.scale), 0, 65535).astype(np.uint16)
    else:
        raw = np.clip(np.rint(values + 1024.0), -32768, 32767).astype(np.int16)
    dk, dr, dc = phantom.spacing
    label = f"{phantom.sequence} {phantom.plane}" if mr else f"Head {phantom.plane}"
    series: dict[str, Any] = {
        "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": frame_uid, "PositionReferenceIndicator": "",
        "PatientName": f"Head^{seed}", "PatientID": patient_id or f"HEAD{seed:07d}",
        "PatientBirthDate": "19700101", "PatientSex": "O",
        "StudyDate": date, "SeriesDate": date, "ContentDate": date,
        "StudyTime": "093000", "SeriesTime": "093000", "ContentTime": "093000",
        "AccessionNumber": f"ACCH{seed:06d}", "StudyID": str(seed % 100000),
        "ReferringPhysicianName": "",
        "StudyDescription": f"{phantom.modality} HEAD (synthetic phantom)",
        "SeriesDescription": f"{label} phantom", "Modality": phantom.modality,
        "Manufacturer": "tomoscribe-phantom", "SeriesNumber": series_number,
        "AcquisitionNumber": 1, "PatientPosition": "HFS",
        "ImageOrientationPatient": [round(v, 6) for v in phantom.orientation],
        "SliceThickness": round(phantom.thickness, 4), "PixelSpacing": [round(dr, 6), round(dc, 6)],
        "Rows": int(raw.shape[1]), "Columns": int(raw.shape[2]),
    }
    if body_part:
        series["BodyPartExamined"] = body_part
    if mr:
        tr, te, ti, train = _TIMING[phantom.sequence]
        tesla = phantom.extra.get("field_strength", 1.5)
        series.update({
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"], "PixelRepresentation": 0,
            "ScanningSequence": ["SE", "IR"] if ti is not None else ["SE"],
            "SequenceVariant": ["SK"], "ScanOptions": "", "MRAcquisitionType": "2D",
            "SequenceName": f"tse2d_{phantom.sequence.lower()}", "RepetitionTime": tr,
            "EchoTime": te, "EchoTrainLength": train, "NumberOfAverages": 1,
            "ImagedNucleus": "1H", "MagneticFieldStrength": tesla,
            "ImagingFrequency": round(42.577 * tesla, 4), "SpacingBetweenSlices": round(dk, 4),
            "FlipAngle": 90, "WindowCenter": int(phantom.scale * 0.5),
            "WindowWidth": int(phantom.scale),
        })
        if ti is not None:
            series["InversionTime"] = ti
    else:
        series.update({
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "PixelRepresentation": 1,
            "RescaleIntercept": -1024, "RescaleSlope": 1, "RescaleType": "HU", "KVP": 120,
            "WindowCenter": 40, "WindowWidth": 80,
        })
    paths: list[Path] = []
    for k in range(raw.shape[0]):
        sop_uid = generate_uid(entropy_srcs=["tomoscribe-head-sop", series_uid, str(k)])
        pos = aff[:3, 3] + k * aff[:3, 0]
        ds = phantom_slice(sop_class, sop_uid, series, instance=k + 1, position=pos,
                           slice_location=float(np.dot(pos, aff[:3, 0] / dk)))
        ds.PixelData = raw[k].tobytes()
        path = out_dir / f"{phantom.modality}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m tomoscribe.phantom_head --seed N --out DIR``: write one head study."""
    parser = argparse.ArgumentParser(prog="python -m tomoscribe.phantom_head", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modality", choices=("MR", "CT"), default="MR")
    parser.add_argument("--sequence", choices=SEQUENCES, default=None)
    parser.add_argument("--plane", choices=tuple(_PLANES), default=None)
    parser.add_argument("--normal", action="store_true", help="no lesions")
    args = parser.parse_args(argv)
    ph = make_head_phantom(args.seed, modality=args.modality, sequence=args.sequence,
                           plane=args.plane, lesion_probability=0.0 if args.normal else 1.0)
    paths = write_head_series(ph, args.out)
    print(f"wrote {len(paths)} {ph.sequence} {ph.plane} slices to {args.out}")
    print(head_report_text(ph))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
