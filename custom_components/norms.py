"""Normalisation for the small batches of 3D training: GroupNorm valid in every layer, Weight-Standardised
convolutions, a BatchNorm converter for any network, and the bundles' ``norm`` choices.

Batch Normalization estimates its statistics from the batch, which 3D memory limits to one or two patches. Group
Normalization (Wu & He 2018, "Group Normalization") normalises each sample over groups of channels instead, and
Weight Standardization (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization") standardises every convolution filter so that GroupNorm matches large-batch BatchNorm.
``torch.nn.GroupNorm`` and MONAI's ``group`` norm need a number of groups that divides the channels of every layer,
which fails on a U-Net whose last layers have ``num_classes`` channels; ``group_auto`` below picks a valid one per
layer. Importing this module registers ``group_auto`` in MONAI's ``Norm`` factory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Norm
from monai.networks.layers.utils import get_norm_layer
from torch import nn

DEFAULT_NUM_GROUPS = 8  # MONAI's customary choice (SegResNet); Wu & He's 32 would leave 1 channel a group here
DEFAULT_CHANNELS_PER_GROUP = 16  # Wu & He 2018, Table 3 compare fixed channels per group; 16 is one of theirs

NormSpec = str | tuple[str, dict[str, Any]]


def valid_num_groups(num_channels: int, num_groups: int) -> int:
    """The largest divisor of ``num_channels`` not above ``num_groups``: the closest valid GroupNorm grouping."""
    if num_channels < 1 or num_groups < 1:
        raise ValueError(f"channels and groups must be positive, got {num_channels} channels and {num_groups} groups")
    return next(g for g in range(min(num_groups, num_channels), 0, -1) if num_channels % g == 0)


class AdaptiveGroupNorm(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) that picks a valid number of groups for its channel count, so one setting fits every
    layer of a network: ``num_groups`` (default 8) lowered to the largest divisor of the channels, or, with
    ``channels_per_group``, ``num_channels // channels_per_group`` groups (at least one) lowered the same way.

    Registered in MONAI's ``Norm`` factory as ``group_auto``: ``norm=("group_auto", {"num_groups": 8})``. Its
    parameters and ``state_dict`` are those of ``torch.nn.GroupNorm``.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int | None = None,
        channels_per_group: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if num_groups is not None and channels_per_group is not None:
            raise ValueError("give num_groups or channels_per_group, not both")
        if channels_per_group is not None:
            if channels_per_group < 1:
                raise ValueError(f"channels_per_group must be positive, got {channels_per_group}")
            target = max(1, num_channels // channels_per_group)
        else:
            target = DEFAULT_NUM_GROUPS if num_groups is None else num_groups
        groups = valid_num_groups(num_channels, target)
        super().__init__(groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)


Norm.add_factory_class("group_auto", AdaptiveGroupNorm, AdaptiveGroupNorm.__doc__)


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each output channel's filter minus its mean, divided by its standard deviation (Qiao et al. 2019)."""
    flat = weight.flatten(1)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) * torch.rsqrt(var + eps)).view_as(weight)


class _WeightStandardized:
    """Forward of a convolution with standardised weights; mixed into ``nn.Conv2d`` and ``nn.Conv3d`` below."""

    def __init__(self, *args: Any, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, standardize_weight(self.weight, self.eps), self.bias)


class WSConv2d(_WeightStandardized, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (Qiao et al. 2019); the same parameters and ``state_dict``."""


class WSConv3d(_WeightStandardized, nn.Conv3d):
    """``nn.Conv3d`` with Weight Standardization (Qiao et al. 2019); the same parameters and ``state_dict``."""


WS_CONVS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
BATCH_NORM_DIMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)

# The bundles' `norm` choices: the MONAI norm each layer gets, and whether the convolutions are weight-standardised.
NORM_CHOICES: dict[str, tuple[NormSpec, bool]] = {
    "batch": ("batch", False),
    "instance": ("instance", False),
    "group": (("group_auto", {"channels_per_group": DEFAULT_CHANNELS_PER_GROUP}), False),
    "group_auto": (("group_auto", {"num_groups": DEFAULT_NUM_GROUPS}), False),
    "group_ws": (("group_auto", {"num_groups": DEFAULT_NUM_GROUPS}), True),
}


def resolve_norm(norm: str | Sequence[Any]) -> tuple[NormSpec, bool]:
    """The MONAI norm and the weight-standardisation flag for a bundle choice (``NORM_CHOICES``); any other MONAI
    norm (``"layer"``, ``["group", {"num_groups": 4}]``) passes through without weight standardisation."""
    if isinstance(norm, str):
        return NORM_CHOICES.get(norm.lower(), (norm, False))
    name, args = norm
    return (name, dict(args)), False


def _on_device_of(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` moved to the device and dtype of ``old``'s first parameter or buffer."""
    reference = next(iter([*old.parameters(), *old.buffers()]), None)
    return new if reference is None else new.to(device=reference.device, dtype=reference.dtype)


def _starts_with_norm(module: nn.Module) -> bool:
    """Whether the first operation of ``module`` (descending into ``nn.Sequential``, e.g. MONAI's ADN) normalises."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    return isinstance(module, NORM_LAYERS)


def standardize_convs(network: nn.Module, eps: float = 1e-5) -> nn.Module:
    """Swap, in place, every ``Conv2d``/``Conv3d`` that feeds a normalisation layer for its Weight-Standardised twin,
    weights kept (Qiao et al. 2019 pair WS with GroupNorm).

    A convolution feeds a normalisation when the module registered right after it in the same parent starts with
    one: MONAI's ``Convolution`` (conv, then ADN) and conv-norm pairs. Convolutions followed by no norm (the logits,
    residual projections) stay plain, since standardised weights scale their output by the square root of the fan-in.
    """
    for parent in list(network.modules()):
        children = list(parent.named_children())
        for (name, conv), (_, following) in zip(children, children[1:], strict=False):
            ws_type = WS_CONVS.get(type(conv))
            if ws_type is None or not _starts_with_norm(following):
                continue
            # built on the meta device and filled from `conv`: no random draws, so a seeded run's data order holds
            standardized = ws_type(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
                device="meta",
                dtype=conv.weight.dtype,
                eps=eps,
            ).to_empty(device=conv.weight.device)
            standardized.load_state_dict(conv.state_dict())
            setattr(parent, name, standardized)
    return network


def convert_norms(network: nn.Module, norm: str | Sequence[Any] = "group_auto") -> nn.Module:
    """Replace, in place, every BatchNorm of a built ``network`` by ``norm`` (a bundle choice such as ``group_ws``,
    or a MONAI norm), with weight-standardised convolutions when the choice asks for them; the other modules and
    their weights are kept, so any MONAI network can be switched by config, e.g. a ResNet-backbone
    ``$custom_components.norms.convert_norms(monai.networks.nets.FlexibleUNet(...), 'group_ws')``.
    The new norm layers start from their default initialisation."""
    spec, weight_standardized = resolve_norm(norm)
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            dims = BATCH_NORM_DIMS.get(type(child))
            if dims is not None:
                replacement = get_norm_layer(spec, spatial_dims=dims, channels=child.num_features)
                setattr(parent, name, _on_device_of(replacement, child))
    return standardize_convs(network) if weight_standardized else network
