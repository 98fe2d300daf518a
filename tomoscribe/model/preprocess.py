"""From a :class:`~tomoscribe.volume.Volume` to the model's input grid, and back.

Steps, each invertible so that outputs land on the source grid:

1. **Reorient** to a canonical axial order by permuting and flipping array
   axes only (no interpolation): axis 0 runs inferior to superior, axis 1
   anterior to posterior, axis 2 right to left (LPS +z, +y, +x). Coronal and
   sagittal acquisitions become axial arrays; oblique ones go to the nearest
   canonical axes.
2. **Crop** to the body: the bounding box of voxels above -500 HU (CT), with a
   margin, so that the field of view does not change the anatomy's scale.
   MR values have no unit: there the threshold is a tenth of the study's
   bright signal (:func:`mr_levels`).
3. **Resize** the crop to the model grid ``(D, H, W)``: area averaging where
   the grid is coarser, trilinear where it is finer.
4. **Window** into two channels. CT (``intensity="ct"``): a wide window
   (-1000..400 HU, lungs and bone) and a soft-tissue window (-160..240 HU),
   each scaled to [0, 1]. MR (``intensity="mr"``, see
   :class:`tomoscribe.domain.Domain`): the signal over its own 99th
   percentile within the body (0..1: the weighting's contrast, whatever the
   scanner's scale), and the 5th-95th percentile range of the body stretched
   to [0, 1] (the tissue contrast).

:class:`GridMap` remembers steps 1-3 and maps model-grid indices back to
source indices (:meth:`GridMap.to_source_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tomoscribe.volume import Volume

WINDOWS: tuple[tuple[float, float], ...] = ((-1000.0, 400.0), (-160.0, 240.0))
#: what the intensity of a model's domain is (:attr:`tomoscribe.domain.Domain.intensity`)
INTENSITIES = ("ct", "mr")
#: MR: the body is what is brighter than this fraction of the bright signal
MR_BODY_FRACTION = 0.1


@dataclass(frozen=True)
class GridMap:
    """How the model grid relates to the source array.

    Attributes:
        perm: canonical axis ``i`` is source axis ``perm[i]``.
        flip: whether canonical axis ``i`` is flipped relative to the source.
        start, stop: the crop along each canonical axis (source voxels).
        model_shape: the model grid ``(D, H, W)``.
        source_shape: the source array shape ``(D, H, W)``.
        windows: the ``(low, high)`` levels each input channel was scaled by
            (source values: CT the fixed :data:`WINDOWS`, MR the study's own
            :func:`mr_levels`); the refiner scales its boxes by the same.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    source_shape: tuple[int, int, int]
    windows: tuple[tuple[float, float], ...] = WINDOWS

    def canonical_shape(self) -> tuple[int, int, int]:
        s = self.source_shape
        return s[self.perm[0]], s[self.perm[1]], s[self.perm[2]]

    def model_index_for_canonical(self, axis: int) -> np.ndarray:
        """For every canonical index along ``axis``: the nearest model index, or -1."""
        n = self.canonical_shape()[axis]
        lo, hi, m = self.start[axis], self.stop[axis], self.model_shape[axis]
        idx = np.arange(n, dtype=np.float64)
        pos = (idx - lo + 0.5) * m / (hi - lo) - 0.5
        out = np.clip(np.rint(pos), 0, m - 1).astype(np.int64)
        out[(idx < lo) | (idx >= hi)] = -1
        return out

    def to_source_labels(self, labels: np.ndarray) -> np.ndarray:
        """Map a ``(D, H, W)`` label array on the model grid to the source grid.

        Nearest neighbour; voxels outside the crop get 0.
        """
        maps = [self.model_index_for_canonical(a) for a in range(3)]
        padded = np.zeros(tuple(m + 1 for m in self.model_shape), dtype=labels.dtype)
        padded[:-1, :-1, :-1] = labels
        idx = [np.where(m < 0, self.model_shape[a], m) for a, m in enumerate(maps)]
        canon = padded[np.ix_(idx[0], idx[1], idx[2])]
        for a in range(3):
            if self.flip[a]:
                canon = np.flip(canon, axis=a)
        inverse = np.argsort(self.perm)
        return np.ascontiguousarray(np.transpose(canon, inverse))


