"""The 3D bundle through the user's own command, from a folder outside the repository: outputs, learning, resume,
bad input."""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from tests.conftest import REPO, SMALL_3D, USER_CWD, bundle_args, read_metrics, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"
# Organ (class 1) Dice the easy case must beat after 20 short epochs. Measured here: 0.74 with the settings
# below; a learning rate of 0 leaves the organ Dice near chance (below 0.3), so a broken pipeline cannot pass.
ORGAN_DICE_BOUND = 0.6


def test_user_command_writes_outputs(run3d: Path) -> None:
    out = run3d  # trained by the user's command, 2 epochs validated each
    outputs = ("models/model.pt", "models/checkpoint_last.pt", "metrics.json", "learning_curve.csv")
    outputs += ("learning_curve.png", "configs/inference.yaml", "docs/README.md")
    for name in outputs:
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard events"
    metrics = read_metrics(out)
    assert metrics["epochs"] == 2
    assert set(metrics["best_dice_per_class"]) == {"organ", "lesion"}
    assert 0.0 <= metrics["best_mean_dice"] <= 1.0
    assert metrics["parameters"] > 0 and metrics["seconds_per_iteration"] > 0
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("learning_rate", "should_learn"), [("0.003", True), ("0.0", False)])
def test_short_training_reaches_dice_bound(dataset3d: Path, tmp_path: Path, learning_rate: str, should_learn: bool):
    out = tmp_path / "run"
    overrides = {**SMALL_3D, "learning_rate": learning_rate, "max_epochs": 20, "val_interval": 5}
    run_bundle(TRAIN_3D, {**overrides, "dataset_dir": dataset3d, "output_dir": out})
    organ_dice = read_metrics(out)["best_dice_per_class"]["organ"]
    assert (organ_dice > ORGAN_DICE_BOUND) == should_learn, organ_dice


def test_interrupted_run_resumes_to_the_same_number_of_epochs(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "max_epochs": 4, "val_interval": 1}
    process = subprocess.Popen(
        bundle_args(TRAIN_3D, overrides), cwd=USER_CWD.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (out / "models/checkpoint_last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # stopped after its first epoch's checkpoint, like a lost job
    process.wait()
    interrupted_epochs = read_metrics(out)["epochs"]
    assert interrupted_epochs < 4, "the run finished before it could be interrupted"

    result = run_bundle(TRAIN_3D, overrides)
    assert "resumed from" in result.stdout + result.stderr
    with open(out / "learning_curve.csv") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    assert epochs == [1, 2, 3, 4]
    assert read_metrics(out)["epochs"] == 4

    # the run folder is a bundle: its own train.yaml resumes it in place, and a finished run trains nothing more
    result = run_bundle(out / "configs" / "train.yaml", {})
    assert "resumed from" in result.stdout + result.stderr
    assert read_metrics(out)["epochs"] == 4


def test_each_run_gets_its_own_output_dir() -> None:
    folders = set()
    for _ in range(2):
        parser = ConfigParser()
        parser.read_config(str(REPO / TRAIN_3D))
        folders.add(parser.get_parsed_content("output_dir"))  # relative to the user's working directory
        time.sleep(0.01)
    assert len(folders) == 2 and all(f.startswith("runs/unet3d/") for f in folders)


def _break_label_values(dataset: Path) -> Path:
    label = dataset / "labelsTr" / "case_002.nii.gz"
    image = nib.load(label)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, image.affine), label)
    return label


def test_bad_input_stops_before_training_with_the_file_named(dataset3d: Path, copy_dataset, tmp_path: Path) -> None:
    broken = copy_dataset(dataset3d)
    label = _break_label_values(broken)
    out = tmp_path / "run"
    result = run_bundle(TRAIN_3D, {**SMALL_3D, "dataset_dir": broken, "output_dir": out}, check=False)
    assert result.returncode != 0
    assert str(label) in result.stderr and "outside 0..2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "models" / "checkpoint_last.pt").exists()
