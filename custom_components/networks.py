"""The bundles' U-Net: MONAI's residual UNet with the ``norm`` choices of ``custom_components.norms``, and the same
network without its skip connections for the ablation of the note's eighth question."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.networks.nets import UNet
from torch import nn

from custom_components.norms import resolve_norm, standardize_convs


class UNetWithoutSkips(UNet):
    """MONAI's ``UNet`` with the encoder-to-decoder connections removed: the same depth, channels, norm and blocks,
    each decoder level reading only the level below it instead of that output concatenated with the encoder's.

    MONAI builds each level as its encoder block, then its decoder block with the encoder's and the lower level's
    channels as input; this class remembers the width of the encoder block just built and takes it off the decoder.
    """

    def _get_down_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        self._encoder_channels = out_channels
        return super()._get_down_layer(in_channels, out_channels, strides, is_top)

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        return super()._get_up_layer(in_channels - self._encoder_channels, out_channels, strides, is_top)

    def _get_connection_block(self, down_path: nn.Module, up_path: nn.Module, subblock: nn.Module) -> nn.Module:
        return nn.Sequential(down_path, subblock, up_path)


def unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int],
    strides: Sequence[int],
    num_res_units: int = 0,
    norm: str | Sequence[Any] = "instance",
    dropout: float = 0.0,
    skip_connections: bool = True,
    **unet_args: Any,
) -> UNet:
    """MONAI's ``UNet`` as the bundles build it: ``norm`` is a bundle choice (``batch``, ``instance``, ``group``,
    ``group_auto``, ``group_ws``, see ``custom_components.norms.NORM_CHOICES``) or any MONAI norm, and
    ``skip_connections=False`` builds ``UNetWithoutSkips``; other ``UNet`` arguments pass through."""
    spec, weight_standardized = resolve_norm(norm)
    network = (UNet if skip_connections else UNetWithoutSkips)(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=strides,
        num_res_units=num_res_units,
        norm=spec,
        dropout=dropout,
        **unet_args,
    )
    return standardize_convs(network) if weight_standardized else network
