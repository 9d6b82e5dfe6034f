"""`augmentation`: each preset trains with the transforms and probabilities its table in the bundle guide states, a
key set by hand wins over the preset, `none` leaves a patch as sampled; with anisotropic spacing rotation, scaling
and simulated low resolution keep every slice on its slice (nnU-Net's rule), with isotropic spacing they turn about
every axis; both bundles run every transform, 2.5D channels included; a preset that does not exist is refused
naming the key."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from custom_components import settings
from custom_components.augmentation import AUGMENTATIONS, PRESETS, anisotropic_axis
from custom_components.settings_declarations import declarations
from custom_components.step_measure import bundle_parser
from tests.conftest import REPO

# the transforms of `augment#transforms` in order after the flips, with the key of each one's probability
TRANSFORMS = [
    ("RandAffined", "aug_affine_prob"),
    ("RandScaleIntensityd", "aug_intensity_prob"),
    ("RandShiftIntensityd", "aug_intensity_prob"),
    ("RandAdjustContrastd", "aug_contrast_prob"),
    ("RandGaussianNoised", "aug_noise_prob"),
    ("RandGaussianSmoothd", "aug_blur_prob"),
    ("RandScaleIntensityd", "aug_brightness_prob"),
    ("RandSimulateLowResolutiond", "aug_low_resolution_prob"),
]
ANISOTROPIC, ISOTROPIC = [0.8, 0.8, 2.5], [1.0, 1.0, 1.0]  # coarsest / finest 3.1 (> 3) and 1
ROTATION_AND_LOW_RESOLUTION = {"augmentation": "none", "aug_affine_prob": 1.0, "aug_low_resolution_prob": 1.0}


def augment(bundle: str, **keys: Any) -> list:
    """The bundle's training augmentation (``augment#transforms``) with ``keys`` set, as train.yaml builds it."""
    config = REPO / "bundles" / bundle / "configs" / "train.yaml"
    return bundle_parser(config, keys).get_parsed_content("augment#transforms")


def documented() -> dict[str, dict[str, float]]:
    """The presets as the 3D bundle's guide tabulates them: preset -> aug_ key -> value."""
    text = (REPO / "bundles/unet3d/docs/README.md").read_text()
    section = text[text.index("## Augmentation presets") :].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line[:2] == "| "]
    names = rows[0][2:]
    return {name: {row[0].strip("`"): float(row[2 + i]) for row in rows[1:]} for i, name in enumerate(names)}


def sliced_volume(axis: int) -> dict[str, MetaTensor]:
    """A 3D patch of 10 slices across ``axis`` that tells them apart: image = 100 x slice index + a 0..1 ramp in the
    slice plane, label = slice index mod 3."""
    shape = [24, 24, 24]
    shape[axis] = 10
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    image = 100 * grid[axis] + grid[(axis + 1) % 3] / 23
    return {"image": MetaTensor(image[None]), "label": MetaTensor(grid[axis][None] % 3)}


def on_own_slice(image: torch.Tensor, axis: int) -> bool:
    """Whether every slice of a sliced_volume image holds its own values alone (100 x index + 0..1)."""
    slices = image[0].movedim(axis, 0)
    offsets = 100 * torch.arange(slices.shape[0]).reshape(-1, 1, 1)
    return bool(((slices - offsets >= -1e-2) & (slices - offsets <= 1 + 1e-2)).all())


def test_the_presets_are_the_documented_table_and_the_keys_choices() -> None:
    assert documented() == PRESETS
    assert list(PRESETS) == list(AUGMENTATIONS)
    assert tuple(declarations("unet3d")["augmentation"].check["choices"]) == AUGMENTATIONS


@pytest.mark.parametrize("bundle,dims", [("unet3d", 3), ("unet2d", 2)])
@pytest.mark.parametrize("preset", AUGMENTATIONS)
def test_each_preset_trains_with_its_transforms_and_probabilities(bundle: str, dims: int, preset: str) -> None:
    values = PRESETS[preset]
    expected = [("RandFlipd", values["aug_flip_prob"])] * dims + [(name, values[key]) for name, key in TRANSFORMS]
    transforms = augment(bundle, augmentation=preset)
    assert [(type(t).__name__, t.prob) for t in transforms] == [(n, p) for n, p in expected if p > 0]
    affine = next((t for t in transforms if type(t).__name__ == "RandAffined"), None)
    if affine is not None:  # the default 3D spacing, 1.5 x 1.5 x 2 mm, is isotropic enough: every axis
        grid = affine.rand_affine.rand_affine_grid
        assert grid.rotate_range == (values["aug_rotation"],) * (1 if dims == 2 else 3)
        assert grid.scale_range == (values["aug_scale"],) * dims


def test_a_key_set_by_hand_wins_over_the_preset() -> None:
    transforms = augment("unet3d", augmentation="light", aug_noise_prob=0.5, aug_flip_prob=0.0)
    assert [(type(t).__name__, t.prob) for t in transforms] == [("RandAffined", 0.2), ("RandGaussianNoised", 0.5)]


