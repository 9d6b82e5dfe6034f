"""`kfold select`: the 2D and 3D bundles planned and cross-validated on one split, scored with their ensemble from
the folds' saved probabilities, and the configuration the data favours named and used, through the user's command.
The data that favours 2D is in test_select_slabs.py (a file of its own: the two run on two workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.kfold.__main__ import main
from custom_components.kfold.evaluation import label_dice
from custom_components.kfold.select import compare
from custom_components.synthetic import write_dataset
from tests.conftest import USER_CWD

KFOLD = [sys.executable, "-m", "custom_components.kfold"]
# a small network trained 40 epochs of one pass over a fold's 3 training cases, validated once at the end: about 10 s
# a fold on two cores (the plan decides the rest)
SETS = [
    "channels=[8,16,32]",
    "strides=[2,2]",
    "iterations_per_epoch=2",
    "num_workers=0",
    "warmup_epochs=1",
    "max_epochs=40",
    "val_interval=40",
    "learning_rate=0.01",
    "progress_bar=false",
    "log_every_iteration=false",
]
# rods through the volume among discs of the same section: only 3D tells them apart; thin slabs whose slices each
# draw their squares anew: the neighbouring slices mislead a 3D network
SHAPES = {"rods": (32, 32, 16), "slabs": (40, 40, 5)}
CASES = 6
FAVOURED = {"rods": "unet3d", "slabs": "unet2d"}
OTHER = {"unet3d": "unet2d", "unet2d": "unet3d"}


def select_command(dataset: Path, output: Path, seed: int, *extra: str) -> list[str]:
    """The user's `kfold select` of both bundles on 2 folds."""
    command = [*KFOLD, "select", "--dataset_dir", str(dataset), "--output", str(output), "--folds", "2"]
    return [*command, "--seed", str(seed), "--set", *SETS, *extra]


