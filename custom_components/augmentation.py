"""The training augmentation's presets and its rule for anisotropic data (the ``augment`` section of train.yaml).

``augmentation: none | light | default | strong`` picks a column of :data:`PRESETS`: the probability of each random
transform, and the rotation and scaling range, each the default of its ``aug_`` key, so that a key set by hand still
wins over the preset. ``default`` is the augmentation the bundles had before the presets; ``strong`` adds nnU-Net's
Gaussian blur, multiplicative brightness and simulated low resolution with its probabilities and ranges
(``nnUNetTrainer.get_training_transforms``), and its wider rotation and scaling. Rotation, scaling and simulated low
resolution stay in the slice plane when the spacing is anisotropic, as nnU-Net decides it (:func:`anisotropic_axis`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import monai.transforms
import torch
from monai.config import KeysCollection
from monai.transforms import RandomizableTransform

AUGMENTATIONS = ("none", "light", "default", "strong")
# key: its value in each preset, in the order of AUGMENTATIONS (the bundle guides' table, tests/test_augmentation.py)
_COLUMNS: dict[str, tuple[float, float, float, float]] = {
    "aug_flip_prob": (0.0, 0.5, 0.5, 0.5),  # each spatial axis, nnU-Net's 0.5
    "aug_affine_prob": (0.0, 0.2, 0.2, 0.2),  # rotation and scaling together, nnU-Net's 0.2 for each
    "aug_rotation": (0.26, 0.26, 0.26, 0.52),  # radians: 15 degrees, nnU-Net's 30 in strong
    "aug_scale": (0.1, 0.1, 0.1, 0.3),  # fraction of the size: nnU-Net scales by 0.7..1.4 in strong
    "aug_intensity_prob": (0.0, 0.0, 0.3, 0.3),  # intensity scaled by 1 +- 0.1 and shifted by +-0.1
    "aug_contrast_prob": (0.0, 0.0, 0.2, 0.3),  # gamma 0.7..1.5, nnU-Net's 0.3 in strong
    "aug_noise_prob": (0.0, 0.0, 0.1, 0.1),  # Gaussian noise, nnU-Net's 0.1
    "aug_blur_prob": (0.0, 0.0, 0.0, 0.2),  # nnU-Net's
    "aug_brightness_prob": (0.0, 0.0, 0.0, 0.15),  # nnU-Net's
    "aug_low_resolution_prob": (0.0, 0.0, 0.0, 0.25),  # nnU-Net's
}
PRESETS: dict[str, dict[str, float]] = {
    name: {key: values[column] for key, values in _COLUMNS.items()} for column, name in enumerate(AUGMENTATIONS)
}
# coarsest / finest spacing above which nnU-Net augments in the slice plane only (nnunetv2.configuration's
# ANISO_THRESHOLD)
ANISOTROPY_THRESHOLD = 3.0


def anisotropic_axis(spacing: Sequence[float], spatial_dims: int) -> int | None:
    """The axis that rotation, scaling and simulated low resolution leave alone: in 3D, the coarsest axis of
    ``spacing`` when coarsest / finest > :data:`ANISOTROPY_THRESHOLD` (nnU-Net's rule), so that thick slices are
    transformed in their plane only and never interpolated into each other; otherwise None (every axis).

    2D patches are slices, transformed in their plane anyway: None. An axis at -1 (its native spacing, unknown before
    the data are read) takes no part in the decision.
    """
    known = [value for value in spacing if value > 0]
    if spatial_dims != 3 or len(known) < 2 or max(known) / min(known) <= ANISOTROPY_THRESHOLD:
        return None
    return list(spacing).index(max(known))


def rotate_range(rotation: float, axis: int | None, spatial_dims: int) -> list[float]:
    """``RandAffine``'s rotate_range (radians, entry ``i`` the rotation about axis ``i`` in 3D): about every axis, or
    about ``axis`` alone (in the plane of the other two); 2D: the one in-plane angle."""
    if spatial_dims == 2:
        return [rotation]
    return [rotation if axis is None or i == axis else 0.0 for i in range(spatial_dims)]


def scale_range(scale: float, axis: int | None, spatial_dims: int) -> list[float]:
    """``RandAffine``'s scale_range (fraction of the size along each axis): every axis but ``axis``."""
    return [0.0 if i == axis else scale for i in range(spatial_dims)]


def drawn(transforms: Sequence[RandomizableTransform]) -> list[RandomizableTransform]:
    """The transforms that can happen (probability above 0): a preset's list as its table states it, and ``none``
    an empty one."""
    return [transform for transform in transforms if transform.prob > 0]


class _LowResolution(monai.transforms.RandSimulateLowResolution):
    """MONAI's array transform with ``keep_axis`` (a spatial axis, or None) at full resolution: the slices across it
    go through it as channels, each zoomed in its plane by the same factor."""

    def __init__(self, keep_axis: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_axis = keep_axis

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if self.keep_axis is None:
            return super().__call__(img, randomize)
        slices = img.movedim(self.keep_axis + 1, 1)  # (C, slices, a, b)
        planes = super().__call__(slices.reshape(-1, *slices.shape[2:]), randomize)
        return planes.reshape(slices.shape).movedim(1, self.keep_axis + 1)


class RandSimulateLowResolutiond(monai.transforms.RandSimulateLowResolutiond):
    """MONAI's ``RandSimulateLowResolutiond`` (nnU-Net's SimulateLowResolutionTransform: the image down-sampled by a
    zoom drawn from ``zoom_range``, nearest neighbour, then back to its size, linear) in 2D and 3D, with
    ``keep_axis`` (the slice axis of anisotropic data, :func:`anisotropic_axis`) kept at full resolution, as
    nnU-Net's ``ignore_axes`` keeps it."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float,
        spatial_dims: int,
        keep_axis: int | None = None,
        zoom_range: Sequence[float] = (0.5, 1.0),
    ) -> None:
        mode = "trilinear" if spatial_dims == 3 and keep_axis is None else "bilinear"  # each image's plane or volume
        super().__init__(keys, prob=prob, upsample_mode=mode, zoom_range=zoom_range)
        self.sim_lowres_tfm = _LowResolution(keep_axis, prob=1.0, upsample_mode=mode, zoom_range=zoom_range)
