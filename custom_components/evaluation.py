"""Which labelled cases an ``evaluate.yaml`` scores, checked against the model before anything is read.

A run folder's ``evaluate.yaml`` scores its own validation cases on the dataset it was trained on, and every
labelled case (``training`` entries and ``test`` entries with a label) on any other MSD dataset whose classes are
the model's. A run trained with ``num_folds: 1`` held no case out: on its own dataset it is refused, on another one
every labelled case is scored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from custom_components.data import DatasetError, _exit_on_dataset_error, check_datalist, split_datalist

CASES = ("auto", "validation", "all")


def labelled_cases(description: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``training`` entries and the ``test`` entries that have a label."""
    tests = [entry for entry in description.get("test", []) if isinstance(entry, dict) and "label" in entry]
    return [*description["training"], *tests]


def evaluation_cases(
    description: dict[str, Any],
    dataset_dir: str | Path,
    class_names: Sequence[str],
    image_dims: int,
    cases: str,
    training_dataset_dir: str | Path,
    fold: int,
    num_folds: int,
    seed: int,
    splits_file: str | Path | None,
) -> list[dict[str, Any]]:
    """The checked cases to score (absolute paths); see the module docstring for ``cases``."""
    if cases not in CASES:
        raise DatasetError(f"cases {cases!r}: choose one of {', '.join(CASES)}")
    declared = [name for value, name in sorted(description["labels"].items(), key=lambda kv: int(kv[0]))][1:]
    if list(declared) != list(class_names):
        raise DatasetError(
            f"{Path(dataset_dir) / 'dataset.json'} declares the classes {declared} but the model segments "
            f"{list(class_names)}: evaluate on a dataset labelled with the model's classes"
        )
    same = os.path.realpath(dataset_dir) == os.path.realpath(training_dataset_dir)
    if cases == "auto":
        cases = "validation" if same else "all"
    num_classes = len(class_names) + 1
    if cases == "all":
        labelled = {**description, "training": labelled_cases(description)}
        return check_datalist(labelled, dataset_dir, num_classes, image_dims)
    datalist = check_datalist(description, dataset_dir, num_classes, image_dims)
    validation = split_datalist(datalist, fold, num_folds, seed, splits_file)[1]
    if not validation:
        how = f"fold {fold} of {splits_file} lists no validation case" if splits_file else f"num_folds {num_folds}"
        raise DatasetError(
            f"this run trained on every case of {dataset_dir} ({how}): none was held out to score it on. Evaluate "
            "on another labelled dataset with --dataset_dir DIR"
        )
    return validation


read_evaluation_cases = _exit_on_dataset_error(evaluation_cases)
