"""The bundles' networks, chosen by the ``architecture`` key: MONAI's residual UNet with the ``norm`` choices of
``custom_components.norms`` (and the same network without its skip connections, for the skip-connection
ablation), or MONAI's DynUNet, nnU-Net's topology with kernel sizes and strides per axis and deep supervision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.losses import DeepSupervisionLoss
from monai.networks.nets import DynUNet, UNet
from monai.networks.nets.dynunet import DynUNetSkipLayer
from torch import nn
from torch.nn.modules.loss import _Loss

from custom_components.initialisation import initialise
from custom_components.norms import resolve_norm, standardize_convs


def unwrap(obj: Any) -> Any:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper, so saved weights load anywhere."""
    return obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel) else obj


def total_downsampling(strides: Sequence[Any], dims: int) -> list[int] | None:
    """The network's total downsampling along each of ``dims`` axes, the product of its strides (an int, or one per
    axis): every input size must be a multiple of it. None when a stride has another number of axes."""
    total = [1] * dims
    for stride in strides:
        per_axis = list(stride) if isinstance(stride, list | tuple) else [stride] * dims
        if len(per_axis) != dims:
            return None
        total = [int(t * s) for t, s in zip(total, per_axis, strict=True)]
    return total


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


def dynunet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int],
    strides: Sequence[int | Sequence[int]],
    kernel_sizes: Sequence[int | Sequence[int]] | None = None,
    num_res_units: int = 0,
    norm: str | Sequence[Any] = "instance",
    dropout: float = 0.0,
    deep_supervision: bool = False,
) -> DynUNet:
    """MONAI's ``DynUNet`` (nnU-Net's topology) from the bundle's keys: ``channels`` are its filters, ``strides``
    its downsampling after the first (stride-1) level, ``kernel_sizes`` one per level (null: 3 everywhere),
    ``num_res_units > 0`` residual blocks, ``norm`` a bundle choice or MONAI norm; ``deep_supervision`` adds a head
    at every decoder level but the lowest (nnU-Net's), stacked as (B, heads, C, ...) in training mode only."""
    spec, weight_standardized = resolve_norm(norm)
    if weight_standardized:  # DynUNet registers its norms after both convolutions: standardize_convs finds none
        raise ValueError(f"norm {norm!r} (weight-standardised convolutions) is built for architecture unet only")
    levels = len(channels)
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=list(kernel_sizes) if kernel_sizes is not None else [3] * levels,
        strides=[1, *strides],
        upsample_kernel_size=list(strides),
        filters=list(channels),
        dropout=dropout,
        norm_name=spec,
        deep_supervision=deep_supervision,
        deep_supr_num=max(1, levels - 2),
        res_block=num_res_units > 0,
    )


ARCHITECTURES = ("unet", "dynunet")  # the `architecture` key's choices


def compile_forward(network: nn.Module) -> nn.Module:
    """``network`` with its ``forward`` compiled by ``torch.compile`` (on its first call) and fed plain tensors:
    TorchDynamo cannot trace MONAI's ``MetaTensor``, which a transform chain that keeps its metadata hands the
    network (the bundles' training chain ends with ``drop_metadata``), so it is unwrapped before the compiled code
    (outputs are plain tensors, as sliding-window inference makes them). The module and its state_dict keys stay
    as they are."""
    compiled = torch.compile(network.forward)

    def forward(*inputs: Any, **kwargs: Any) -> Any:
        return compiled(*(x.as_tensor() if isinstance(x, MetaTensor) else x for x in inputs), **kwargs)

    network.forward = forward
    return network


def on_device(network: nn.Module, device: str | torch.device, channels_last: bool, compiled: bool = False) -> nn.Module:
    """``network`` on ``device``, its convolution weights in channels-last layout when ``channels_last`` (oneDNN and
    cuDNN then pick other kernels), its forward compiled when ``compiled`` (``compile_forward``). Values,
    state_dict keys and shapes are unchanged: weights files load either way."""
    network = network.to(device)
    if channels_last:
        dims = max((p.dim() for p in network.parameters()), default=0)
        network = network.to(memory_format=torch.channels_last_3d if dims == 5 else torch.channels_last)
    return compile_forward(network) if compiled else network


def build_network(
    architecture: str,
    kernel_sizes: Sequence[int | Sequence[int]] | None = None,
    deep_supervision: bool = False,
    skip_connections: bool = True,
    init: str = "default",
    **network_args: Any,
) -> nn.Module:
    """The network ``architecture`` names (``ARCHITECTURES``), from the keys every network shares; the keys of one
    network only (``kernel_sizes``, ``deep_supervision`` for dynunet, ``skip_connections`` for unet) go to it
    (``custom_components.settings`` refuses them set for the other one). Its weights are drawn by ``init``
    (``custom_components.initialisation``; training's key, before any checkpoint or weights file is loaded)."""
    if architecture == "dynunet":
        network = dynunet(kernel_sizes=kernel_sizes, deep_supervision=deep_supervision, **network_args)
    elif architecture == "unet":
        network = unet(skip_connections=skip_connections, **network_args)
    else:
        raise ValueError(f"architecture {architecture!r} is not one of {list(ARCHITECTURES)}")
    return initialise(network, init)


def without_deep_supervision(network: nn.Module) -> nn.Module:
    """``network`` as inference runs it, in place: a DynUNet's deep supervision heads removed (its eval-mode output
    never uses them), so that TorchScript compiles it (MONAI's skip layers holding a head do not script)."""
    if isinstance(network, DynUNet) and network.deep_supervision:
        network.deep_supervision = False
        for layer in network.modules():
            if isinstance(layer, DynUNetSkipLayer):
                layer.super_head, layer.heads = None, None
        del network.deep_supervision_heads
    return network


class StackedDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's ``DeepSupervisionLoss`` (weights 1, 1/2, 1/4, ...) on DynUNet's training output: the stacked
    (B, heads, C, ...) tensor is unbound into its heads, full resolution first; an output with the target's
    dimensions (eval mode) is scored as it is."""

    def forward(self, input: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if isinstance(input, torch.Tensor) and input.dim() == target.dim() + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)


def training_loss(loss: _Loss, deep_supervision: bool) -> _Loss:
    """The training loss: ``loss`` itself, or wrapped in ``StackedDeepSupervisionLoss`` for a deeply supervised
    network."""
    return StackedDeepSupervisionLoss(loss) if deep_supervision else loss
