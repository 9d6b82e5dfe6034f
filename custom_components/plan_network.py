"""A network's shape from the data: how often each axis is pooled (nnU-Net's rule), DynUNet's strides and kernels,
and the U-Net a plan trains on CPU."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from custom_components.networks import total_downsampling

MIN_FEATURE_MAP = 4  # nnU-Net: an axis is pooled while at least twice this many voxels are left along it
MAX_POOLS = 5  # at most this many poolings along an axis, six levels (nnU-Net caps them by MIN_FEATURE_MAP alone)
COARSE_RATIO = 2.0  # nnU-Net: an axis this much coarser than the finest is neither pooled nor convolved across
# On CPU, unless the user names a network: up to four levels of 16-128 feature maps (1.2 M parameters), each axis
# pooled by nnU-Net's rule. A CPU step costs time, not memory, and this network takes a third of the time of the
# bundle's 32-320 at the same patch, so a step within the compute budget keeps a larger patch and a run trains more
# steps (benchmarks/RESULTS.md, 2026-12-05)
CPU_CHANNELS = [16, 32, 64, 128]
CPU_NETWORK_KEYS = ("channels", "strides")


class PlanError(ValueError):
    """No plan can be made as asked; the message says why and what to change."""


def divisibility(strides: Sequence[int | Sequence[int]], dims: int) -> np.ndarray:
    """Per axis, the factor every patch size must be a multiple of (:func:`networks.total_downsampling`)."""
    return np.asarray(total_downsampling(strides, dims), dtype=int)


def pool_and_conv_props(
    spacing: Sequence[float], size: Sequence[float], min_feature_map: int = MIN_FEATURE_MAP, max_pools: int = MAX_POOLS
) -> tuple[list[list[int]], list[list[int]]]:
    """DynUNet's ``strides`` (after its first, stride-1, level) and ``kernel_sizes`` (one per level) for a patch of
    ``size`` voxels of ``spacing`` mm: nnU-Net's rule (nnunetv2 ``get_pool_and_conv_props``).

    Each level halves the axes whose spacing is under twice the finest one and that keep at least twice
    ``min_feature_map`` voxels (an axis alone only with three times that), at most ``max_pools`` times each; its
    kernel is 3 along the axes within twice the finest spacing and 1 along the axes still coarser (once 3, always
    3); the bottleneck's kernel is 3. So a thick-slice axis is convolved and pooled only once the in-plane
    resolution has come down to its spacing.
    """
    dims = len(spacing)
    current_spacing, current_size = [float(s) for s in spacing], [float(n) for n in size]
    pools, kernel = [0] * dims, [1] * dims
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        fits = [axis for axis in range(dims) if current_size[axis] >= 2 * min_feature_map]
        if not fits:
            break
        finest = min(current_spacing[axis] for axis in fits)
        axes = [a for a in fits if current_spacing[a] / finest < COARSE_RATIO and pools[a] < max_pools]
        if not axes or (len(axes) == 1 and current_size[axes[0]] < 3 * min_feature_map):
            break
        finest_overall = min(current_spacing)
        kernel = [
            3 if k == 3 or sp / finest_overall < COARSE_RATIO else 1
            for k, sp in zip(kernel, current_spacing, strict=True)
        ]
        kernels.append(kernel)
        strides.append([2 if axis in axes else 1 for axis in range(dims)])
        for axis in axes:
            pools[axis] += 1
            current_spacing[axis] *= 2
            current_size[axis] = math.ceil(current_size[axis] / 2)
    return strides, [*kernels, [3] * dims]


def dynunet_plan(spacing: Sequence[float], size: Sequence[float], channels: Sequence[int]) -> dict[str, Any]:
    """The keys of a DynUNet for patches up to ``size`` voxels of ``spacing`` mm: ``strides`` and ``kernel_sizes``
    by nnU-Net's rule (an axis stride or kernel the same on every axis written as one int), ``channels`` doubling
    per level from the first of ``channels`` up to its last (the bundle's 32 ... 320: nnU-Net's)."""
    strides, kernels = pool_and_conv_props(spacing, size)
    if len(strides) < 2:
        raise PlanError(
            f"a patch of {[round(float(n), 1) for n in size]} voxels leaves room for {len(strides)} poolings, "
            "DynUNet needs 2 (three levels): plan for architecture unet, or a finer spacing"
        )

    first, last = int(channels[0]), int(max(channels))
    return {
        "channels": [min(first * 2**level, last) for level in range(len(kernels))],
        "strides": [_compact(stride) for stride in strides],
        "kernel_sizes": [_compact(kernel) for kernel in kernels],
    }


def _compact(values: Sequence[int]) -> int | list[int]:
    """A stride or kernel the same along every axis as one int."""
    return values[0] if len(set(values)) == 1 else list(values)


def cpu_unet(spacing: Sequence[float], size: Sequence[float]) -> dict[str, Any]:
    """The ``unet`` a plan trains on CPU for patches up to ``size`` voxels of ``spacing`` mm: ``CPU_CHANNELS``, each
    level pooling the axes nnU-Net's rule pools (a thick-slice axis only once the others have come down to its
    spacing), so that few slices are never padded to a multiple of 8."""
    strides, _ = pool_and_conv_props(spacing, size)
    levels = strides[: len(CPU_CHANNELS) - 1]
    if not levels:
        raise PlanError(
            f"a patch of {[round(float(n), 1) for n in size]} voxels leaves no room for a pooling: set channels and "
            "strides yourself, or a finer spacing"
        )
    return {"channels": CPU_CHANNELS[: len(levels) + 1], "strides": [_compact(stride) for stride in levels]}
