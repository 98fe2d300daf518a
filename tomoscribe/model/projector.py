"""Projectors from image features to language-model tokens.

:class:`MixerProjector` follows Med3DVLM's dual-stream design: a low-level
stream (an earlier encoder stage, more tokens) and a high-level stream (the
last stage), each pooled to a token grid, mixed by MLP-Mixer layers (token
mixing then channel mixing), reduced to a fixed number of tokens and projected
to the language model's width; the two streams are concatenated.

:class:`RegionTokens` adds one token per anatomical class: the decoder
features pooled under the segmentation's soft mask of that class, with the
class's volume and the lesion mass in its neighbourhood. These tokens tell
the language model *where* things are, in the same way a radiologist reads
organ by organ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MixerLayer(nn.Module):
    """One MLP-Mixer layer on ``(B, N, C)`` tokens."""

    def __init__(self, tokens: int, channels: int, expansion: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, tokens * expansion), nn.GELU(), nn.Linear(tokens * expansion, tokens)
        )
        self.norm2 = nn.LayerNorm(channels)
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, channels * expansion),
            nn.GELU(),
            nn.Linear(channels * expansion, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class _Stream(nn.Module):
    def __init__(self, grid: tuple[int, int, int], channels: int, out_tokens: int, width: int):
        super().__init__()
        self.grid = grid
        n = grid[0] * grid[1] * grid[2]
        self.mix = nn.Sequential(MixerLayer(n, channels), MixerLayer(n, channels))
        self.reduce = nn.Linear(n, out_tokens)
        self.proj = nn.Sequential(nn.Linear(channels, width), nn.GELU(), nn.Linear(width, width))

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        """``(B, C, d, h, w)`` features to ``(B, N, C)`` grid tokens (no parameters)."""
        return F.adaptive_avg_pool3d(feat, self.grid).flatten(2).transpose(1, 2)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.from_pooled(self.pool(feat))

    def from_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` grid tokens to ``(B, T, width)``."""
        x = self.mix(x)
        x = self.reduce(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return self.proj(x)


class MixerProjector(nn.Module):
    """Dual-stream MLP-Mixer projector.

    Input: low ``(B, C_low, ...)`` and high ``(B, C_high, ...)`` stage
    features. Output: ``(B, T_low + T_high, width)`` tokens.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        width: int,
        low_grid: tuple[int, int, int] = (4, 6, 6),
        high_grid: tuple[int, int, int] = (2, 3, 3),
        low_tokens: int = 16,
        high_tokens: int = 8,
    ) -> None:
        super().__init__()
        self.low = _Stream(low_grid, low_channels, low_tokens, width)
        self.high = _Stream(high_grid, high_channels, high_tokens, width)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.from_pooled(*self.pool(low, high))

    def pool(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameter-free first step: each stream's pooled grid tokens."""
        return self.low.pool(low), self.high.pool(high)

    def from_pooled(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Tokens from :meth:`pool`'s output: ``(B, T_low + T_high, width)``."""
        return torch.cat([self.low.from_pooled(low), self.high.from_pooled(high)], dim=1)


class RegionTokens(nn.Module):
    """One token per organ class from mask-pooled decoder features.

    Args:
        feat_channels: channels of the decoder features.
        organ_classes: class indices of the organs (one token each).
        lesion_class: class index of lesions.
        width: token width.

    Input: decoder features ``(B, C, d, h, w)`` and segmentation logits
    ``(B, K, D, H, W)`` (pooled to the features' grid). Output ``(B, len(organ_classes), width)``.
    """

    def __init__(
        self, feat_channels: int, organ_classes: list[int], lesion_class: int, width: int
    ) -> None:
        super().__init__()
        self.organ_classes = organ_classes
        self.lesion_class = lesion_class
        self.embed = nn.Parameter(torch.randn(len(organ_classes), width) * 0.02)
        self.proj = nn.Sequential(
            nn.Linear(2 * feat_channels + 3, width), nn.GELU(), nn.Linear(width, width)
        )

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.from_pooled(self.pool(feats, logits))

    def pool(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The parameter-free first step: ``(B, organs, 2 C + 3)`` pooled statistics."""
        # pool on the features' (half) resolution: 8x cheaper than full resolution
        grid = (int(feats.shape[2]), int(feats.shape[3]), int(feats.shape[4]))
        prob = F.adaptive_avg_pool3d(logits.detach().softmax(dim=1), grid)
        feats = feats.detach()
        lesion = prob[:, self.lesion_class : self.lesion_class + 1]  # (B,1,D,H,W)
        tokens = []
        for cls in self.organ_classes:
            p = prob[:, cls : cls + 1]
            near = F.max_pool3d(p, kernel_size=3, stride=1, padding=1)  # organ + rim
            les_near = lesion * near
            vol = p.sum(dim=(2, 3, 4))  # (B,1)
            les_mass = les_near.sum(dim=(2, 3, 4))
            les_peak = les_near.amax(dim=(2, 3, 4))
            f_organ = (feats * p).sum(dim=(2, 3, 4)) / (vol + 1e-3)
            f_les = (feats * les_near).sum(dim=(2, 3, 4)) / (les_mass + 1e-3)
            stats = torch.cat([torch.log1p(vol), torch.log1p(les_mass), les_peak], dim=1)
            tokens.append(torch.cat([f_organ, f_les, stats], dim=1))
        return torch.stack(tokens, dim=1)

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, organs, width)`` from :meth:`pool`'s output."""
        out: torch.Tensor = self.proj(pooled) + self.embed
        return out
