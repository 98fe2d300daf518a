"""The 2D slice branch with text-guided inter-slice scoring (TG-IS, after Med-2E3).

A radiologist reads a CT slice by slice, and which slices matter depends on
the question. Med-2E3 adds to a 3D encoder a 2D encoder over the slices and
scores each slice against the instruction's text; the softmax of the scores
over slices weights the slice features into extra tokens for the language
model. Here the same idea, sized for the default model:

::

    x (B, C, D, H, W) --2D CNN per slice--> s (B, D, 64)
    3D band: stage-2 encoder features pooled over (h, w), resampled to D
             (B, C2, D), the segmentation's class mass per slice (B, K, D)
             and, with ``owned``, the area per slice of the lesions each
             organ owns (B, K, D)
    keys = MLP([s, band, log1p(mass)]) + slice position   (B, D, W)
    query = Linear(mean text embedding of the instruction) (B, T, W)
    a = softmax_D(q . k / sqrt(W))                         (B, T, D)
    tokens = a @ Value(keys)                               (B, T, W)
    relevance = mean_T(a)                                  (B, D)

The relevance is the model's per-slice answer to "where should I look for
this question?": :class:`~tomoscribe.model.scribe.Scribe` uses its top slices
as the key images an answer references. The instruction of a report is the
``<report>`` marker alone, so a report gets its own learned query.

Deviation from Med-2E3 (written down because it matters): the published model
learns the scores from the language loss alone, over millions of image-text
pairs. The phantoms carry masks, so training here adds a pointing loss (the
cross-entropy between the relevance and the per-slice area of the structure
the question is about); ``--point-weight 0`` in ``tomoscribe.train`` turns it
off.

The owned-lesion area (``owned``; :func:`owned_lesion_area`) is the second
deviation. The class mass says where lesions are, not whose they are: with a
lung nodule and a liver lesion in one study, a question about the liver had
only the slice position and the organ masses to choose between them. Each
lesion component of the segmentation's argmax goes to the organ around it
(as the report assigns it), and its area per slice is written in that
organ's row: the query of a question naming the liver can then match the
slices of the liver's own lesions. Measured on 20 validation phantoms with
the 0.6.0 segmentation, taking the slice with the most owned lesion area
(else the organ's largest) points at what the question is about in 0.945 of
the questions, the per-slice lesion mass within two voxels of the organ in
0.889 (the lesion probability spread over a lung outweighs a small nodule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tomoscribe.model.refine import refined_organs
from tomoscribe.model.segtoken import lesion_owners


def owned_lesion_area(logits: torch.Tensor, lesion_class: int,
                      organ_classes: tuple[int, ...]) -> torch.Tensor:
    """Per-slice area of the lesions each organ owns, from segmentation logits.

    ``logits`` ``(B, K, D, H, W)``. The lesion components of the argmax
    (two voxels or more) each go to the organ most of their two-voxel shell
    lies in (:func:`~tomoscribe.model.segtoken.lesion_owners`; the body is
    not an owner, as in the report). Returns ``(B, K, D)`` float: row ``c``
    the voxels per slice of the lesions organ class ``c`` owns, row 0 those
    of every owned lesion; the other rows are 0.
    """
    labels = logits.detach().argmax(dim=1).cpu().numpy()
    out = torch.zeros(logits.shape[0], logits.shape[1], logits.shape[2])
    organs = refined_organs(organ_classes)
    for b, y in enumerate(labels):
        if not (y == lesion_class).any():
            continue
        comps, owners = lesion_owners(y, lesion_class, organs, ring=2, min_voxels=2)
        for comp, organ in owners.items():
            area = torch.from_numpy((comps == comp).sum(axis=(1, 2))).float()
            out[b, organ] += area
            out[b, 0] += area
    return out.to(device=logits.device, dtype=logits.dtype)


class SliceEncoder2D(nn.Module):
    """A small 2D CNN applied to every slice of a volume.

    Input ``(B, C, D, H, W)``; output ``(B, D, out)``: per-slice features
    (average and max pooled over the plane). Each slice is averaged down by
    ``pool`` in-plane, cut into ``patch`` x ``patch`` patches (a strided
    convolution, as a ViT stem), then read by one 3 x 3 stride-2 convolution:
    a 96 x 96 model slice becomes 12 x 12 patches, then 6 x 6. Training runs it
    on every slice of every sample on CPU: a patch stem is about 3x cheaper
    than a stack of 3 x 3 convolutions for the same output grid.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int] = (32, 48),
                 out: int = 64, pool: int = 2, patch: int = 4) -> None:
        super().__init__()
        self.pool = pool
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], patch, stride=patch), nn.GELU(),
            nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Sequential(nn.LayerNorm(2 * channels[1]), nn.Linear(2 * channels[1], out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        if self.pool > 1:
            x = F.avg_pool3d(x, (1, self.pool, self.pool))
            h, w = x.shape[3], x.shape[4]
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        f = self.body(flat)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.head(pooled).view(b, d, -1)
        return out


class SliceBranch(nn.Module):
    """2D slice features, mixed with the 3D band, scored by the instruction.

    Args:
        in_channels: image channels (the model's input channels).
        band_channels: channels of the 3D encoder stage used for the band.
        num_classes: segmentation classes (the per-slice class mass).
        depth: slices on the model grid (``D``).
        width: language-model width.
        tokens: tokens produced (one query per token).
        owned: the mass input also holds the owned-lesion area
            (:func:`owned_lesion_area`): ``2 K`` rows instead of ``K``.
    """

    def __init__(self, in_channels: int, band_channels: int, num_classes: int, depth: int,
                 width: int, tokens: int = 2, owned: bool = False) -> None:
        super().__init__()
        self.tokens = tokens
        self.width = width
        self.encoder2d = SliceEncoder2D(in_channels)
        mass_rows = 2 * num_classes if owned else num_classes
        self.mix = nn.Sequential(nn.Linear(64 + band_channels + mass_rows, width), nn.GELU(),
                                 nn.Linear(width, width))
        self.position = nn.Parameter(torch.randn(depth, width) * 0.02)
        self.query = nn.Linear(width, tokens * width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.kind = nn.Parameter(torch.randn(tokens, width) * 0.02)

    @staticmethod
    def band(feat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameter-free 3D inputs: ``(band (B, C2, d), mass (B, K, D))``.

        ``feat`` ``(B, C2, d, h, w)`` is an encoder stage, ``logits``
        ``(B, K, D, H, W)`` the segmentation. Both come from the frozen vision
        side in the language stages, so training caches them.
        """
        band = feat.detach().mean(dim=(3, 4))
        mass = logits.detach().softmax(dim=1).sum(dim=(3, 4))
        return band, mass

    def slice_keys(self, x: torch.Tensor, band: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Per-slice keys ``(B, D, width)`` from the image and the band inputs."""
        return self.keys_from(self.encoder2d(x), band, mass)

    def keys_from(self, s: torch.Tensor, band: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """:meth:`slice_keys` from already encoded axial slices ``s`` ``(B, D, 64)``."""
        depth = s.shape[1]
        b = F.interpolate(band, size=depth, mode="linear", align_corners=False)
        m = torch.log1p(mass)
        if m.shape[-1] != depth:
            m = F.interpolate(m, size=depth, mode="linear", align_corners=False)
        keys: torch.Tensor = self.mix(torch.cat([s, b.transpose(1, 2), m.transpose(1, 2)], -1))
        return keys + self.position[:depth]

    def select(self, keys: torch.Tensor, instruction: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score slices against an instruction embedding.

        Args:
            keys: ``(B, D, width)`` from :meth:`slice_keys`.
            instruction: ``(B, width)`` mean text embedding of the instruction.

        Returns:
            ``(tokens (B, T, width), relevance (B, D))``; each row of the
            relevance sums to 1.
        """
        bsz, _depth, width = keys.shape
        q = self.query(instruction).view(bsz, self.tokens, width)
        k = self.key(keys)
        att = torch.einsum("btw,bdw->btd", q, k) / math.sqrt(width)
        weights = att.softmax(dim=-1)
        tokens = self.out(torch.einsum("btd,bdw->btw", weights, self.value(keys))) + self.kind
        return tokens, weights.mean(dim=1)
