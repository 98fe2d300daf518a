"""Organ-by-organ refinement at source resolution: the cascade's second stage.

The segmentation head sees the whole body on the 48 x 96 x 96 model grid.
For a 370 mm scan that is 7.7 mm per slice, so a 10 mm lesion covers one or
two model slices, and organ borders are blurred by the same factor: this is
what held lesion Dice at 0.04 (10-15 mm) and the kidneys at 0.78. Cascaded
segmentation (a coarse whole-volume pass, then a fine pass inside regions of
interest) is the standard remedy; here the regions are the organs the coarse
pass found.

For each structure but the body (chest-abdomen CT: lungs, liver, spleen,
kidneys; head MR: the hemispheres, the cerebellum, the ventricles):

1. **Box**: the organ's coarse mask, put on the canonical source array
   (axes permuted and flipped, never interpolated), its bounding box grown by
   :data:`MARGIN_MM`.
2. **Grid**: the source voxels of the box, coarsened by area averaging only
   along axes finer than :data:`FLOOR_MM` (a 0.7 mm CT is refined at 2.5 mm;
   the phantoms' 2.5-5 mm grids are used as they are).
3. **Input** ``(1, 4, d, h, w)``: the model's two intensity channels, scaled
   by the levels the coarse pass used (:attr:`GridMap.windows`: the two CT
   windows, or an MR study's own percentiles), the coarse
   probability of this organ or a lesion (where the organ is, its lesions
   included) and of the lesion class, sampled trilinearly from the model
   grid.
4. :class:`OrganRefiner`, a small U-Net whose inner blocks are DCFormer's
   decomposed convolutions, gives three classes per voxel: other, this
   organ, lesion (of any organ: a liver lesion in the right lung's box is
   still a lesion).
5. **Merge**, on the source voxels (:func:`box_labels`): the coarse organ
   is replaced by the refined one inside the box (where boxes overlap, the
   later organ's refinement wins on its own class only); lesion voxels are
   the union of every box's lesion class. Voxels the coarse pass called
   this organ, or a lesion, and no refiner kept become the body class (they
   are inside the body).

The result (:func:`refine`) is a label array on the source grid, in the
source orientation, with the coarse pass's label values, and each organ's
refined lesion statistics, which the region tokens can read in place of the
coarse ones (``NetConfig.refine_stats``). Two kinds of statistics
(``NetConfig.refine_stats_mode``):

- ``"rim"`` (models up to 0.5.0): per box, ``(log(1 + lesion ml), peak
  lesion probability)`` over the organ grown by two voxels and the lesion
  components touching it. A lesion between two organs counts for both: in
  a test study a right kidney cyst under the liver gave the liver 8.6 ml of
  lesion, and a spleen lesion the left lung 10.8 ml; the language model,
  left to sort out which organ has the lesion, named the wrong one or
  neither (over 200 test studies, 7 of the 37 detected 10-15 mm lesions
  were in no finding).
- ``"owned"``: after the merge, each lesion component of the final labels
  goes to one organ, the most frequent in its two-voxel shell, exactly as
  the report assigns them (:func:`tomoscribe.model.segtoken.lesion_owners`,
  components under :data:`MIN_LESION_ML` left out as noise); an organ's
  statistics are ``(log(1 + ml), count)`` of the components it owns. What
  the language model reads is then what the report will measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tomoscribe.model.dcformer import DCBlock
from tomoscribe.model.preprocess import GridMap

#: the refinement grid is never finer than this (mm, per axis)
FLOOR_MM = 2.5
#: growth of an organ's coarse bounding box (mm): a model voxel and a half
MARGIN_MM = 12.0
#: classes of the refiner's output
OTHER, ORGAN, LESION = 0, 1, 2
#: input channels: two windows, coarse organ-or-lesion probability, coarse lesion probability
IN_CHANNELS = 4
#: class of the body outline: no organ box (it is the whole volume)
BODY_CLASS = 1


#: flips of a box's canonical axes (slice, row, column) per ``NetConfig.refine_flips``
FLIP_SETS: dict[int, tuple[tuple[int, ...], ...]] = {
    0: ((),),
    1: ((), (2,)),
    3: ((), (0,), (1,), (2,)),
    7: ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)),
}


def refined_organs(organ_classes: Sequence[int]) -> list[int]:
    """The organ classes that get a box: every organ but the body."""
    return [c for c in organ_classes if c != BODY_CLASS]


def _group_norm(channels: int) -> nn.Module:
    """Per-box normalisation: 4 groups (the statistics of one box, never of a batch)."""
    return nn.GroupNorm(4, channels)


class OrganRefiner(nn.Module):
    """A small 3D U-Net for one organ box: ``(B, 4, d, h, w) -> (B, 3, d, h, w)``.

    Full resolution has one plain 3 x 3 x 3 convolution on the way in and one
    on the way out; the half- and quarter-resolution levels use DCFormer
    blocks (decomposed depthwise convolutions + channel MLP). Any box size
    works: the input is padded to a multiple of 4 and the output cropped.

    Every normalisation is a GroupNorm: training reads patches, inference
    whole boxes, and BatchNorm's running statistics (gathered on patches half
    of which are centred on a lesion) turned a 41 HU nodule in a lung back
    into lung at inference, while the same weights with the box's own
    statistics found it.

    Args:
        channels: channels at full, half and quarter resolution.
        kernel: kernel of the decomposed convolutions.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 48), kernel: int = 5) -> None:
        super().__init__()
        c0, c1, c2 = channels
        norm = _group_norm
        self.stem = nn.Sequential(nn.Conv3d(IN_CHANNELS, c0, 3, padding=1, bias=False),
                                  norm(c0), nn.GELU())
        self.down1 = nn.Sequential(nn.Conv3d(c0, c1, 2, stride=2), norm(c1),
                                   DCBlock(c1, kernel, norm=norm))
        self.down2 = nn.Sequential(nn.Conv3d(c1, c2, 2, stride=2), norm(c2),
                                   DCBlock(c2, kernel, norm=norm), DCBlock(c2, kernel, norm=norm))
        self.up2 = nn.Sequential(nn.Conv3d(c2 + c1, c1, 3, padding=1, bias=False),
                                 norm(c1), nn.GELU())
        self.up1 = nn.Sequential(nn.Conv3d(c1 + c0, c0, 3, padding=1, bias=False),
                                 norm(c0), nn.GELU())
        self.out = nn.Conv3d(c0, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = (int(v) for v in x.shape[2:])
        pad = [(-s) % 4 for s in (d, h, w)]
        if any(pad):  # F.pad takes the last axis first
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        f0 = self.stem(x)
        f1 = self.down1(f0)
        f2 = self.down2(f1)
        u = F.interpolate(f2, size=f1.shape[2:], mode="trilinear", align_corners=False)
        u = self.up2(torch.cat([u, f1], dim=1))
        u = F.interpolate(u, size=f0.shape[2:], mode="trilinear", align_corners=False)
        u = self.up1(torch.cat([u, f0], dim=1))
        out: torch.Tensor = self.out(u)
        return out[:, :, :d, :h, :w]


# ----------------------------------------------------------------- geometry
def to_canonical(array: np.ndarray, grid: GridMap) -> np.ndarray:
    """A source-oriented ``(D, H, W)`` array in canonical order (a view)."""
    canon = np.transpose(array, grid.perm)
    for a in range(3):
        if grid.flip[a]:
            canon = np.flip(canon, axis=a)
    return canon


def from_canonical(canon: np.ndarray, grid: GridMap) -> np.ndarray:
    """Inverse of :func:`to_canonical` (a contiguous copy)."""
    for a in range(3):
        if grid.flip[a]:
            canon = np.flip(canon, axis=a)
    return np.ascontiguousarray(np.transpose(canon, np.argsort(grid.perm)))


def canonical_spacing(spacing: Sequence[float], grid: GridMap) -> tuple[float, float, float]:
    """Source voxel size ``(slice, row, column)`` reordered to canonical axes (mm)."""
    return (float(spacing[grid.perm[0]]), float(spacing[grid.perm[1]]),
            float(spacing[grid.perm[2]]))


Box = tuple[tuple[int, int, int], tuple[int, int, int]]


def organ_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float = MARGIN_MM
              ) -> Box | None:
    """Bounding box ``(start, stop)`` of a canonical mask, grown by ``margin_mm``.

    ``None`` for an empty mask.
    """
    if not mask.any():
        return None
    start, stop = [], []
    for a in range(3):
        prof = mask.any(axis=tuple(b for b in range(3) if b != a))
        nz = np.nonzero(prof)[0]
        m = int(np.ceil(margin_mm / max(float(spacing[a]), 1e-3)))
        start.append(max(int(nz[0]) - m, 0))
        stop.append(min(int(nz[-1]) + 1 + m, mask.shape[a]))
    return (start[0], start[1], start[2]), (stop[0], stop[1], stop[2])