def run_select(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=USER_CWD.name, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def rods(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`kfold select` on the rods (seed 0), killed with its fold once the 2D bundle's first fold is finished, then
    started again to the end."""
    root = tmp_path_factory.mktemp("select")
    dataset = write_dataset(root / "rods", cases=CASES, seed=0, kind="rods", shape=SHAPES["rods"])
    output = root / "selection"
    command = select_command(dataset, output, 0)
    first = subprocess.Popen(
        command, cwd=USER_CWD.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    scored = output / "unet2d" / "fold_0" / "evaluation" / "evaluation.json"
    deadline = time.time() + 300
    while not scored.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the selection and the fold it is training, like a lost job
    first.wait()
    assert scored.exists(), "the first fold did not finish before the deadline"
    assert not (output / "selection.json").exists()
    fold0 = output / "unet2d" / "fold_0"
    before = {name: (fold0 / name).stat().st_mtime_ns for name in ("models/model.pt", "metrics.json", "fold.log")}
    second = run_select(command)
    return SimpleNamespace(dataset=dataset, output=output, fold0_before=before, log=second.stdout + second.stderr)


def check_selection(output: Path, kind: str) -> None:
    """The selection in ``output`` names the bundle the ``kind`` of data favours, by a lead the cases support."""
    selection = json.loads((output / "selection.json").read_text())
    expected = FAVOURED[kind]
    assert selection["winner"] == expected, selection["verdict"]
    assert set(selection["configurations"]) == {"unet2d", "unet3d", "unet2d+unet3d"}
    lead = next(entry for entry in selection["comparisons"] if entry["configuration"] == OTHER[expected])
    assert lead["significant"] and lead["difference"] > 0.05  # over the other bundle alone, by the cases' bootstrap
    assert selection["verdict"].startswith(f"{expected} wins")
    assert f"| {expected} (winner) |" in (output / "selection.md").read_text()
    assert (output / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def select_on_new_data(kind: str, seed: int, root: Path) -> Path:
    """`kfold select` on a new dataset of ``kind`` made with ``seed``; its output folder."""
    dataset = write_dataset(root / kind, cases=CASES, seed=seed, kind=kind, shape=SHAPES[kind])
    run_select(select_command(dataset, root / "selection", seed))
    return root / "selection"


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_names_3d_on_rods(seed: int, rods: SimpleNamespace, tmp_path: Path) -> None:
    check_selection(rods.output if seed == 0 else select_on_new_data("rods", seed, tmp_path), "rods")


def test_the_ensemble_is_scored_from_the_folds_saved_probabilities(rods: SimpleNamespace) -> None:
    """Every configuration's out-of-fold Dice, the 2D+3D ensemble's included, is the Dice of the argmax of the
    probabilities the folds wrote for their validation cases, averaged: recomputed here from those files."""
    output = rods.output
    selection = json.loads((output / "selection.json").read_text())
    splits = json.loads((output / "splits.json").read_text())
    assert selection["plans"]["unet2d"]["spacing"][2] == -1 and "patch_size" in selection["plans"]["unet3d"]
    assert not list(output.glob("unet2d+unet3d*"))  # nothing was trained for the ensemble
    for fold, split in enumerate(splits):
        for case in split["val"]:
            probabilities = {
                name: np.asarray(
                    nib.load(output / name / f"fold_{fold}" / "evaluation/predictions" / f"{case}_prob.nii.gz").dataobj
                )
                for name in ("unet2d", "unet3d")
            }
            label = np.asarray(nib.load(rods.dataset / "labelsTr" / f"{case}.nii.gz").dataobj)
            assert probabilities["unet2d"].shape == (*label.shape, 2)  # on the image's own grid
            for name, combo in [("unet2d", ["unet2d"]), ("unet3d", ["unet3d"]), ("unet2d+unet3d", list(probabilities))]:
                mean = np.mean([probabilities[member] for member in combo], axis=0)
                dice = label_dice(torch.as_tensor(mean.argmax(-1)), torch.as_tensor(label), 2)
                assert selection["configurations"][name]["cases"][case] == pytest.approx(float(dice.mean()), abs=1e-6)


def test_a_restart_skips_the_finished_folds(rods: SimpleNamespace) -> None:
    fold0 = rods.output / "unet2d" / "fold_0"
    assert "fold_0: already finished, skipped" in rods.log
    assert {n: (fold0 / n).stat().st_mtime_ns for n in rods.fold0_before} == rods.fold0_before
    state = json.loads((rods.output / "select.json").read_text())
    assert list(state["plans"]) == ["unet2d", "unet3d"]  # planned once, kept for the restart
    written = (rods.output / "selection.json").read_text()
    assert main(["report", str(rods.output)]) == 0  # `kfold report OUT` rewrites the selection from the folds
    assert (rods.output / "selection.json").read_text() == written
    other = select_command(rods.dataset, rods.output, 0, "unet3d:learning_rate=0.001")
    refused = subprocess.run(other, cwd=USER_CWD.name, capture_output=True, text=True)
    assert refused.returncode != 0 and "was started with other options" in refused.stderr
    assert "unet3d:learning_rate=0.001)" in refused.stderr  # the option that differs, as given now


def test_predict_uses_the_winner_or_the_named_ensemble_on_the_input_grid(rods: SimpleNamespace, tmp_path: Path) -> None:
    image = rods.dataset / "imagesTr" / "case_001.nii.gz"
    reference = nib.load(image)
    for configuration, out in [(None, tmp_path / "winner"), ("unet2d+unet3d", tmp_path / "ensemble")]:
        command = [*KFOLD, "predict", str(rods.output), "--images", str(image), "--out", str(out)]
        result = subprocess.run(
            command + (["--configuration", configuration] if configuration else []),
            cwd=USER_CWD.name,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        written = nib.load(out / "case_001_seg.nii.gz")
        assert written.shape == reference.shape
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
        label = np.asarray(nib.load(rods.dataset / "labelsTr" / "case_001.nii.gz").dataobj)
        dice = label_dice(torch.as_tensor(np.asarray(written.dataobj)), torch.as_tensor(label), 2)
        assert float(dice.mean()) > 0.8  # the models saw this case: a sanity bound, not a score
    assert not list((tmp_path / "ensemble").glob("*_prob.nii.gz"))


def test_bad_requests_stop_before_any_work_naming_the_key(tmp_path: Path) -> None:
    dataset = tmp_path / "missing"
    output = tmp_path / "selection"
    command = [*KFOLD, "select", "--dataset_dir", str(dataset), "--output", str(output), "--folds", "2", "--set"]
    result = subprocess.run(
        [*command, "unet4d:channels=[8,16]", "unet3d:patch_size=[7]", "norm=nonsense"],
        cwd=USER_CWD.name,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "unet4d is not one of --bundles (unet2d, unet3d)" in result.stderr
    assert not output.exists()
    result = subprocess.run(
        [*command, "unet3d:patch_size=[7]", "norm=nonsense"], cwd=USER_CWD.name, capture_output=True, text=True
    )
    assert result.returncode != 0 and not output.exists()
    assert "(unet3d)" in result.stderr and "patch_size" in result.stderr and "norm" in result.stderr
    assert "(unet2d)" in result.stderr  # every bundle's problems at once
    assert "Traceback" not in result.stderr


def test_the_winner_is_the_simplest_within_the_noise_of_the_best() -> None:
    base = np.random.default_rng(0).uniform(0.6, 0.9, 12)
    swing = np.resize([0.06, -0.04], base.size)  # per case +-, a mean lead of 0.01: noise, not a difference

    def configuration(members: list[str], values: np.ndarray) -> dict:
        return {"members": members, "mean_dice": float(values.mean()), "cases": dict(enumerate(values.tolist()))}

    scored = {
        "unet2d": configuration(["unet2d"], base),
        "unet3d": configuration(["unet3d"], base - 0.2),
        "unet2d+unet3d": configuration(["unet2d", "unet3d"], base + swing),
    }
    result = compare(scored)
    assert result["best"] == "unet2d+unet3d" and result["winner"] == "unet2d"  # not significantly better: cheaper
    assert [entry["significant"] for entry in result["comparisons"]] == [False, True]
    scored["unet2d+unet3d"] = configuration(["unet2d", "unet3d"], base + 0.03)
    result = compare(scored)
    assert result["best"] == result["winner"] == "unet2d+unet3d"  # a lead the cases support
    assert [entry["significant"] for entry in result["comparisons"]] == [True, True]
