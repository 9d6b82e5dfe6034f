"""A run folder's evaluate.yaml: its validation cases on its own dataset, every labelled case on another one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_components.data import case_id, check_datalist, load_dataset_json, split_datalist
from custom_components.synthetic import write_dataset
from tests.conftest import SMALL_2D, SMALL_3D, read_metrics, run_bundle


def _evaluate(run: Path, overrides: dict, check: bool = True):
    return run_bundle(run / "configs/evaluate.yaml", overrides, run_id="evaluating", check=check)


def _trained(bundle: str, run3d: Path, dataset3d: Path, tmp_path: Path) -> Path:
    if bundle == "unet3d":
        return run3d
    run = tmp_path / "run"
    overrides = {**SMALL_2D, "dataset_dir": dataset3d, "output_dir": run, "max_epochs": 2, "val_interval": 2}
    run_bundle("bundles/unet2d/configs/train.yaml", overrides)
    return run


@pytest.mark.parametrize("bundle", ["unet3d", "unet2d"])
def test_evaluation_scores_every_validation_case(bundle: str, run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    run = _trained(bundle, run3d, dataset3d, tmp_path)
    out = tmp_path / "evaluation"
    _evaluate(run, {"output_dir": out})  # nothing but where to write: the run folder knows the rest

    evaluation = json.loads((out / "evaluation.json").read_text())
    datalist = check_datalist(load_dataset_json(dataset3d), dataset3d, num_classes=3)
    _, val = split_datalist(datalist, fold=0, num_folds=int(SMALL_3D["num_folds"]), seed=0)
    assert sorted(evaluation["cases"]) == sorted(case_id(item["image"]) for item in val)
    # the best model re-scored on the same cases gives the Dice that selected it during training
    metrics = read_metrics(run)
    assert evaluation["mean_dice"] == pytest.approx(metrics["best_mean_dice"], abs=1e-5)
    for name, dice in metrics["best_dice_per_class"].items():
        assert evaluation["dice_per_class"][name] == pytest.approx(dice, abs=1e-5)
    assert evaluation["model_path"] == str(run / "models" / "model.pt")
    with open(out / "val_mean_dice_raw.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(case_id(row["filename"]) for row in rows) == sorted(evaluation["cases"])
    for row in rows:  # MONAI's per-image CSV and evaluation.json hold the same per-case scores
        scores = evaluation["cases"][case_id(row["filename"])]
        assert float(row["mean"]) == pytest.approx(scores["mean_dice"], abs=1e-5)
        assert float(row["class0"]) == pytest.approx(scores["dice"]["organ"], abs=1e-5)
    _check_surface_metrics_and_predictions(evaluation, out)


def _check_surface_metrics_and_predictions(evaluation: dict, out: Path) -> None:
    """HD95 and NSD for every case and class, their summary, the largest-component effect, predictions on grid."""
    classes = ["organ", "lesion"]
    for case, scores in evaluation["cases"].items():
        for metric in ("hd95", "nsd"):
            assert sorted(scores[metric]) == sorted(classes) and all(np.isfinite(list(scores[metric].values())))
        assert all(0 <= value <= 1 for value in scores["nsd"].values())
        assert sorted(scores["largest_component_dice"]) == sorted(classes)
        prediction = Path(scores["prediction"])
        assert prediction == out / "predictions" / f"{case}_seg.nii.gz"
        image = nib.load(scores["image"])
        assert nib.load(prediction).shape == image.shape  # on the image's own grid
        np.testing.assert_allclose(nib.load(prediction).affine, image.affine, atol=1e-4)
    for metric in ("dice", "hd95", "nsd"):
        for name in classes:
            values = [scores[metric][name] for scores in evaluation["cases"].values()]
            assert evaluation["summary"][metric][name]["mean"] == pytest.approx(np.mean(values))
            assert evaluation["summary"][metric][name]["median"] == pytest.approx(np.median(values))
    assert sorted(evaluation["postprocess_effect"]) == sorted(classes)
    assert evaluation["nsd_tolerance_mm"] == 2.0 and "empty" in evaluation["empty_policy"]


def test_another_dataset_is_scored_on_every_labelled_case(run3d: Path, tmp_path: Path) -> None:
    other = write_dataset(tmp_path / "other", cases=3, seed=7, shape=(40, 40, 16))
    out = tmp_path / "evaluation"
    _evaluate(run3d, {"dataset_dir": other, "output_dir": out})
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert sorted(evaluation["cases"]) == ["case_000", "case_001", "case_002"]


def test_a_dataset_of_other_classes_is_refused(run3d: Path, tmp_path: Path) -> None:
    other = write_dataset(tmp_path / "other", cases=3, seed=7, shape=(40, 40, 16))
    description = json.loads((other / "dataset.json").read_text())
    description["labels"] = {"0": "background", "1": "liver", "2": "tumour"}
    (other / "dataset.json").write_text(json.dumps(description))
    result = _evaluate(run3d, {"dataset_dir": other, "output_dir": tmp_path / "evaluation"}, check=False)
    assert result.returncode != 0 and "the model segments ['organ', 'lesion']" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_is_named(run3d: Path, tmp_path: Path) -> None:
    model = tmp_path / "nothing" / "model.pt"
    result = _evaluate(run3d, {"model_path": model, "output_dir": tmp_path / "evaluation"}, check=False)
    assert result.returncode != 0
    assert f"model_path {model} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_output_dir_that_is_a_file_stops_evaluation_before_any_case(run3d: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    result = _evaluate(run3d, {"output_dir": blocked}, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: output_dir {blocked} is a file, but output_dir must be a folder" in result.stderr
    assert blocked.read_text() == "not a folder"
