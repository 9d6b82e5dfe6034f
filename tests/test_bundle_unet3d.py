"""The 3D bundle through the user's own command, from a folder outside the repository: outputs, learning, resume,
bad input."""

from __future__ import annotations

import csv
import shutil
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
    # the steps were timed: 2 short epochs, each validated, spend much of their time outside them but not all
    assert 0.05 < metrics["overhead_share"] < 0.95, metrics["overhead_share"]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("learning_rate", "should_learn"), [("0.003", True), ("0.0", False)])
def test_short_training_reaches_dice_bound(dataset3d: Path, tmp_path: Path, learning_rate: str, should_learn: bool):
    out = tmp_path / "run"
    overrides = {**SMALL_3D, "learning_rate": learning_rate, "max_epochs": 20, "val_interval": 5}
    run_bundle(TRAIN_3D, {**overrides, "dataset_dir": dataset3d, "output_dir": out})
    organ_dice = read_metrics(out)["best_dice_per_class"]["organ"]
    assert (organ_dice > ORGAN_DICE_BOUND) == should_learn, organ_dice


# 4 epochs with persistent workers (each item is seeded by its epoch and index, not by the worker) and a checkpoint
# every epoch, so that the run can be killed after its first
INTERRUPTIBLE = {"num_workers": "2", "checkpoint_interval_min": "0", "max_epochs": 4, "val_interval": 1}


def _curve(output_dir: Path) -> list[dict[str, float]]:
    with open(output_dir / "learning_curve.csv") as handle:
        return [
            {key: float(row[key]) for key in ("epoch", "train_loss", "learning_rate")} for row in csv.DictReader(handle)
        ]


def _assert_same_curve(run: Path, reference: Path) -> None:
    """Same epochs, training loss equal to 1e-6 and the same learning rate in every epoch."""
    curve, expected = _curve(run), _curve(reference)
    assert [row["epoch"] for row in curve] == [row["epoch"] for row in expected]
    for row, want in zip(curve, expected, strict=True):
        assert abs(row["train_loss"] - want["train_loss"]) <= 1e-6, (row, want)
        assert row["learning_rate"] == pytest.approx(want["learning_rate"], rel=1e-9), (row, want)


@pytest.fixture(scope="module")
def uninterrupted4(dataset3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run the resumed ones must repeat: 4 epochs of the small 3D settings, never stopped, its patches drawn by
    two data-loading workers that live across the epochs."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted4"
    overrides = {**SMALL_3D, **INTERRUPTIBLE, "dataset_dir": dataset3d, "output_dir": out}
    run_bundle(TRAIN_3D, overrides)
    return out


def test_interrupted_run_resumes_to_the_same_learning_curve(
    dataset3d: Path, tmp_path: Path, uninterrupted4: Path
) -> None:
    out = tmp_path / "run"
    overrides = {**SMALL_3D, **INTERRUPTIBLE, "dataset_dir": dataset3d, "output_dir": out}
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

    result = run_bundle(TRAIN_3D, overrides)  # the killed run left no lock behind
    assert "resumed from" in result.stdout + result.stderr
    assert read_metrics(out)["epochs"] == 4
    # the random state of every epoch is the uninterrupted run's: the same patches, augmentations and order
    _assert_same_curve(out, uninterrupted4)

    # the run folder is a bundle: its own train.yaml resumes it in place, and a finished run trains nothing more
    result = run_bundle(out / "configs" / "train.yaml", {})
    assert "resumed from" in result.stdout + result.stderr
    assert read_metrics(out)["epochs"] == 4


def test_finished_run_is_extended_only_when_asked(run3d: Path, tmp_path: Path, uninterrupted4: Path) -> None:
    out = Path(shutil.copytree(run3d, tmp_path / "run"))  # 2 epochs of the same settings, finished
    stored = {**ConfigParser.load_config_file(out / "configs/train.yaml")}
    checkpoint = (out / "models/checkpoint_last.pt").read_bytes()
    overrides = {**SMALL_3D, "dataset_dir": stored["dataset_dir"], "output_dir": out, "val_interval": 1}

    # other settings than the stored ones: refused before any data is read, each difference listed with the fix
    refused = run_bundle(TRAIN_3D, {**overrides, "max_epochs": 8, "learning_rate": 0.01}, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "learning_rate: 0.003 -> 0.01" in refused.stderr and "max_epochs: 2 -> 8" in refused.stderr
    assert "start a new output_dir, or resume with the stored values" in refused.stderr.lower()
    assert "--extend_training True" in refused.stderr
    assert (out / "models/checkpoint_last.pt").read_bytes() == checkpoint
    assert ConfigParser.load_config_file(out / "configs/train.yaml") == stored  # not rewritten: nothing started

    # extended to 4 epochs on request: the schedule laid out again over 4 epochs, as a run of 4 from the start
    result = run_bundle(TRAIN_3D, {**overrides, "max_epochs": 4, "extend_training": True})
    assert "extended from 2 to 4 epochs" in result.stdout + result.stderr
    assert read_metrics(out)["epochs"] == 4
    _assert_same_curve(out, uninterrupted4)


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
