"""Inference from a run folder alone: predictions on each input's own grid and affine, the same as the source bundle
given every training key again; unreadable inputs skipped and listed; a wrong model, inputs of the wrong dimensions
and an output_dir that cannot be written stopped before any case."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from custom_components.inference import input_dims_problem
from custom_components.synthetic import write_dataset
from tests.conftest import SMALL_2D, SMALL_3D, run_bundle

# the keys of SMALL_3D that inference uses: what a user had to repeat before run folders were bundles
INFERENCE_KEYS = ("spacing", "patch_size", "channels", "strides", "num_workers", "progress_bar")


def _scans(dataset: Path, folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A training image as it is and stored the other way round with another origin (another scanner's space)."""
    source = nib.load(dataset / "imagesTr" / "case_000.nii.gz")
    flipped = np.flip(np.asarray(source.dataobj), axis=0).copy()
    affine = source.affine.copy()
    affine[0, 0] *= -1
    affine[0, 3] += 100.0
    folder.mkdir()
    nib.save(nib.Nifti1Image(flipped, affine), folder / "scan.nii.gz")
    nib.save(source, folder / "original.nii.gz")
    return folder, flipped, affine


def _check_geometry(predictions: Path, flipped: np.ndarray, affine: np.ndarray) -> np.ndarray:
    prediction = nib.load(predictions / "scan_seg.nii.gz")
    assert prediction.shape == flipped.shape
    np.testing.assert_allclose(prediction.affine, affine, atol=1e-4)
    labels = np.asarray(prediction.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    # the same anatomy stored the other way round gets the same segmentation, stored the other way round
    original = np.asarray(nib.load(predictions / "original_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, np.flip(original, axis=0))
    return labels


def test_run_folder_predicts_alone_as_the_source_bundle_with_every_key_repeated(
    run3d: Path, dataset3d: Path, tmp_path: Path
) -> None:
    inputs, flipped, affine = _scans(dataset3d, tmp_path / "new")
    alone = tmp_path / "alone"
    run_bundle(run3d / "configs/inference.yaml", {"input_dir": inputs, "output_dir": alone}, run_id="inference")
    labels = _check_geometry(alone, flipped, affine)
    repeated = tmp_path / "repeated"
    overrides = {key: SMALL_3D[key] for key in INFERENCE_KEYS}
    overrides |= {"model_path": run3d / "models/model.pt", "input_dir": inputs, "output_dir": repeated}
    run_bundle("bundles/unet3d/configs/inference.yaml", overrides, run_id="inference")
    np.testing.assert_array_equal(labels, np.asarray(nib.load(repeated / "scan_seg.nii.gz").dataobj))


def test_tta_postprocessing_and_probabilities(run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    inputs, flipped, _ = _scans(dataset3d, tmp_path / "new")
    out = tmp_path / "out"
    overrides = {"input_dir": inputs, "output_dir": out, "tta": True, "postprocess": "[organ]"}
    run_bundle(run3d / "configs/inference.yaml", {**overrides, "save_probabilities": True}, run_id="inference")
    probabilities = np.asarray(nib.load(out / "scan_prob.nii.gz").dataobj)
    assert probabilities.shape == (*flipped.shape, 3)  # one channel per class, on the input grid
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    labels = np.asarray(nib.load(out / "scan_seg.nii.gz").dataobj)
    organ = labels == 1
    if organ.any():  # `postprocess: [organ]`: one connected organ
        assert scipy.ndimage.label(organ, structure=np.ones((3, 3, 3)))[1] == 1  # MONAI: full connectivity
    # where postprocessing left the argmax alone, the label map is the argmax of the written probabilities
    argmax = probabilities.argmax(axis=-1)
    assert ((labels == argmax) | (argmax == 1)).all()


@pytest.mark.parametrize("dim", [3, 2], ids=["2d-bundle-volumes", "2d-bundle-2d-images"])
def test_2d_predictions_keep_the_input_geometry(tmp_path: Path, dim: int) -> None:
    shape = (40, 36, 12) if dim == 3 else (48, 40)
    dataset = write_dataset(tmp_path / "data", cases=4, seed=4, dim=dim, shape=shape)
    run = tmp_path / "run"
    overrides = {**SMALL_2D, "dataset_dir": dataset, "output_dir": run, "max_epochs": 1, "val_interval": 1}
    run_bundle("bundles/unet2d/configs/train.yaml", overrides)
    inputs, flipped, affine = _scans(dataset, tmp_path / "new")
    predictions = tmp_path / "predictions"
    run_bundle(run / "configs/inference.yaml", {"input_dir": inputs, "output_dir": predictions}, run_id="inference")
    _check_geometry(predictions, flipped, affine)


def test_an_unreadable_input_is_skipped_and_listed(run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "scans"
    inputs.mkdir()
    (inputs / "good.nii.gz").write_bytes((dataset3d / "imagesTr" / "case_001.nii.gz").read_bytes())
    corrupt = inputs / "broken.nii.gz"
    corrupt.write_bytes((dataset3d / "imagesTr" / "case_002.nii.gz").read_bytes()[:2000])  # a cut-off download
    out = tmp_path / "out"
    result = run_bundle(
        run3d / "configs/inference.yaml", {"input_dir": inputs, "output_dir": out}, run_id="inference", check=False
    )
    assert result.returncode != 0
    assert (out / "good_seg.nii.gz").is_file() and not (out / "broken_seg.nii.gz").exists()
    assert "1 input(s) could not be read" in result.stderr and str(corrupt) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_of_other_settings_stops_before_any_case(run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = run3d / "models/model.pt"  # trained with 3 levels; the source bundle's default network has 5
    overrides = {"model_path": model, "input_dir": dataset3d / "imagesTr", "output_dir": out}
    result = run_bundle("bundles/unet3d/configs/inference.yaml", overrides, run_id="inference", check=False)
    assert result.returncode != 0 and not out.exists()
    assert f"model_path {model} does not fit the network" in result.stderr
    assert "missing" in result.stderr and "other shape" in result.stderr and "Traceback" not in result.stderr


def test_missing_input_dir_is_named(run3d: Path, tmp_path: Path) -> None:
    overrides = {"input_dir": tmp_path / "nope", "output_dir": tmp_path / "out"}
    result = run_bundle(run3d / "configs/inference.yaml", overrides, run_id="inference", check=False)
    assert result.returncode != 0 and f"input_dir {tmp_path / 'nope'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def _picture(path: Path) -> Path:
    """A small 2D PNG image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(40 * 48, dtype=np.uint8).reshape(40, 48)).save(path)
    return path


def test_2d_images_given_to_a_3d_run_stop_before_any_case(run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "scans"
    picture = _picture(inputs / "photo.png")
    (inputs / "good.nii.gz").write_bytes((dataset3d / "imagesTr" / "case_001.nii.gz").read_bytes())
    out = tmp_path / "out"
    result = run_bundle(
        run3d / "configs/inference.yaml", {"input_dir": inputs, "output_dir": out}, run_id="inference", check=False
    )
    assert result.returncode != 0 and not out.exists()  # stopped before any case, the volume included
    assert f"the 3D network segments volumes, not 2D images: {picture}; segment 2D images with a run of the 2D" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_input_dims_against_the_2d_network(dataset3d: Path, tmp_path: Path) -> None:
    """The 2D network takes volumes or 2D images, one kind a run; with 2.5D context, volumes only."""
    volume = tmp_path / "scan.nii.gz"
    volume.write_bytes((dataset3d / "imagesTr" / "case_001.nii.gz").read_bytes())
    pictures = [{"image": str(_picture(tmp_path / f"photo_{index}.png"))} for index in range(2)]
    assert input_dims_problem(tmp_path, pictures, spatial_dims=2) is None
    assert input_dims_problem(tmp_path, [{"image": str(volume)}], spatial_dims=2, context_slices=1) is None
    mixed = input_dims_problem(tmp_path, [{"image": str(volume)}, *pictures], spatial_dims=2)
    assert f"mixes volumes and 2D images, and a run segments one kind (the first, {volume}, is a volume)" in mixed
    assert f"{pictures[0]['image']}, {pictures[1]['image']}; put each kind in a folder of its own" in mixed
    context = input_dims_problem(tmp_path, pictures, spatial_dims=2, context_slices=1)
    assert f"context_slices 1 neighbouring slices as channels, which 2D images lack: {pictures[0]['image']}" in context


@pytest.mark.parametrize(
    ("below", "why"),
    [(True, "cannot be written (Not a directory)"), (False, "is a file, but output_dir must be a folder")],
    ids=["unwritable", "a-file"],
)
def test_an_output_dir_that_cannot_hold_predictions_stops_before_any_case(
    run3d: Path, dataset3d: Path, tmp_path: Path, below: bool, why: str
) -> None:
    """Unwritable: run as root, permission bits stop no write, but a folder below a regular file nobody can create."""
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    out = blocked / "out" if below else blocked
    overrides = {"input_dir": dataset3d / "imagesTr", "output_dir": out}
    result = run_bundle(run3d / "configs/inference.yaml", overrides, run_id="inference", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: output_dir {out} {why}: pass --output_dir with a folder" in result.stderr
