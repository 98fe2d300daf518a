"""PSAT: a plane-slice-aware transformer fusing 3D tokens with 2D views (after Med3DInsight).

Med3DInsight's idea is that a 3D encoder sees a volume at one coarse
resolution while a 2D encoder reads single slices in detail, and that the 2D
views are only useful to the 3D tokens when each view says *which plane* it
comes from and *where along that plane's axis* it lies. Med3DInsight
publishes no code; this module is tomoscribe's design of that idea, sized
for a CPU-trained model.

Design::

    x (B, C, D, H, W)
      axial view:    S slices evenly spaced along D   (each H x W)
      coronal view:  S slices evenly spaced along H   (each D x W)
      sagittal view: S slices evenly spaced along W   (each D x H)
    each slice -> shared 2D encoder (SliceEncoder2D) -> 64 features
      -> Linear to width + plane embedding (3 learned vectors)
         + position embedding (Linear of sin/cos features of the slice's
           relative position along its axis, 0 = first, 1 = last)
      = 3 S plane-slice tokens (B, 3 S, width)
    3D tokens (B, T, width)  (the projector's and region tokens)
      -> pre-norm cross-attention: queries = 3D tokens, keys/values =
         plane-slice tokens; residual
      -> pre-norm MLP; residual
      = fused 3D tokens (B, T, width), same count: the language model's
        prefix keeps its length.

Choices and why:

* cross-attention from 3D tokens to views (not self-attention over all of
  them): the 3D tokens stay the language model's interface; the cost grows
  with T x 3 S, not (T + 3 S) squared;
* the axial view reuses the TG-IS branch's slice features when the model has
  that branch (a subset of the same 2D encoder's output: no extra 2D work);
  coronal and sagittal slices go through the same shared encoder;
* residual branches whose output layers start at zero: a PSAT added to a
  trained 3D model is the identity at first, and fine-tuning starts from
  what the language model already learned;
* position as sin/cos of the relative position, not a table per index: the
  same embedding holds for any slice count.

The ablation in the README (3D-only vs 3D + TG-IS vs 3D + TG-IS + PSAT,
trained the same number of steps from the same start) is what justifies it,
or not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tomoscribe.model.tgis import SliceEncoder2D

#: plane indices: axial slices run along D, coronal along H, sagittal along W
PLANES = ("axial", "coronal", "sagittal")


def evenly_spaced(size: int, count: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``range(size)`` (centres of equal bins)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * size / count).long().clamp(
        max=size - 1)


class PlaneSliceFusion(nn.Module):
    """Fuse 3D tokens with axial, coronal and sagittal slice views.

    Args:
        width: token width (the language model's).
        slices: slices per plane (``S``).
        features: width of the 2D encoder's per-slice features.
        heads: attention heads.
        encoder2d: the shared 2D slice encoder (e.g. the TG-IS branch's);
            ``None`` builds one.
        in_channels: image channels (used only when building the encoder).
    """

    def __init__(self, width: int, slices: int = 16, features: int = 64, heads: int = 4,
                 encoder2d: SliceEncoder2D | None = None, in_channels: int = 2) -> None:
        super().__init__()
        self.slices = slices
        self.encoder2d = encoder2d if encoder2d is not None else SliceEncoder2D(in_channels)
        self.to_width = nn.Linear(features, width)
        self.plane = nn.Parameter(torch.randn(len(PLANES), width) * 0.02)
        self.position = nn.Linear(8, width)
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        # both residual branches start at zero: an added PSAT is the identity at first
        for layer in (self.attn.out_proj, self.mlp[-1]):
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _position_features(self, rel: torch.Tensor) -> torch.Tensor:
        """``(S,)`` relative positions in [0, 1] -> ``(S, 8)`` sin/cos features."""
        freqs = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=rel.dtype) * math.pi
        ang = rel[:, None] * freqs[None, :]
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)

    def views(self, x: torch.Tensor, axial: torch.Tensor | None = None) -> torch.Tensor:
        """Plane-slice tokens ``(B, 3 S, width)`` of a volume ``x`` ``(B, C, D, H, W)``.

        ``axial``, when given, holds the 2D encoder's features of every axial
        slice ``(B, D, features)``; its evenly spaced subset is used instead of
        encoding those slices again.
        """
        out = []
        for p, axis in enumerate((2, 3, 4)):
            size = x.shape[axis]
            idx = evenly_spaced(size, min(self.slices, size))
            if p == 0 and axial is not None:
                feats = axial[:, idx]
            else:
                # bring the plane's slicing axis to position 2: (B, C, S, a, b)
                view = x.index_select(axis, idx).movedim(axis, 2)
                feats = self.encoder2d(view)
            rel = (idx.to(x.dtype) + 0.5) / size
            tokens = (self.to_width(feats) + self.plane[p]
                      + self.position(self._position_features(rel)))
            out.append(tokens)
        return torch.cat(out, dim=1)

    def forward(self, tokens: torch.Tensor, x: torch.Tensor,
                axial: torch.Tensor | None = None) -> torch.Tensor:
        """Fused tokens ``(B, T, width)`` from 3D tokens ``(B, T, width)`` and ``x``."""
        kv = self.norm_kv(self.views(x, axial))
        attended, _ = self.attn(self.norm_q(tokens), kv, kv, need_weights=False)
        tokens = tokens + attended
        fused: torch.Tensor = tokens + self.mlp(self.norm_mlp(tokens))
        return fused


__all__ = ["PLANES", "PlaneSliceFusion", "evenly_spaced"]
