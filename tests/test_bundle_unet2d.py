"""The 2D bundle: same datasets, keys and outputs as the 3D bundle; slices from volumes, or native 2D images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from custom_components.settings import check
from custom_components.settings_declarations import declarations
from custom_components.synthetic import write_dataset
from tests.conftest import REPO, SMALL_2D, read_metrics, run_bundle

TRAIN_2D = "bundles/unet2d/configs/train.yaml"
TRAIN_3D = "bundles/unet3d/configs/train.yaml"
# Organ Dice bound after 20 short epochs of slice training on the easy volumes. Measured here: 0.46 with these
# settings, 0.12 with a learning rate of 0, so a broken pipeline cannot pass.
ORGAN_DICE_BOUND_2D = 0.3


def test_volumes_train_slice_by_slice_and_report_like_3d(dataset3d: Path, run3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_bundle(TRAIN_2D, {**SMALL_2D, "dataset_dir": dataset3d, "output_dir": out, "max_epochs": 2, "val_interval": 1})
    outputs = ("models/model.pt", "models/checkpoint_last.pt", "metrics.json", "learning_curve.csv")
    outputs += ("learning_curve.png", "configs/inference.yaml", "docs/README.md")
    for name in outputs:
        assert (out / name).is_file(), name
    metrics = read_metrics(out)
    assert set(metrics) == set(read_metrics(run3d)), "metrics.json of both bundles must compare key by key"
    assert set(metrics["best_dice_per_class"]) == {"organ", "lesion"}
    for cost in ("wall_time_s", "seconds_per_iteration", "peak_memory_mb", "parameters"):
        assert metrics[cost] > 0


def test_two_and_a_half_d_context_slices(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {
        **SMALL_2D,
        "dataset_dir": dataset3d,
        "output_dir": out,
        "max_epochs": 1,
        "val_interval": 1,
        "context_slices": 1,
    }
    run_bundle(TRAIN_2D, overrides)
    first_conv = next(v for k, v in torch.load(out / "models" / "model.pt").items() if k.endswith("conv.weight"))
    assert first_conv.shape[1] == 3  # one CT channel with a neighbour slice on each side
    assert 0.0 <= read_metrics(out)["best_mean_dice"] <= 1.0


# PNG/TIFF hold HU + 1024 (custom_components.synthetic.PNG_OFFSET_HU): the CT window moves with it
@pytest.mark.parametrize(
    ("image_format", "window"), [("nifti", "[-160,240]"), ("png", "[864,1264]"), ("tiff", "[864,1264]")]
)
def test_native_2d_images_train_as_plain_2d(tmp_path: Path, image_format: str, window: str) -> None:
    dataset = write_dataset(tmp_path / "synthetic2d", cases=6, seed=2, dim=2, shape=(64, 64), image_format=image_format)
    out = tmp_path / "run"
    overrides = {**SMALL_2D, "dataset_dir": dataset, "output_dir": out, "max_epochs": 3, "val_interval": 1}
    run_bundle(TRAIN_2D, {**overrides, "intensity#window": window})
    metrics = read_metrics(out)
    assert metrics["epochs"] == 3 and 0.3 < metrics["best_dice_per_class"]["organ"] <= 1.0


@pytest.mark.parametrize(("learning_rate", "should_learn"), [("0.003", True), ("0.0", False)])
def test_short_2d_training_reaches_dice_bound(dataset3d: Path, tmp_path: Path, learning_rate: str, should_learn):
    out = tmp_path / "run"
    overrides = {**SMALL_2D, "learning_rate": learning_rate, "max_epochs": 20, "val_interval": 5}
    run_bundle(TRAIN_2D, {**overrides, "dataset_dir": dataset3d, "output_dir": out})
    organ_dice = read_metrics(out)["best_dice_per_class"]["organ"]
    assert (organ_dice > ORGAN_DICE_BOUND_2D) == should_learn, organ_dice


def _user_keys(path: str) -> set[str]:
    return set(yaml.safe_load((REPO / path).read_text()))


def test_swapping_the_config_path_is_the_only_change() -> None:
    # every key of the 3D bundle exists in the 2D one: swapping the config path is the only change a user makes,
    # but for the cascade's keys (a coarse 3D stage, and its label maps as input channels or a crop: 3D alone, as in
    # nnU-Net)
    cascade = {"resolution", "previous_stage", "stage_input", "stage_margin_mm"}
    assert set(declarations("unet3d")) - set(declarations("unet2d")) == cascade
    assert _user_keys(TRAIN_3D) - cascade - {"stage_crop"} <= _user_keys(TRAIN_2D)  # and the crop's wiring
    # given to the 2D bundle, they are named as the 3D bundle's, not as unknown keys
    given = {"resolution": "coarse", "previous_stage": "runs/coarse", "stage_input": "crop", "stage_margin_mm": 5.0}
    problems = check(given, REPO / "bundles/unet2d", "train")
    named = sorted((problem.key, problem.problem) for problem in problems)
    assert named == [(key, "a key of bundles/unet3d only") for key in sorted(cascade)]