def box_shape(box: Box, spacing: Sequence[float], floor_mm: float = FLOOR_MM
              ) -> tuple[int, int, int]:
    """The refinement grid of a box: source voxels, coarsened to ``floor_mm`` where finer."""
    (s0, s1, s2), (e0, e1, e2) = box
    out = []
    for n, sp in zip((e0 - s0, e1 - s1, e2 - s2), spacing, strict=True):
        # 2% of tolerance: a 2.5 mm series computed from positions reads 2.4999
        out.append(n if sp >= 0.98 * floor_mm else max(round(n * sp / floor_mm), 1))
    return out[0], out[1], out[2]


def _axis_coords(lo: int, hi: int, n_out: int, grid_lo: int, grid_hi: int) -> torch.Tensor:
    """Normalised model-grid coordinates (``align_corners=False``) of a box's voxel centres."""
    n = hi - lo
    centres = lo + (torch.arange(n_out, dtype=torch.float32) + 0.5) * n / n_out - 0.5
    return 2.0 * (centres - grid_lo + 0.5) / float(grid_hi - grid_lo) - 1.0


def coarse_in_box(prob: torch.Tensor, grid: GridMap, box: Box,
                  shape: tuple[int, int, int]) -> torch.Tensor:
    """Sample model-grid maps ``(1, C, Dm, Hm, Wm)`` at a box's voxels: ``(1, C, d, h, w)``.

    Trilinear; outside the body crop the border value is repeated.
    """
    zs, ys, xs = (_axis_coords(box[0][a], box[1][a], shape[a], grid.start[a], grid.stop[a])
                  for a in range(3))
    gz, gy, gx = torch.meshgrid(zs, ys, xs, indexing="ij")
    g = torch.stack([gx, gy, gz], dim=-1)[None]  # grid_sample wants (x, y, z) = (W, H, D)
    return F.grid_sample(prob, g, mode="bilinear", padding_mode="border", align_corners=False)