@pytest.mark.parametrize("bundle,shape", [("unet3d", (1, 24, 24, 10)), ("unet2d", (3, 32, 32))])
def test_none_leaves_the_patch_as_sampled(bundle: str, shape: tuple[int, ...]) -> None:
    transforms = augment(bundle, augmentation="none")
    assert transforms == []
    patch = {"image": torch.rand(shape), "label": torch.randint(0, 3, shape).float()}
    out = Compose(transforms)(dict(patch))
    assert torch.equal(out["image"], patch["image"]) and torch.equal(out["label"], patch["label"])


@pytest.mark.parametrize("spacing,axis", [(ANISOTROPIC, 2), ([3.0, 0.8, 0.8], 0)])
def test_with_anisotropic_spacing_every_slice_stays_on_its_slice(spacing: list[float], axis: int) -> None:
    assert anisotropic_axis(spacing, 3) == axis
    transforms = augment("unet3d", spacing=spacing, **ROTATION_AND_LOW_RESOLUTION)
    grid = transforms[0].rand_affine.rand_affine_grid  # rotation about the slice axis alone, no scaling across it
    assert grid.rotate_range == tuple(0.26 if i == axis else 0.0 for i in range(3))
    assert grid.scale_range == tuple(0.0 if i == axis else 0.1 for i in range(3))
    pipeline = Compose(transforms)
    for seed in range(3):
        patch = sliced_volume(axis)
        out = pipeline.set_random_state(seed)(patch)
        assert on_own_slice(out["image"], axis)  # nothing came across from a neighbouring slice
        label = out["label"][0].movedim(axis, 0)
        assert all(torch.equal(label[i], torch.full_like(label[i], i % 3)) for i in range(label.shape[0]))
        assert not torch.equal(out["image"], patch["image"])  # and the plane did turn


def test_with_isotropic_spacing_rotation_turns_about_every_axis() -> None:
    assert anisotropic_axis(ISOTROPIC, 3) is None
    transforms = augment("unet3d", spacing=ISOTROPIC, **ROTATION_AND_LOW_RESOLUTION)
    assert transforms[0].rand_affine.rand_affine_grid.rotate_range == (0.26, 0.26, 0.26)
    image = Compose(transforms).set_random_state(0)(sliced_volume(2))["image"]
    assert not on_own_slice(image, 2)  # the slices turned into each other


def test_the_anisotropy_rule() -> None:
    assert anisotropic_axis([1.5, 1.5, 2.0], 3) is None  # the 3D default: 1.3
    assert anisotropic_axis([0.8, 0.8, 4.0], 3) == 2
    assert anisotropic_axis([0.8, 0.8, 2.4], 3) is None  # 3 exactly: not above nnU-Net's threshold
    assert anisotropic_axis([0.8, 0.8, -1], 3) is None  # native spacing: unknown, not decided on
    assert anisotropic_axis([0.8, 0.8, -1], 2) is None and anisotropic_axis(ANISOTROPIC, 2) is None  # slices


@pytest.mark.parametrize(
    "bundle,keys,shape",
    [
        ("unet3d", {"spacing": ANISOTROPIC}, (1, 24, 24, 10)),
        ("unet3d", {"spacing": ISOTROPIC}, (1, 24, 24, 10)),
        ("unet2d", {"context_slices": 1}, (3, 32, 32)),  # 2.5D: a slice and its two neighbours as channels
    ],
)
def test_every_transform_runs_in_both_bundles(bundle: str, keys: dict[str, Any], shape: tuple[int, ...]) -> None:
    every = {key: 1.0 for key in PRESETS["strong"] if key.endswith("_prob")}
    transforms = augment(bundle, augmentation="strong", **every, **keys)
    assert len(transforms) == len(TRANSFORMS) + len(shape) - 1
    patch = {"image": MetaTensor(torch.rand(shape)), "label": MetaTensor(torch.randint(0, 3, (1, *shape[1:])).float())}
    out = Compose(transforms).set_random_state(0)(patch)
    assert out["image"].shape == shape and out["label"].shape == (1, *shape[1:])
    assert torch.isfinite(out["image"]).all() and set(out["label"].unique().tolist()) <= {0.0, 1.0, 2.0}


@pytest.mark.parametrize("value", ["heavy", "Default", 1, None])
def test_a_preset_that_does_not_exist_is_refused_naming_the_key(value: object) -> None:
    problems = settings.check({"augmentation": value, "learning_rate": -1}, REPO / "bundles/unet3d")
    assert [problem.key for problem in problems] == ["learning_rate", "augmentation"]
    refused = problems[1]
    assert all(name in refused.fix for name in AUGMENTATIONS), refused.fix
    assert settings.check({"augmentation": "strong"}, REPO / "bundles/unet2d") == []
