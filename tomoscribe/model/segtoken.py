"""The ``<seg>`` token and its mask decoder: referring segmentation (after M3D-LaMed).

M3D-LaMed adds a ``[SEG]`` token to the language model's vocabulary. Asked
to segment something, the model answers with that token, and the last
hidden state at its position is turned into a prompt for a 3D mask decoder
(SegVol's, prompted like SAM), which reads the image encoder's features and
returns a mask of whatever the text referred to.

Here the same contract, sized for the default model::

    [image tokens] <question> segment the lesions in the liver . <answer> <seg> . <eos>
                                                                           |
    h = LM hidden state (last layer) at the <seg> input position    (B, width)
    q = MLP(h) -> (w, b)                                             (B, F), (B,)
    f = [decoder features, upsampled to the model grid (C0);
         clamped log class probabilities of the segmentation (K)]   (B, F, D, H, W)
    mask logits = sum_F w * f + b                                    (B, D, H, W)

The decoder is a prompt-conditioned 1 x 1 x 1 convolution (the dynamic
mask head of CondInst / MaskFormer) over the frozen segmentation's
features, not SegVol's transformer: the segmentation head already
separates every structure the phantoms have, so what the prompt must carry
is *which* structure (an organ, an organ's lesions, every lesion), and a
linear read-out of per-voxel class evidence can express each of those (a
lesion in the liver = lesion evidence x nearness to liver, which the
decoder features carry; they are the features the region tokens pool).

The mask is on the model grid; :func:`mask_to_source` puts it on the
source grid. When the answer is ``none`` (nothing of that kind in the
study) no ``<seg>`` is written and there is no mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: the token that asks for a mask
SEG = "<seg>"
#: log probabilities are clamped here (a confident "no" is as good as a certain one)
LOG_FLOOR = -8.0


class SegTokenDecoder(nn.Module):
    """Prompt-conditioned mask head.

    Args:
        width: the language model's hidden size.
        feat_channels: channels of the segmentation head's decoder features.
        num_classes: classes of the segmentation.
        hidden: width of the prompt MLP.

    Shapes: :meth:`voxel_features` ``(B, C0, d, h, w)`` and ``(B, K, D, H, W)``
    -> ``(B, C0 + K, D, H, W)``; :meth:`forward` hidden ``(B, width)`` and
    features -> mask logits ``(B, D, H, W)``.
    """

    def __init__(self, width: int, feat_channels: int, num_classes: int,
                 hidden: int = 128) -> None:
        super().__init__()
        self.feat_channels = feat_channels + num_classes
        self.prompt = nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                    nn.Linear(hidden, self.feat_channels + 1))
        # per-channel scale of the features (the decoder features are not normalised)
        self.scale = nn.Parameter(torch.ones(self.feat_channels))

    @staticmethod
    def voxel_features(decoder: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-voxel features of the model grid (no gradient to the frozen segmentation)."""
        up = F.interpolate(decoder.detach(), size=logits.shape[2:], mode="trilinear",
                           align_corners=False)
        logp = logits.detach().log_softmax(dim=1).clamp(min=LOG_FLOOR)
        return torch.cat([up, logp], dim=1)

    def forward(self, hidden: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        q = self.prompt(hidden)
        w, b = q[:, :-1] * self.scale, q[:, -1]
        out: torch.Tensor = torch.einsum("bf,bfdhw->bdhw", w, feats) + b[:, None, None, None]
        return out


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice per sample (averaged).

    Shapes: logits and target ``(B, D, H, W)`` (target 0/1 float).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid()
    dims = (1, 2, 3)
    dice = (2 * (p * target).sum(dims) + 1.0) / (p.sum(dims) + target.sum(dims) + 1.0)
    return bce + (1 - dice).mean()


def lesion_shells(y: np.ndarray, lesion_class: int, classes: Sequence[int],
                  ring: int = 1, min_voxels: int = 1) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Connected lesion components of a label array and the classes around each, layer by layer.

    Layer ``j`` (from 0) is the set of voxels ``j + 1`` dilation steps (6-
    connected) from the component; its counts are the voxels of each of
    ``classes`` in it (``counts[j, c]`` for class ``c``). Components under
    ``min_voxels`` and components with none of ``classes`` in their
    ``ring`` layers are dropped (zeroed in the array). One labelling serves
    several ownership rules: :func:`lesion_owners` takes the most frequent
    class of all layers; the report takes the first two without the body
    outline, and grounds its findings on a thicker shell with it
    (:meth:`tomoscribe.model.scribe.Scribe.lesioned_organs`).

    Returns ``(components (D, H, W) int32, {component: counts (ring, n_classes) int64})``.
    """
    from scipy import ndimage

    comps, _n = ndimage.label(y == lesion_class)
    shells: dict[int, np.ndarray] = {}
    wanted = np.isin(y, list(classes))
    n_classes = int(max(classes, default=0)) + 1
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        if sl is None:
            continue
        # the component's box grown by the ring's width: dilation stays local
        grown = tuple(slice(max(s.start - ring - 1, 0), s.stop + ring + 1) for s in sl)
        local = comps[grown]
        comp = local == i
        if int(comp.sum()) < min_voxels:
            local[comp] = 0
            continue
        labels = y[grown]
        counts = np.zeros((ring, n_classes), np.int64)
        inside = comp
        for j in range(ring):
            grown_j = ndimage.binary_dilation(inside)
            layer = grown_j & ~inside & wanted[grown]
            counts[j] = np.bincount(labels[layer], minlength=n_classes)[:n_classes]
            inside = grown_j
        if not counts.any():
            local[comp] = 0
            continue
        shells[i] = counts
    return comps, shells


def shell_owner(counts: np.ndarray, layers: slice = slice(None),
                exclude: Sequence[int] = ()) -> int | None:
    """The most frequent class of a shell's ``layers``, leaving out ``exclude``; ``None`` if none.

    ``counts`` is ``(n_layers, n_classes)`` (:func:`lesion_shells`). Ties go
    to the lowest class (as :func:`numpy.argmax`).
    """
    counts = counts[layers].sum(axis=0)
    if exclude:
        counts[[c for c in exclude if c < counts.size]] = 0
    if not counts.any():
        return None
    return int(counts.argmax())


def lesion_owners(y: np.ndarray, lesion_class: int, organ_classes: Sequence[int],
                  ring: int = 1, min_voxels: int = 1) -> tuple[np.ndarray, dict[int, int]]:
    """Connected lesion components of a label array and the organ class around each.

    A component's organ is the most frequent of ``organ_classes`` in the
    ``ring``-voxel shell around it (:func:`lesion_shells`). Components under
    ``min_voxels`` and components that touch no organ are dropped (zeroed in
    the array).

    Returns ``(components (D, H, W) int32, {component: organ class})``.
    """
    comps, shells = lesion_shells(y, lesion_class, organ_classes, ring, min_voxels)
    owners = {i: int(counts.sum(axis=0).argmax()) for i, counts in shells.items()}
    return comps, owners


def refer_target(y: np.ndarray, template: str, organ_class: int | None, lesion_class: int,
                 organ_classes: Sequence[int]) -> np.ndarray:
    """The mask a referring question asks for, from a label array ``(D, H, W)`` (bool).

    ``segment the {organ}``: the organ with its lesions; ``segment the lesions
    in the {organ}``: the lesions whose shell is mostly that organ; ``segment
    the lesions``: every lesion voxel. (The body is not an organ here.)
    """
    if template.startswith("segment the lesions") and organ_class is None:
        return np.asarray(y == lesion_class)
    assert organ_class is not None
    comps, owners = lesion_owners(y, lesion_class, [c for c in organ_classes if c != 1])
    mine = [i for i, o in owners.items() if o == organ_class]
    lesions = np.isin(comps, mine) if mine else np.zeros(y.shape, dtype=bool)
    if template.startswith("segment the lesions"):
        return lesions
    return np.asarray((y == organ_class) | lesions)


def snap_to_segmentation(mask: np.ndarray, labels: np.ndarray, classes: Sequence[int],
                         lesion_class: int, share: float = 0.5,
                         lesion_share: float = 0.0,
                         components: SnapIndex | None = None) -> np.ndarray:
    """The regions of a finer segmentation that a coarse mask mostly covers (bool).

    The decoder's mask is drawn on the 48 x 96 x 96 model grid (7.7 mm
    between slices of a 370 mm scan); the cascade's refined labels are on the
    source grid. The decoder says *which* structure, the refined labels
    *where its border is*: each organ region of ``labels`` (a class in
    ``classes``) of which at least ``share`` of the voxels are in ``mask`` is
    kept whole, and so is each connected lesion component of which more than
    ``lesion_share`` is (by default: any voxel), the rest dropped.

    Lesions get the looser rule because a 10-15 mm lesion is one or two
    model-grid voxels thick: the decoder's mask, drawn on that grid, touched
    such lesions but covered under half of them in 13 of 48 test questions
    for an organ's lesions, and the answer came back empty. The caller keeps
    lesions to the organ the question names (:meth:`Scribe.refer
    <tomoscribe.model.scribe.Scribe.refer>`), so a touched lesion of the
    wrong organ does not stay.

    Args:
        mask: the decoder's mask on the source grid ``(D, H, W)`` bool.
        labels: the refined labels on the same grid.
        classes: organ classes that count as regions.
        lesion_class: lesions count component by component.
        share: least covered share of an organ region that keeps it.
        lesion_share: least covered share of a lesion component that keeps
            it, beyond touching it at all.
        components: :func:`lesion_component_index` of ``labels``, if the
            caller has it (computed here otherwise).
    """
    index = components if components is not None else lesion_component_index(labels,
                                                                                lesion_class)
    comps, objects, sizes = index
    covered_by = np.bincount(labels[mask], minlength=len(sizes))
    out = np.zeros(mask.shape, dtype=bool)
    for c in classes:  # an organ region is kept whole when the mask covers enough of it
        if c < len(sizes) and sizes[c] and covered_by[c] >= share * sizes[c]:
            out |= labels == c
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        comp = comps[sl] == i
        covered = int((mask[sl] & comp).sum())
        if covered and covered >= lesion_share * int(comp.sum()):
            out[sl] |= comp
    return out


class SnapIndex(NamedTuple):
    """What :func:`snap_to_segmentation` reads of the refined labels, computed once per volume."""

    #: connected lesion components, ``(D, H, W)`` int32 (0: none)
    comps: np.ndarray
    #: bounding box of each component (``comps == i`` at ``objects[i - 1]``)
    objects: list[tuple[slice, ...] | None]
    #: voxels of each label value, ``(max label + 1,)``
    sizes: np.ndarray


def lesion_component_index(labels: np.ndarray, lesion_class: int) -> SnapIndex:
    """The :class:`SnapIndex` of refined ``labels`` (uint8).

    A caller answering several questions about one volume computes it once:
    on a 300 x 512 x 512 volume it took 0.9 s of the 1.0 s a snap took
    without it (the labelling and the counting of every label).
    """
    from scipy import ndimage

    comps, _n = ndimage.label(labels == lesion_class)
    return SnapIndex(comps, list(ndimage.find_objects(comps)), np.bincount(labels.ravel()))