def box_input(canon_hu: np.ndarray, prob: torch.Tensor, grid: GridMap, box: Box,
              spacing: Sequence[float], organ: int, lesion: int,
              floor_mm: float = FLOOR_MM) -> torch.Tensor:
    """The refiner's input for one organ box: ``(1, 4, d, h, w)`` float32.

    Args:
        canon_hu: the canonical source array (HU for CT; any scale for MR).
        prob: coarse class probabilities ``(1, K, Dm, Hm, Wm)`` on the model grid.
        grid: the model grid's :class:`GridMap`.
        box: from :func:`organ_box`.
        spacing: canonical source voxel size (mm).
        organ, lesion: class indices of the organ and of lesions.
    """
    (s0, s1, s2), (e0, e1, e2) = box
    crop = np.ascontiguousarray(canon_hu[s0:e0, s1:e1, s2:e2], dtype=np.float32)
    t = torch.from_numpy(crop)[None, None]
    shape = box_shape(box, spacing, floor_mm)
    if tuple(t.shape[2:]) != shape:
        t = F.adaptive_avg_pool3d(t, shape)
    chans = [((t - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in grid.windows]
    maps = coarse_in_box(prob[:, [organ, lesion]], grid, box, shape)
    # where the organ is, its lesions included: a refiner given the organ's
    # own probability copied it, and every lesion the coarse head had missed
    # (a 37 HU nodule in a lung) stayed lung
    region = (maps[:, :1] + maps[:, 1:]).clamp(max=1.0)
    return torch.cat([*chans, region, maps[:, 1:]], dim=1)


#: source voxels resampled per chunk by :func:`box_labels` (bounds its memory)
CHUNK_VOXELS = 2_000_000


def nearest_voxels(size: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Open-mesh indices picking, for each of ``size`` source voxels, its nearest of ``shape``.

    Both grids span the same extent (a box and its refinement grid); index an
    array of ``shape`` with the result to get one of ``size``.
    """
    return np.ix_(*[np.minimum((np.arange(size[a]) * shape[a]) // size[a], shape[a] - 1)
                    for a in range(3)])


def box_labels(prob: torch.Tensor, box: Box) -> np.ndarray:
    """Labels ``(D, H, W)`` uint8 on a box's source voxels from its refined probabilities.

    ``prob`` is the box grid's ``(3, d, h, w)`` softmax. Where the box grid is
    the source (the chest-abdomen phantoms' 2.5-5 mm grids) this is the
    argmax. Where the source is finer than :data:`FLOOR_MM` (a head MR's
    0.9 mm pixels, a 0.7 mm CT), each source voxel gets the argmax of the
    probabilities resampled trilinearly at its centre, so a lesion's edge is
    drawn between the refinement voxels, not along their blocks (nearest
    labels put the edge of a 10 mm lesion up to 1.25 mm off, in 2.5 mm
    steps).

    Only voxels near an edge are resampled: a convex mix of probability
    vectors that share their argmax keeps it, so where the 3 x 3 x 3
    neighbourhood of a voxel's nearest box voxel holds one label, that label
    is the resampled argmax. (Resampling a whole 18 M-voxel liver box took
    4.4 s on one core.) Edge voxels are done :data:`CHUNK_VOXELS` at a time.
    """
    size = tuple(box[1][a] - box[0][a] for a in range(3))
    coarse = prob.argmax(dim=0).to(torch.uint8)
    if tuple(prob.shape[1:]) == size:
        return coarse.numpy()
    shape = tuple(int(v) for v in prob.shape[1:])
    idx = nearest_voxels(size, shape)
    out = coarse.numpy()[idx]
    lab = coarse[None, None].float()
    uneven = (F.max_pool3d(lab, 3, stride=1, padding=1)
              != -F.max_pool3d(-lab, 3, stride=1, padding=1))[0, 0].numpy()
    edge = np.nonzero(uneven[idx])
    # normalised input coordinates (align_corners=False) of each source voxel's
    # centre: the box grid and the source voxels span the same extent
    norm = [torch.from_numpy((e.astype(np.float32) + 0.5) * 2.0 / n - 1.0)
            for e, n in zip(edge, size, strict=True)]
    for i in range(0, len(edge[0]), CHUNK_VOXELS):
        g = torch.stack([norm[2][i : i + CHUNK_VOXELS], norm[1][i : i + CHUNK_VOXELS],
                         norm[0][i : i + CHUNK_VOXELS]], dim=-1)  # (x, y, z) = (W, H, D)
        part = F.grid_sample(prob[None], g[None, None, None], mode="bilinear",
                             padding_mode="border", align_corners=False)
        out[tuple(e[i : i + CHUNK_VOXELS] for e in edge)] = (
            part[0, :, 0, 0].argmax(dim=0).to(torch.uint8).numpy())
    return out


@dataclass
class Refinement:
    """What the refiner gives for one volume.

    Attributes:
        labels: refined labels on the source grid, source orientation, uint8
            ``(D, H, W)`` (the coarse pass's label values).
        stats: per refined organ class, ``(log(1 + lesion ml), peak lesion
            probability)`` over the organ and its rim (``"rim"``), or
            ``(log(1 + ml), count)`` of the lesion components it owns
            (``"owned"``): the refined counterpart of the coarse lesion
            statistics of the region tokens
            (:class:`tomoscribe.model.projector.RegionTokens`).
    """

    labels: np.ndarray
    stats: dict[int, tuple[float, float]] = field(default_factory=dict)

    def region_stats(self, regions: torch.Tensor, organ_classes: Sequence[int]) -> torch.Tensor:
        """Region-token statistics ``(B, organs, F)`` with the lesion columns refined.

        The last two columns of each refined organ's row are replaced; other
        rows (the body) keep the coarse values.
        """
        out = regions.clone()
        for row, cls in enumerate(organ_classes):
            if cls in self.stats:
                out[:, row, -2:] = torch.tensor(self.stats[cls], dtype=out.dtype)
        return out


def _organ_lesion_stats(prob: torch.Tensor, voxel_ml: float) -> tuple[float, float]:
    """``(log(1 + ml), peak)`` of lesion probability over the organ, its rim and its lesions.

    ``prob`` is one box's ``(3, d, h, w)`` softmax. The region is the refined
    organ grown by two voxels, plus every lesion component that touches it (a
    large lesion is no part of the organ's mask, nor of its two-voxel rim).
    """
    from scipy import ndimage

    pred = prob.argmax(dim=0).numpy()
    organ = pred == ORGAN
    if not organ.any():
        return 0.0, 0.0
    near = ndimage.binary_dilation(organ, iterations=2)
    comps, _n = ndimage.label(pred == LESION)
    touching = np.unique(comps[near & (comps > 0)])
    region = near | np.isin(comps, touching[touching > 0])
    p = prob[LESION].numpy()[region]
    return float(np.log1p(p.sum() * voxel_ml)), float(p.max())


#: the statistics modes of :func:`refine` (``NetConfig.refine_stats_mode``)
STATS_MODES = ("rim", "owned")
#: refined lesion components smaller than this are noise (a 5.8 mm sphere): the
#: report leaves them out, and so do the "owned" statistics. Chosen on 200
#: validation phantoms among 0.05, 0.1 and 0.15 ml (11, 9 and 9 false findings;
#: 0.15 lost a true one); the phantoms' smallest lesion is 10 mm (0.52 ml)
MIN_LESION_ML = 0.1


def report_lesions(labels: np.ndarray, lesion: int, organs: Sequence[int], voxel_ml: float
                   ) -> tuple[np.ndarray, dict[int, int]]:
    """The lesions a report names: connected components of refined labels and their organs.

    A component's organ is the most frequent organ in its two-voxel shell;
    components under :data:`MIN_LESION_ML` (at ``voxel_ml`` a voxel) and
    components with no organ around them are noise. The report
    (:class:`tomoscribe.model.scribe.Scribe`) and the ``"owned"`` statistics
    both count lesions this way. Returns ``(components (D, H, W) int32,
    {component: organ class})``.
    """
    from tomoscribe.model.segtoken import lesion_owners

    return lesion_owners(labels, lesion, list(organs), ring=2,
                         min_voxels=_min_lesion_voxels(voxel_ml))


def report_lesion_shells(labels: np.ndarray, lesion: int, classes: Sequence[int], voxel_ml: float,
                         ring: int = 2) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """:func:`report_lesions`' components with their shells' class counts, not an owner.

    The same components and sizes; the counts are per layer, ``ring`` of
    them (:func:`tomoscribe.model.segtoken.lesion_shells`), and the caller
    picks the owner (:func:`tomoscribe.model.segtoken.shell_owner`): with
    ``ring=2``, the first two layers without the body give
    :func:`report_lesions`' owners. Returns ``(components (D, H, W) int32,
    {component: counts (ring, n_classes)})``.
    """
    from tomoscribe.model.segtoken import lesion_shells

    return lesion_shells(labels, lesion, list(classes), ring=ring,
                         min_voxels=_min_lesion_voxels(voxel_ml))


def _min_lesion_voxels(voxel_ml: float) -> int:
    """:data:`MIN_LESION_ML` in voxels of ``voxel_ml`` (never under 2)."""
    return max(2, int(np.ceil(MIN_LESION_ML / voxel_ml)))


def owned_lesion_stats(canon: np.ndarray, lesion: int, organs: Sequence[int],
                       voxel_ml: float) -> dict[int, tuple[float, float]]:
    """``(log(1 + ml), count)`` of the lesion components each organ owns (``"owned"``).

    ``canon`` is the merged canonical label array; the components and their
    organs are :func:`report_lesions`'.
    """
    comps, owners = report_lesions(canon, lesion, organs, voxel_ml)
    sizes = np.bincount(comps.ravel())
    out = {organ: (0.0, 0.0) for organ in organs}
    for organ in organs:
        mine = [c for c, o in owners.items() if o == organ]
        if mine:
            ml = float(sizes[mine].sum()) * voxel_ml
            out[organ] = (float(np.log1p(ml)), float(len(mine)))
    return out


def box_softmax(net: OrganRefiner, x: torch.Tensor, flips: int = 0) -> torch.Tensor:
    """Class probabilities ``(3, d, h, w)`` of one box input ``(1, 4, d, h, w)``.

    With ``flips``, the mean of the plain pass and of the flipped copies of
    :data:`FLIP_SETS` (each flipped back). The refiner was trained on patches
    flipped at random along every axis, so each copy is an input it knows; an
    organ's edge that one pass places a voxel too far is outvoted.
    """
    total = torch.zeros((3, *x.shape[2:]))
    sets = FLIP_SETS[flips]
    for axes in sets:
        dims = [a + 2 for a in axes]
        out = net(x.flip(dims) if dims else x)
        total += (out.flip(dims) if dims else out)[0].softmax(dim=0)
    return total / len(sets)


def drop_weak_lesions(prob: torch.Tensor, pred: np.ndarray, min_prob: float) -> np.ndarray:
    """Relabel the lesion components of a box whose mean lesion probability is under ``min_prob``.

    ``prob`` is the box's ``(3, d, h, w)`` softmax on the refinement grid,
    ``pred`` its labels on the source voxels (:func:`box_labels`), changed in
    place and returned. Each voxel of a weak component takes the likelier of
    the other two classes. A component's mean probability is read on the
    source voxels (each takes the nearest refinement voxel), so it does not
    depend on how finely the box was refined.

    Why: a refiner trained on more small lesions (``train_refine
    --small-share``) also gives more small false components, and on 120
    validation phantoms those behind falsely named sites averaged a lesion
    probability of 0.60-0.98 where each true site's best component averaged
    0.89 or more (see the README's "Where the findings go wrong").
    """
    from scipy import ndimage

    lesion = pred == LESION
    if min_prob <= 0 or not lesion.any():
        return pred
    idx = nearest_voxels(pred.shape, tuple(int(v) for v in prob.shape[1:]))
    near = np.stack([p[idx] for p in prob.numpy()])  # (3, D, H, W) on the source voxels
    comps, n = ndimage.label(lesion)
    means = np.asarray(ndimage.mean(near[LESION], comps, index=np.arange(1, n + 1)))
    weak = np.isin(comps, np.nonzero(means < min_prob)[0] + 1)
    if weak.any():
        pred[weak] = np.where(near[ORGAN] >= near[OTHER], ORGAN, OTHER)[weak]
    return pred


@torch.no_grad()
def refine(net: OrganRefiner, hu: np.ndarray, spacing: Sequence[float], grid: GridMap,
           logits: torch.Tensor, organs: Sequence[int], lesion: int,
           flips: int = 0, stats_mode: str = "rim", min_lesion_prob: float = 0.0
           ) -> Refinement:
    """Refine every organ box of a volume (see the module docstring).

    Args:
        net: the refiner (in eval mode).
        hu: the source voxels ``(D, H, W)``.
        spacing: source voxel size ``(slice, row, column)`` in mm.
        grid: the model grid's map.
        logits: coarse segmentation logits ``(1, K, Dm, Hm, Wm)``.
        organs: class indices of the organs to refine (others keep the coarse label).
        lesion: class index of lesions.
        flips: flipped copies of each box averaged in (:func:`box_softmax`).
        stats_mode: which lesions an organ's statistics count (:data:`STATS_MODES`,
            see the module docstring).
        min_lesion_prob: a box's lesion components whose mean lesion
            probability is under this are not lesions (:func:`drop_weak_lesions`;
            0 keeps every one). The ``"rim"`` statistics, read from the
            softmax, still count them; the ``"owned"`` ones do not.
    """
    if stats_mode not in STATS_MODES:
        raise ValueError(f"refine statistics mode {stats_mode!r} is not one of {STATS_MODES}")
    prob = logits.softmax(dim=1)
    coarse = grid.to_source_labels(logits.argmax(dim=1)[0].to(torch.uint8).numpy())
    canon = to_canonical(coarse, grid).copy()
    canon_hu = to_canonical(hu, grid)
    sp = canonical_spacing(spacing, grid)
    lesion_mask = np.zeros(canon.shape, dtype=bool)
    stats: dict[int, tuple[float, float]] = {}
    for organ in organs:
        box = organ_box(canon == organ, sp)
        if box is None:
            stats[organ] = (0.0, 0.0)
            continue
        x = box_input(canon_hu, prob, grid, box, sp, organ, lesion)
        out = box_softmax(net, x, flips)
        if stats_mode == "rim":
            grid_mm = [(box[1][a] - box[0][a]) * sp[a] / x.shape[2 + a] for a in range(3)]
            stats[organ] = _organ_lesion_stats(out, float(np.prod(grid_mm)) / 1000.0)
        pred = drop_weak_lesions(out, box_labels(out, box), min_lesion_prob)
        sl = tuple(slice(box[0][a], box[1][a]) for a in range(3))
        region = canon[sl]
        region[region == organ] = BODY_CLASS  # inside the body, not this organ
        region[(pred == ORGAN) & (region != lesion)] = organ
        lesion_mask[sl] |= pred == LESION
    canon[canon == lesion] = BODY_CLASS  # a coarse lesion no refiner confirmed
    canon[lesion_mask] = lesion
    if stats_mode == "owned":
        stats = owned_lesion_stats(canon, lesion, organs, float(np.prod(sp)) / 1000.0)
    return Refinement(from_canonical(canon, grid), stats)