def canonical_orientation(
    affine: np.ndarray,
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Permutation and flips that bring an array to canonical (z, y, x) order.

    Canonical axis 0 is LPS z (increasing superior), 1 is y (posterior), 2 is
    x (patient's left).
    """
    cols = affine[:3, :3]
    dominant = [int(np.argmax(np.abs(cols[:, a]))) for a in range(3)]  # LPS axis of array axis a
    if sorted(dominant) != [0, 1, 2]:
        # oblique enough that two array axes share a dominant direction:
        # assign greedily by magnitude
        dominant = [-1, -1, -1]
        order = np.dstack(np.unravel_index(np.argsort(-np.abs(cols), axis=None), cols.shape))[0]
        used_l: set[int] = set()
        for lps, arr in order:
            if dominant[arr] < 0 and lps not in used_l:
                dominant[arr] = int(lps)
                used_l.add(int(lps))
    # canonical axis i wants LPS axis (2, 1, 0)[i]
    want = (2, 1, 0)
    perm = tuple(dominant.index(w) for w in want)
    flip = tuple(bool(cols[want[i], perm[i]] < 0) for i in range(3))
    return perm, flip  # type: ignore[return-value]


def _resize(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Resize ``(B, C, D, H, W)``: area where shrinking, trilinear where growing."""
    d, h, w = (int(v) for v in x.shape[2:])
    shrink = (min(d, size[0]), min(h, size[1]), min(w, size[2]))
    if shrink != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool3d(x, shrink)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x


def body_box(canon: np.ndarray, threshold: float = -500.0, margin: int = 2,
             smooth: bool = False) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Bounding box of voxels above ``threshold`` in a canonical array.

    The slice axis (0) is never cropped: the scanned range is what the
    radiologist asked for. ``smooth`` compares the 3 x 3 x 3 mean instead of
    each voxel: MR's Rician noise is never negative, and single air voxels
    above the threshold would stretch the box to the whole field of view.
    """
    shape = canon.shape
    if smooth:
        from scipy import ndimage

        canon = ndimage.uniform_filter(np.asarray(canon, dtype=np.float32), 3)
    mask = canon > threshold
    if not mask.any():
        return (0, 0, 0), (shape[0], shape[1], shape[2])
    start = [0, 0, 0]
    stop = [shape[0], shape[1], shape[2]]
    for axis in (1, 2):
        other = tuple(a for a in range(3) if a != axis)
        prof = mask.any(axis=other)
        nz = np.nonzero(prof)[0]
        start[axis] = max(int(nz[0]) - margin, 0)
        stop[axis] = min(int(nz[-1]) + 1 + margin, shape[axis])
    return (start[0], start[1], start[2]), (stop[0], stop[1], stop[2])


def mr_levels(voxels: np.ndarray) -> tuple[float, float, float, float]:
    """The levels an MR study is scaled by: ``(body threshold, bright, low, high)``.

    The body is what is brighter, in the 3 x 3 x 3 mean, than
    :data:`MR_BODY_FRACTION` of the 99th percentile of the whole array (the
    mean keeps the air's Rician noise, a few percent of white matter, under
    the threshold); ``bright``, ``low`` and ``high`` are the 99th, 5th and
    95th percentiles of the body's voxels. Read on every second voxel per axis
    (the percentiles of a study hardly change; the time does).
    """
    from scipy import ndimage

    sample = np.asarray(voxels[::2, ::2, ::2], dtype=np.float32)
    if sample.size == 0:
        return 0.0, 1.0, 0.0, 1.0
    threshold = MR_BODY_FRACTION * float(np.percentile(sample, 99.0))
    body = sample[ndimage.uniform_filter(sample, 3) > threshold]
    if body.size < 16:
        body = sample.ravel()
    bright, low, high = (float(v) for v in np.percentile(body, (99.0, 5.0, 95.0)))
    bright = max(bright, 1e-6)
    high = max(high, low + 1e-6)
    return threshold, bright, low, high


def prepare(
    voxels: np.ndarray, affine: np.ndarray, model_shape: tuple[int, int, int],
    intensity: str = "ct",
) -> tuple[torch.Tensor, GridMap]:
    """Turn source voxels into the model input.

    Args:
        voxels: ``(D, H, W)`` float32 (HU for CT; any scale for MR).
        affine: ``(4, 4)`` index to LPS.
        model_shape: the model grid.
        intensity: ``"ct"`` (fixed windows) or ``"mr"`` (levels of the study's
            own signal, :func:`mr_levels`).

    Returns:
        ``(x, grid)`` with ``x`` of shape ``(1, 2, D_m, H_m, W_m)`` float32.
    """
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, not {intensity!r}")
    perm, flip = canonical_orientation(affine)
    canon = np.transpose(voxels, perm)
    for a in range(3):
        if flip[a]:
            canon = np.flip(canon, axis=a)
    if intensity == "mr":
        threshold, bright, low, high = mr_levels(canon)
        windows: tuple[tuple[float, float], ...] = ((0.0, bright), (low, high))
    else:
        threshold, windows = -500.0, WINDOWS
    start, stop = body_box(canon, threshold, smooth=intensity == "mr")
    crop = np.ascontiguousarray(
        canon[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]], dtype=np.float32
    )
    t = torch.from_numpy(crop)[None, None]
    t = _resize(t, model_shape)
    chans = [((t - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in windows]
    x = torch.cat(chans, dim=1)
    grid = GridMap(
        perm=perm,
        flip=flip,
        start=start,
        stop=stop,
        model_shape=model_shape,
        source_shape=(int(voxels.shape[0]), int(voxels.shape[1]), int(voxels.shape[2])),
        windows=windows,
    )
    return x, grid


def labels_to_model_grid(labels: np.ndarray, grid: GridMap) -> np.ndarray:
    """Resample a source-grid array (labels, or voxel values) onto the model grid (nearest)."""
    canon = np.transpose(labels, grid.perm)
    for a in range(3):
        if grid.flip[a]:
            canon = np.flip(canon, axis=a)
    idx = []
    for a in range(3):
        lo, hi, m = grid.start[a], grid.stop[a], grid.model_shape[a]
        centres = lo + (np.arange(m) + 0.5) * (hi - lo) / m - 0.5
        idx.append(np.clip(np.rint(centres), lo, hi - 1).astype(np.int64))
    return np.ascontiguousarray(canon[np.ix_(idx[0], idx[1], idx[2])])


def prepare_volume(
    volume: Volume, model_shape: tuple[int, int, int], intensity: str = "ct"
) -> tuple[torch.Tensor, GridMap]:
    """:func:`prepare` for a :class:`Volume`."""
    return prepare(volume.voxels, volume.affine, model_shape, intensity)
