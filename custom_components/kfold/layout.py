"""The files of a cross-validation output folder, and which folds in it are finished."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_components.kfold.splits import KFoldError

STATE_FILE = "kfold.json"  # the options of the run and what was read from the bundle and dataset.json
CASES_FILE = "cases.json"  # per case: classes present, foreground size, dataset.json fields
SPLITS_FILE = "splits.json"  # nnU-Net splits_final.json form, written before any training
FAILED_FILE = "failed.json"  # in a fold folder: the step that failed, its exit status and log
EVALUATION_FILE = Path("evaluation") / "evaluation.json"  # in a fold folder: written by the evaluate.yaml overlay
ENSEMBLE_TEST_FILE = Path("ensemble") / "test_dice.json"  # the fold ensemble scored on dataset.json's test cases
# The options that define a run: starting it again with other values would mix folds of two experiments.
IDENTITY = ("bundle", "dataset_dir", "folds", "repeats", "seed", "stratify", "group", "splits_file", "overrides")


@dataclass(frozen=True)
class Fold:
    """One trained model of the cross-validation: entry ``index`` of splits.json, fold ``fold`` of ``repeat``."""

    index: int
    repeat: int
    fold: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the output folder, or a message saying which command writes it."""
    if not path.is_file():
        raise KFoldError(f"{path} is missing: {what}")
    return json.loads(path.read_text())


def read_state(output: Path) -> dict[str, Any]:
    """The run's ``kfold.json``; a folder without one was not made by ``kfold run``."""
    return read_json(output / STATE_FILE, "pass the --output folder of `python -m custom_components.kfold run`")


def fold_layout(output: Path, folds: int, count: int) -> list[Fold]:
    """The folds of ``count`` splits.json entries in folds of ``folds``: ``fold_K``, or ``repeat_R_fold_K``."""
    repeated = count > folds
    return [
        Fold(
            index,
            *divmod(index, folds),
            output / (f"repeat_{index // folds}_fold_{index % folds}" if repeated else f"fold_{index}"),
        )
        for index in range(count)
    ]


def fold_finished(path: Path, max_epochs: int) -> bool:
    """Trained for ``max_epochs`` and scored: ``metrics.json`` says so and ``evaluation.json`` exists."""
    metrics = path / "metrics.json"
    if not (metrics.is_file() and (path / EVALUATION_FILE).is_file()):
        return False
    return json.loads(metrics.read_text()).get("epochs", 0) >= max_epochs
