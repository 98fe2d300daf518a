"""The :class:`Volume`: one image series as a 3D array with its geometry.

Index order is ``(slice, row, column)``, written ``(D, H, W)``. The affine maps
an index ``(k, r, c, 1)`` to patient coordinates in millimetres, LPS as in
DICOM::

    xyz = affine @ [k, r, c, 1]

so ``affine[:3, 0]`` is the slice normal times the slice spacing,
``affine[:3, 1]`` the column direction cosine (down the rows, DICOM
ImageOrientationPatient[3:]) times PixelSpacing[0], and ``affine[:3, 2]`` the
row direction cosine (ImageOrientationPatient[:3]) times PixelSpacing[1].
``affine[:3, 3]`` is ImagePositionPatient of the first slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SliceRef:
    """Where one slice of a volume came from."""

    sop_instance_uid: str
    sop_class_uid: str
    #: frame number (1-based) in a multi-frame instance, ``None`` for single-frame
    frame_number: int | None = None


@dataclass
class Volume:
    """Voxels, geometry and provenance of one series.

    Attributes:
        voxels: ``(D, H, W)`` float32; Hounsfield units for CT.
        affine: ``(4, 4)`` float64, index ``(k, r, c)`` to LPS millimetres.
        slices: one :class:`SliceRef` per slice ``k``, in the same order.
        headers: the source datasets without pixel data, one per source
            instance (order of first use); writers take study, patient and
            series attributes from them.
        modality: ``"CT"`` or ``"MR"`` (or whatever the series says).
        study_instance_uid, series_instance_uid, frame_of_reference_uid: copied
            from the source series.
        notes: what the loader handled on the way (dropped duplicates...).
    """

    voxels: np.ndarray
    affine: np.ndarray
    slices: list[SliceRef]
    headers: list[Dataset] = field(default_factory=list)
    modality: str = "CT"
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"voxels must be (D, H, W), got shape {self.voxels.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if len(self.slices) != self.voxels.shape[0]:
            raise ValueError(
                f"{len(self.slices)} slice references for {self.voxels.shape[0]} slices"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        d, h, w = self.voxels.shape
        return int(d), int(h), int(w)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``(slice, row, column)``."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    def index_to_lps(self, index: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` indices ``(k, r, c)`` to ``(N, 3)`` LPS points (mm)."""
        idx = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]
