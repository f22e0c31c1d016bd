"""The two U-Nets of the paper, built on MONAI's ``DynUNet``.

The paper uses "the original U-Net with slight modifications" for segmentation, and the
same network with a sigmoid after the last layer for reconstruction. Here both are MONAI
``DynUNet`` s in 2-D: two 3x3 convolutions per level, strided-convolution down-sampling,
transposed-convolution up-sampling with skip connections (the original design), with batch
normalisation and leaky ReLU (the slight modifications). Width and depth are configurable
so that tests and CPU runs can use narrow, shallow networks; the defaults are the
original U-Net's 64 features and 4 down-samplings (64 -> 1024 features).

``upsample="interpolation"`` replaces each transposed convolution by a 1x1 convolution and
bilinear up-sampling (MONAI's non-trainable ``UpSample``). A stride-2 transposed
convolution with a 2x2 kernel gives the four pixels of each 2x2 block their own weights,
a known source of periodic "checkerboard" patterns; interpolation cannot produce them.

Shapes: inputs ``(B, 1, H, W)`` normalised attenuation, H and W divisible by ``2**depth``.
The segmentation network returns ``(B, 3, H, W)`` logits (background, liver, tumour);
the reconstruction network ``(B, 1, H, W)`` in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.blocks import UpSample
from monai.networks.nets import DynUNet
from torch import nn

NUM_CLASSES = 3
"""Background, liver, tumour."""
NORMS = ("batch", "instance")
UPSAMPLING = ("transposed", "interpolation")


@dataclass(frozen=True)
class UNetConfig:
    """Width and depth of a U-Net.

    Args:
        features: feature maps at the first level; each level doubles them, capped at 16x.
        depth: number of down-samplings (the original U-Net has 4).
        norm: ``batch`` or ``instance`` normalisation.
        dropout: dropout probability inside the convolution blocks.
        upsample: ``transposed`` (transposed convolutions, the original U-Net) or
            ``interpolation`` (1x1 convolution, then bilinear up-sampling).
    """

    features: int = 64
    depth: int = 4
    norm: str = "batch"
    dropout: float = 0.0
    upsample: str = "transposed"

    def __post_init__(self) -> None:
        if self.features < 1:
            raise ValueError(f"features must be positive, got {self.features}")
        if not 1 <= self.depth <= 7:
            raise ValueError(f"depth must be between 1 and 7, got {self.depth}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {self.upsample!r}")

    @property
    def filters(self) -> list[int]:
        return [self.features * min(2**level, 16) for level in range(self.depth + 1)]


def _dyn_unet(out_channels: int, config: UNetConfig) -> DynUNet:
    network = DynUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=out_channels,
        kernel_size=[3] * (config.depth + 1),
        strides=[1] + [2] * config.depth,
        upsample_kernel_size=[2] * config.depth,
        filters=config.filters,
        dropout=config.dropout or None,
        norm_name=config.norm,
    )
    if config.upsample == "interpolation":
        for block in network.upsamples:  # each UnetUpBlock: up-sample, concatenate the skip, convolve
            up = block.transp_conv
            block.transp_conv = UpSample(2, up.in_channels, up.out_channels, scale_factor=2, mode="nontrainable",
                                         interp_mode="bilinear", align_corners=False)
    return network


def build_segmentation_net(config: UNetConfig = UNetConfig()) -> nn.Module:
    """The segmentation U-Net g: ``(B, 1, H, W)`` image -> ``(B, 3, H, W)`` class logits."""
    return _dyn_unet(NUM_CLASSES, config)


class ReconstructionNet(nn.Module):
    """The reconstruction U-Net f: the segmentation architecture with one output and a sigmoid.

    Maps a low-dose scan ``(B, 1, H, W)`` to a reconstruction ``(B, 1, H, W)`` in (0, 1),
    the range of the normalised full dose.
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.unet = _dyn_unet(1, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(x))


def build_reconstruction_net(config: UNetConfig = UNetConfig()) -> ReconstructionNet:
    """The reconstruction U-Net f (see :class:`ReconstructionNet`)."""
    return ReconstructionNet(config)
