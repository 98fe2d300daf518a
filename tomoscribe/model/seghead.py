"""Segmentation head: a U-Net style decoder over the encoder's stages.

Takes the encoder's stage features (coarsest last), upsamples step by step
with skip connections, and returns per-class logits at the input resolution
together with the last decoder features (used for region tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _Up(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv3d(in_ch + skip_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_ch),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        out: torch.Tensor = self.block(torch.cat([x, skip], dim=1))
        return out


class SegHead(nn.Module):
    """U-Net decoder.

    Args:
        channels: encoder stage channels (finest first).
        num_classes: output classes, background included.
        in_channels: channels of the raw input, used as the finest skip.
        head_channels: channels at full resolution (more than ``num_classes``:
            the classifier is linear in them).

    Input: stage features ``[(B, C_i, D_i, H_i, W_i)]`` and the input
    ``(B, C_in, D, H, W)``. Output: ``(logits (B, K, D, H, W), features (B,
    C_0, D/2, H/2, W/2))``: the decoder's last half-resolution features.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, in_channels: int = 2,
                 head_channels: int = 16) -> None:
        super().__init__()
        chans = list(channels)
        self.ups = nn.ModuleList()
        for i in range(len(chans) - 1, 0, -1):
            self.ups.append(_Up(chans[i], chans[i - 1], chans[i - 1]))
        full = head_channels
        # Full resolution is where a CPU spends its time (and 3D convolutions
        # with few input channels have slow weight gradients): project the
        # decoder features at half resolution, upsample, and mix them by 1x1x1
        # convolutions with the image and its fixed local contrast (image
        # minus its 3x3x3 mean) for the fine edges.
        self.to_full = nn.Conv3d(chans[0], full, 1)
        self.mix = nn.Sequential(
            nn.Conv3d(full + 2 * in_channels, full, 1),
            nn.BatchNorm3d(full),
            nn.GELU(),
        )
        self.out = nn.Conv3d(full, num_classes, 1)

    def forward(
        self, feats: Sequence[torch.Tensor], image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = up(x, skip)
        half = x
        full = F.interpolate(self.to_full(x), size=image.shape[2:], mode="trilinear",
                             align_corners=False)
        contrast = image - F.avg_pool3d(image, 3, stride=1, padding=1, count_include_pad=False)
        x = self.mix(torch.cat([full, image, contrast], dim=1))
        return self.out(x), half
