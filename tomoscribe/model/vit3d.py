"""A plain 3D ViT encoder with DCFormer's output contract: the ablation's baseline encoder.

The issue's ablation asks what DCFormer's decomposed convolutions buy over a
3D Vision Transformer of the same parameter count. This is that ViT, built
to slot in where :class:`~tomoscribe.model.dcformer.DCFormerEncoder` is
(``NetConfig.encoder = "vit"``), so the segmentation head, the projector and
everything after them stay the same.

Design (after UNETR, which reads a ViT out at several depths for a U-Net
decoder):

* patch embedding: a ``p x p x p`` convolution with stride ``p`` (``p = 8``:
  a 48 x 96 x 96 input gives 6 x 12 x 12 = 864 tokens);
* fixed 3D sine-cosine position codes (a third of the channels per axis), not
  learned ones: at this size a learned table would be most of the budget;
* ``depth`` pre-norm transformer layers (``torch.nn.TransformerEncoderLayer``,
  GELU, MLP ratio 2);
* four read-outs give DCFormer's four stages (strides 2, 4, 8 and 16 with its
  channel counts): stage ``i`` reads the tokens after layer
  ``ceil((i + 1) * depth / 4)``, projects them with a 1x1x1 convolution and
  BatchNorm, and resamples them to the stage's grid (trilinear upsampling for
  the finer stages, 2x2x2 max pooling for the coarsest).

With width 64 and two layers it has 147 k parameters, DCFormer's default
encoder 152 k; the read-outs upsample from an 8-voxel grid, so the finest
stages hold no detail the tokens did not keep. That is the ViT's known
weakness at small sizes, and exactly what the comparison measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def sincos_position_codes(grid: Sequence[int], width: int) -> torch.Tensor:
    """Fixed 3D sine-cosine position codes, ``(1, prod(grid), width)``.

    Each axis gets ``2 * (width // 6)`` channels (sines and cosines of
    geometric frequencies); the remainder, if any, is zero.
    """
    per_axis = width // 6
    codes = []
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
    freq = 1.0 / (100.0 ** (torch.arange(per_axis, dtype=torch.float32) / max(per_axis, 1)))
    for pos in axes:
        angle = pos.reshape(-1, 1) * freq
        codes += [torch.sin(angle), torch.cos(angle)]
    out = torch.cat(codes, dim=1)
    if out.shape[1] < width:
        out = F.pad(out, (0, width - out.shape[1]))
    return out.unsqueeze(0)


class ViT3DEncoder(nn.Module):
    """3D ViT with four multi-scale read-outs.

    Args:
        in_channels: input channels.
        channels: channels of the four output stages (DCFormer's ``channels``).
        model_shape: ``(D, H, W)`` of the input; each must divide by
            ``max(patch, 16)``.
        width: token width.
        depth: transformer layers.
        heads: attention heads.
        patch: patch edge in voxels (8: the tokens sit at stride 8).

    Input ``(B, C_in, D, H, W)``; output a list with one ``(B, channels[i],
    D/2^(i+1), H/2^(i+1), W/2^(i+1))`` tensor per stage, as DCFormer's.
    """

    def __init__(self, in_channels: int = 2, channels: Sequence[int] = (16, 32, 64, 96),
                 model_shape: Sequence[int] = (48, 96, 96), width: int = 64, depth: int = 2,
                 heads: int = 4, patch: int = 8) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError("the ViT read-outs give four stages")
        if any(n % max(patch, 16) for n in model_shape):
            raise ValueError(f"model_shape {tuple(model_shape)} must divide by {max(patch, 16)}")
        self.channels = tuple(channels)
        self.patch = patch
        self.grid = tuple(int(n) // patch for n in model_shape)
        self.embed = nn.Conv3d(in_channels, width, kernel_size=patch, stride=patch)
        self.register_buffer("pos", sincos_position_codes(self.grid, width), persistent=False)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        #: after which layer (1-based) each stage reads the tokens
        self.read_after = tuple(max(1, math.ceil((i + 1) * depth / 4)) for i in range(4))
        self.reads = nn.ModuleList([
            nn.Sequential(nn.Conv3d(width, ch, 1), nn.BatchNorm3d(ch), nn.GELU())
            for ch in channels])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.embed(x)  # (B, width, d, h, w)
        b, c, d, h, w = tokens.shape
        if (d, h, w) != self.grid:
            raise ValueError(f"input grid {(d, h, w)} differs from the configured {self.grid}")
        seq = tokens.flatten(2).transpose(1, 2) + self.pos  # (B, N, width)
        after: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers, start=1):
            seq = layer(seq)
            after[i] = seq
        feats: list[torch.Tensor] = []
        for stage, (read, layer_no) in enumerate(zip(self.reads, self.read_after, strict=True)):
            s = after[layer_no]
            if layer_no == len(self.layers):
                s = self.norm(s)
            grid = s.transpose(1, 2).reshape(b, c, d, h, w)
            out = read(grid)
            stride = 2 ** (stage + 1)  # the stage's stride in input voxels
            if stride < self.patch:
                out = F.interpolate(out, scale_factor=self.patch // stride, mode="trilinear",
                                    align_corners=False)
            elif stride > self.patch:
                out = F.max_pool3d(out, stride // self.patch)
            feats.append(out)
        return feats
