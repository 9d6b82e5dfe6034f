"""Transforms the bundles select by config key: intensity normalisation, 2D/2.5D slices from volumes, and the
class index of predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import monai.transforms
import torch
from monai.config import NdarrayOrTensor
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged

INTENSITY_SCHEMES = ("ct_window", "ct_zscore", "zscore")


def intensity_transform(
    keys: str | Sequence[str],
    scheme: str = "ct_window",
    window: Sequence[float] | None = (-160.0, 240.0),
    mean: float | None = None,
    std: float | None = None,
) -> MapTransform:
    """The intensity normalisation of the ``intensity`` config key.

    - ``ct_window``: clip Hounsfield units to ``window`` and scale linearly to 0..1 (the usual CT window).
    - ``ct_zscore``: clip to ``window`` (nnU-Net uses the 0.5/99.5 foreground percentiles), then subtract the
      dataset foreground ``mean`` and divide by ``std``: one global scaling, so HU keep their meaning.
    - ``zscore``: per-image z-score over the non-zero voxels, channel by channel (MR and other modalities,
      whose intensities have no absolute scale).
    """
    if scheme == "ct_window":
        if window is None or len(window) != 2:
            raise ValueError("intensity scheme 'ct_window' needs window: [low_HU, high_HU]")
        return ScaleIntensityRanged(keys, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)
    if scheme == "ct_zscore":
        if window is None or len(window) != 2 or mean is None or not std:
            raise ValueError("intensity scheme 'ct_zscore' needs window, mean and std (see `prepare plan`)")
        # clipping to the window, then (x - mean) / std, is one linear map of the window with clipping: a single
        # transform, so that a CacheDataset caches past it (a nested Compose counts as random and ends the cache)
        low, high = ((bound - mean) / std for bound in window)
        return ScaleIntensityRanged(keys, a_min=window[0], a_max=window[1], b_min=low, b_max=high, clip=True)
    if scheme == "zscore":
        return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)
    raise ValueError(f"unknown intensity scheme {scheme!r}: choose one of {INTENSITY_SCHEMES}")


def slab_size(patch_size: Sequence[int], slice_axis: int) -> list[int]:
    """The 3D crop that yields a 2D ``patch_size`` patch: one voxel thick across ``slice_axis``."""
    size = list(patch_size)
    size.insert(slice_axis, 1)
    return size


class SliceContextd(MapTransform):
    """2.5D input: stack ``context_slices`` neighbouring slices on each side of every slice as extra channels.

    A volume of shape (C, H, W, D) becomes (C * (2k + 1), H, W, D), channel order: slice -k .. +k for each input
    channel; edges repeat the border slice. Applied to the whole volume before patch sampling, so that a 2D patch
    cut from one slice, and slice-by-slice inference, both carry their neighbours.
    """

    def __init__(self, keys: str | Sequence[str], context_slices: int, slice_axis: int = 2) -> None:
        super().__init__(keys)
        if context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}")
        self.context_slices = context_slices
        self.slice_axis = slice_axis

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        if self.context_slices == 0:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            axis = self.slice_axis + 1  # spatial axis -> tensor axis after the channel axis
            depth = image.shape[axis]
            index = torch.arange(depth, device=image.device)
            shifted = [
                image.index_select(axis, (index + offset).clamp(0, depth - 1))
                for offset in range(-self.context_slices, self.context_slices + 1)
            ]
            d[key] = torch.stack(shifted, dim=1).flatten(0, 1)  # (C, 2k+1, ...) -> (C * (2k+1), ...)
        return d


class BackgroundOutsided(MapTransform):
    """Probabilities mapped back onto the input grid are all zero where preprocessing cropped the image (Invertd
    pads with zeros): there the background gets probability 1, so every voxel's probabilities sum to 1."""

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            probabilities = data[key]
            outside = probabilities.sum(dim=0) == 0
            probabilities[0][outside] = 1.0
        return data


def class_index(scores: torch.Tensor, dim: int = 0, keepdim: bool = True) -> torch.Tensor:
    """The argmax of ``scores`` along ``dim``, the first maximum on ties, a MetaTensor's metadata kept.

    On CPU it is taken as ``max(dim).indices``, the same indices: torch's CPU argmax over a leading dimension runs
    as a slow per-element loop (pytorch/pytorch#140000), 20x slower on three classes of a 96x96x12 volume here.
    """
    if scores.device.type == "cpu":
        return scores.max(dim=dim, keepdim=keepdim).indices
    return torch.argmax(scores, dim=dim, keepdim=keepdim)


class AsDiscrete(monai.transforms.AsDiscrete):
    """MONAI's ``AsDiscrete`` with its argmax taken by :func:`class_index`."""

    def __call__(
        self,
        img: NdarrayOrTensor,
        argmax: bool | None = None,
        to_onehot: int | None = None,
        threshold: float | None = None,
        rounding: str | None = None,
    ) -> NdarrayOrTensor:
        if isinstance(img, torch.Tensor) and (self.argmax if argmax is None else argmax):  # arrays: MONAI's own
            img, argmax = class_index(img, self.kwargs.get("dim", 0), self.kwargs.get("keepdim", True)), False
        return super().__call__(img, argmax, to_onehot, threshold, rounding)


class AsDiscreted(monai.transforms.AsDiscreted):
    """MONAI's ``AsDiscreted`` (same keys and options) with its argmax taken by :func:`class_index`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        converter = AsDiscrete()
        converter.kwargs = self.converter.kwargs
        self.converter = converter
