"""DCFormer-style 3D encoder (after Med3DVLM): decomposed 3D convolutions.

Every 3D convolution of kernel ``k`` is replaced by the sum of three 1D
convolutions along depth, height and width (``k x 1 x 1``, ``1 x k x 1``,
``1 x 1 x k``), each followed by its own BatchNorm. This costs ``3k`` weights
per channel pair instead of ``k^3``, keeps a large receptive field, and is
what makes a 3D encoder affordable on a CPU.

The encoder is a hierarchy of stages: a strided decomposed-convolution stem,
then stages that each start with a stride-2 downsampling and hold
``depths[i]`` blocks (depthwise decomposed convolution, then a channel MLP,
with layer scale). It returns every stage's features so that a segmentation
decoder can use the early ones and the projector the last two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class DecomposedConv3d(nn.Module):
    """Sum of three 1D convolutions along D, H and W, each with its own norm.

    ``norm`` builds the normalisation of each branch from its channel count
    (BatchNorm by default).

    Shapes: ``(B, C_in, D, H, W) -> (B, C_out, D', H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        norm: Callable[[int], nn.Module] = nn.BatchNorm3d,
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.branches = nn.ModuleList()
        for axis in range(3):
            k = [1, 1, 1]
            k[axis] = kernel_size
            p = [0, 0, 0]
            p[axis] = pad
            self.branches.append(
                nn.Sequential(
                    nn.Conv3d(
                        in_channels,
                        out_channels,
                        kernel_size=tuple(k),  # type: ignore[arg-type]
                        stride=stride,
                        padding=tuple(p),  # type: ignore[arg-type]
                        groups=groups,
                        bias=False,
                    ),
                    norm(out_channels),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DCBlock(nn.Module):
    """Depthwise decomposed conv, then a pointwise MLP, residual with layer scale.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(self, channels: int, kernel_size: int, mlp_ratio: int = 2,
                 norm: Callable[[int], nn.Module] = nn.BatchNorm3d) -> None:
        super().__init__()
        self.conv = DecomposedConv3d(channels, channels, kernel_size, groups=channels, norm=norm)
        self.mlp = nn.Sequential(
            nn.Conv3d(channels, channels * mlp_ratio, 1),
            nn.GELU(),
            nn.Conv3d(channels * mlp_ratio, channels, 1),
        )
        self.gamma = nn.Parameter(torch.full((channels, 1, 1, 1), 1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.mlp(self.conv(x))


class DCFormerEncoder(nn.Module):
    """Hierarchical decomposed-convolution encoder.

    Args:
        in_channels: input channels (the default model uses 2 CT windows).
        channels: channels of each stage, e.g. ``(16, 32, 64, 128)``.
        depths: blocks per stage.
        kernels: decomposed kernel size per stage.

    Input ``(B, C_in, D, H, W)``; output a list with one ``(B, C_i, D/2^(i+1),
    H/2^(i+1), W/2^(i+1))`` tensor per stage.
    """

    def __init__(
        self,
        in_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (1, 1, 2, 1),
        kernels: Sequence[int] = (7, 7, 5, 3),
    ) -> None:
        super().__init__()
        if not (len(channels) == len(depths) == len(kernels)):
            raise ValueError("channels, depths and kernels must have the same length")
        self.channels = tuple(channels)
        # Patch-embedding stem (2x2x2, stride 2): a decomposed convolution
        # on the few raw input channels has slow weight gradients on a CPU;
        # the first stage's decomposed blocks give the large receptive field.
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, channels[0], kernel_size=2, stride=2),
            nn.BatchNorm3d(channels[0]),
            nn.GELU(),
        )
        self.downs = nn.ModuleList()
        self.stages = nn.ModuleList()
        for i, (ch, depth, k) in enumerate(zip(channels, depths, kernels, strict=True)):
            if i == 0:
                self.downs.append(nn.Identity())
            else:
                self.downs.append(
                    nn.Sequential(
                        nn.Conv3d(channels[i - 1], ch, kernel_size=2, stride=2),
                        nn.BatchNorm3d(ch),
                    )
                )
            self.stages.append(nn.Sequential(*[DCBlock(ch, k) for _ in range(depth)]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        h = self.stem(x)
        for down, stage in zip(self.downs, self.stages, strict=True):
            h = stage(down(h))
            feats.append(h)
        return feats
