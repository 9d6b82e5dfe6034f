"""The files of a cross-validation output folder, and which folds in it are finished.

Each fold folder is a training run, so a bundle of its own (``custom_components.run_bundle``): ``configs/``
(train, inference, evaluate: every key as the fold resolved it), ``models/model.pt`` (best weights),
``models/checkpoint_last.pt``, ``metrics.json``; the K-fold run adds ``fold.log``, ``evaluation/`` (the fold's
own evaluate.yaml scoring its validation cases) and, if a step failed, ``failed.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_components.kfold.splits import KFoldError

STATE_FILE = "kfold.json"  # the options of the run and what was read from the bundle and dataset.json (data only)
CASES_FILE = "cases.json"  # per case: classes present, foreground size, dataset.json fields
SPLITS_FILE = "splits.json"  # nnU-Net splits_final.json form, written before any training
FAILED_FILE = "failed.json"  # in a fold folder: the step that failed, its exit status and log
METRICS_FILE = "metrics.json"  # in a fold folder: written by training (epochs trained, best Dice)
EVALUATION_DIR = "evaluation"  # in a fold folder: where its own configs/evaluate.yaml writes the scores
EVALUATION_FILE = Path(EVALUATION_DIR) / "evaluation.json"
INFERENCE_CONFIG = Path("configs") / "inference.yaml"  # in a fold folder: the fold's model as a bundle predicts
METADATA_FILE = Path("configs") / "metadata.json"  # in a run folder: its model's inputs, outputs and labels
PREDICTIONS_DIR = Path(EVALUATION_DIR) / "predictions"  # in a run folder: the scored cases' label maps
EVALUATE_CONFIG = Path("configs") / "evaluate.yaml"  # in a fold folder: the fold's model scored on its val cases
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


def training_finished(path: Path, max_epochs: int) -> bool:
    """The fold's ``metrics.json`` says it trained ``max_epochs`` epochs, or ended before by design (its time budget
    or early stopping: ``stopped``)."""
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        return False
    values = json.loads(metrics.read_text())
    return bool(values.get("stopped")) or values.get("epochs", 0) >= max_epochs


def fold_finished(path: Path, max_epochs: int) -> bool:
    """Trained for ``max_epochs`` and scored: ``metrics.json`` says so and ``evaluation/evaluation.json`` exists."""
    return (path / EVALUATION_FILE).is_file() and training_finished(path, max_epochs)
