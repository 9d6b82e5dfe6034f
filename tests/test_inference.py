"""Inference configs: predictions for new images, written on each input's own grid and affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_components.synthetic import write_dataset
from tests.conftest import SMALL_2D, SMALL_3D, run_bundle


def _configs(bundle: str) -> list[str]:
    return [f"bundles/{bundle}/configs/train.yaml", f"bundles/{bundle}/configs/inference.yaml"]


@pytest.mark.parametrize(
    ("bundle", "dim", "small"),
    [("unet3d", 3, SMALL_3D), ("unet2d", 3, SMALL_2D), ("unet2d", 2, SMALL_2D)],
    ids=["3d-bundle-volumes", "2d-bundle-volumes", "2d-bundle-2d-images"],
)
def test_predictions_keep_the_input_geometry(tmp_path: Path, bundle: str, dim: int, small: dict) -> None:
    shape = (40, 36, 12) if dim == 3 else (48, 40)
    dataset = write_dataset(tmp_path / "data", cases=4, seed=4, dim=dim, shape=shape)
    run = tmp_path / "run"
    run_bundle(
        f"bundles/{bundle}/configs/train.yaml",
        {**small, "dataset_dir": dataset, "output_dir": run, "max_epochs": 1, "val_interval": 1},
    )

    # a new image in another orientation and origin than the training data: the scanner's own space
    source = nib.load(dataset / "imagesTr" / "case_000.nii.gz")
    flipped = np.flip(np.asarray(source.dataobj), axis=0).copy()
    affine = source.affine.copy()
    affine[0, 0] *= -1
    affine[0, 3] += 100.0
    inputs = tmp_path / "new"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(flipped, affine), inputs / "scan.nii.gz")
    nib.save(source, inputs / "original.nii.gz")

    predictions = tmp_path / "predictions"
    overrides = {**small, "dataset_dir": dataset, "model_path": run / "model.pt", "input_dir": inputs}
    run_bundle(_configs(bundle), {**overrides, "prediction_dir": predictions}, run_id="inference")
    prediction = nib.load(predictions / "scan_seg.nii.gz")
    assert prediction.shape == flipped.shape
    np.testing.assert_allclose(prediction.affine, affine, atol=1e-4)
    labels = np.asarray(prediction.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    # the same anatomy stored the other way round gets the same segmentation, stored the other way round
    original = np.asarray(nib.load(predictions / "original_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, np.flip(original, axis=0))


def test_missing_input_dir_is_named(dataset3d: Path, tmp_path: Path) -> None:
    overrides = {
        **SMALL_3D,
        "dataset_dir": dataset3d,
        "model_path": tmp_path / "model.pt",
        "input_dir": tmp_path / "nope",
    }
    result = run_bundle(_configs("unet3d"), overrides, run_id="inference", check=False)
    assert result.returncode != 0 and f"input_dir {tmp_path / 'nope'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
