"""The evaluate.yaml overlay through the user's command: every validation case scored by the run's best model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from custom_components.data import case_id, check_datalist, load_dataset_json, split_datalist
from tests.conftest import SMALL_2D, SMALL_3D, read_metrics, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"
EVALUATE_3D = [TRAIN_3D, "bundles/unet3d/configs/evaluate.yaml"]


@pytest.mark.parametrize(("bundle", "small"), [("unet3d", SMALL_3D), ("unet2d", SMALL_2D)])
def test_evaluation_scores_every_validation_case(dataset3d: Path, tmp_path: Path, bundle: str, small: dict) -> None:
    run = tmp_path / "run"
    overrides = {**small, "dataset_dir": dataset3d, "output_dir": run}
    train = f"bundles/{bundle}/configs/train.yaml"
    run_bundle(train, {**overrides, "max_epochs": 2, "val_interval": 2})
    run_bundle([train, f"bundles/{bundle}/configs/evaluate.yaml"], overrides, run_id="evaluating")

    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    datalist = check_datalist(load_dataset_json(dataset3d), dataset3d, num_classes=3)
    _, val = split_datalist(datalist, fold=0, num_folds=int(SMALL_3D["num_folds"]), seed=0)
    assert sorted(evaluation["cases"]) == sorted(case_id(item["image"]) for item in val)
    # the best model re-scored on the same cases gives the Dice that selected it during training
    metrics = read_metrics(run)
    assert evaluation["mean_dice"] == pytest.approx(metrics["best_mean_dice"], abs=1e-5)
    for name, dice in metrics["best_dice_per_class"].items():
        assert evaluation["dice_per_class"][name] == pytest.approx(dice, abs=1e-5)
    assert evaluation["model_path"] == str(run / "model.pt")
    with open(run / "evaluation" / "val_mean_dice_raw.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(case_id(row["filename"]) for row in rows) == sorted(evaluation["cases"])
    for row in rows:  # MONAI's per-image CSV and evaluation.json hold the same per-case scores
        scores = evaluation["cases"][case_id(row["filename"])]
        assert float(row["mean"]) == pytest.approx(scores["mean_dice"], abs=1e-5)
        assert float(row["class0"]) == pytest.approx(scores["dice"]["organ"], abs=1e-5)


def test_missing_model_is_named(dataset3d: Path, tmp_path: Path) -> None:
    model = tmp_path / "nothing" / "model.pt"
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": tmp_path / "run", "model_path": model}
    result = run_bundle(EVALUATE_3D, overrides, run_id="evaluating", check=False)
    assert result.returncode != 0
    assert f"model_path {model} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
