"""The files of a cross-validation output folder, and which folds in it are finished.

Each fold folder is a training run, so a bundle of its own (``custom_components.run_bundle``): ``configs/``
(train, inference, evaluate: every key as the fold resolved it), ``models/model.pt`` (best weights),
``models/checkpoint_last.pt``, ``metrics.json``; the K-fold run adds ``fold.log``, ``evaluation/`` (the fold's
own evaluate.yaml scoring its validation cases) and, if a step failed, ``failed.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_components.bundle import expression_ids
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
# a cascade's second stage (custom_components.cascade): in its run folder the copy of the first stage, in a prediction
# folder the first stage's label maps; in a case, the key of its first-stage label map
STAGE_DIR = "previous_stage"
PREVIOUS_KEY = "previous"
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


# What restores a damaged file of the output folder: `kfold run` writes it again, as it did, from the run's options.
KFOLD_RUN = "start `python -m custom_components.kfold run` again with the options the run was started with"
STATE_FIX = f"delete it and {KFOLD_RUN} (add --print-commands to rewrite it without training); finished folds are kept"
REMADE_FIX = f"delete it and {KFOLD_RUN}: it is made again, as before, from dataset.json and --seed"
SCORE_FIX = f"delete it and {KFOLD_RUN}: the fold is scored again"
ENSEMBLE_FIX = f"delete it and {KFOLD_RUN}: the ensemble is scored again on the test cases"
FAILED_FIX = f"delete it: it only records the step that failed; {KFOLD_RUN} to retry the fold"
FOLD_FIX = f"delete that fold's folder and {KFOLD_RUN}: the fold trains again, the others are kept"
NOT_A_RUN = "pass the --output folder of `python -m custom_components.kfold run`"

Field = tuple[str, Callable[[Any], bool]]  # what a value of a record must be (for the message), and the test
Rule = Callable[[dict[str, Any]], list[str]]  # the problems across fields of a record whose fields passed


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive(value: Any) -> bool:
    return is_whole(value) and value > 0


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_text(value: Any) -> bool:
    return isinstance(value, str)


def is_name(value: Any) -> bool:
    """A name (a class, a bundle): text that no MONAI config parser would evaluate."""
    return isinstance(value, str) and bool(value) and not expression_ids(value)


def optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def is_names(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_name(item) for item in value)


def is_mapping(value: Any) -> bool:
    return isinstance(value, dict)


def is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(is_text(item) for item in value)


# The fields of kfold.json that `kfold report`, `kfold predict` and `kfold select` read, and what each must be.
STATE_FIELDS: dict[str, Field] = {
    "bundle": ("a folder path", is_text),
    "dataset_dir": ("a folder path", is_text),
    "folds": ("a number of folds or null", optional(is_positive)),
    "repeats": ("a number of repeats", is_positive),
    "seed": ("a whole number", is_whole),
    "stratify": ("text", is_text),
    "group": ("a dataset.json field or null", optional(is_text)),
    "splits_file": ("a file path or null", optional(is_text)),
    "overrides": ("an object of bundle keys", is_mapping),
    "class_names": ("a list of class names (text, none starting with $, @ or %)", is_names),
    "num_classes": ("a number of classes", is_positive),
    "image_dims": ("2 or 3", lambda value: is_whole(value) and value in (2, 3)),
    "max_epochs": ("a number of epochs", is_positive),
    "fold_count": ("a number of folds", is_positive),
    "split_count": ("a number of splits", is_positive),
}


METRICS_FIELDS: dict[str, Field] = {"epochs": ("a number of epochs", is_whole)}  # what decides a fold is trained
SPLIT_FIELDS: dict[str, Field] = {"train": ("a list of case ids", is_texts), "val": ("a list of case ids", is_texts)}
# ensemble/test_dice.json: what `kfold run` and the report read back
ENSEMBLE_FIELDS: dict[str, Field] = {
    "models": ("a list of fold names", is_texts),
    "mean_dice": ("a Dice or null", optional(is_number)),
    "dice_per_class": ("an object of class names to Dice", is_mapping),
    "cases": ("an object of case ids to scores", is_mapping),
    "space": ("text", is_text),
}
CASE_FIELDS: dict[str, Field] = {
    "case": ("a case id", is_text),
    "classes": ("a list of class names", is_texts),
    "foreground_size": ("a size", is_number),
}


def _state_rules(state: dict[str, Any]) -> list[str]:
    problems = []
    if state["num_classes"] != len(state["class_names"]) + 1:
        problems.append(f"num_classes {state['num_classes']} is not 1 + the {len(state['class_names'])} class_names")
    if state["split_count"] % state["fold_count"]:
        problems.append(f"split_count {state['split_count']} is not a multiple of fold_count {state['fold_count']}")
    return problems


def _shown(value: Any) -> str:
    """A value of a record for a message: its JSON, cut short."""
    shown = json.dumps(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def read_json(path: Path, missing: str, damaged: str) -> Any:
    """A JSON file of the output folder as data; a missing one is a message saying ``missing`` (which command
    writes it), one that is not JSON (cut off, overwritten) a message naming it and saying ``damaged``."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise KFoldError(f"{path} is missing: {missing}") from None
    except OSError as err:
        raise KFoldError(f"{path} cannot be read ({err.strerror}): {damaged}") from None
    try:
        return json.loads(content)
    except ValueError as err:  # JSONDecodeError, or bytes that are not text
        reason = f"{err.msg}, line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else err
        raise KFoldError(f"{path} is damaged (not JSON: {reason}): {damaged}") from None


def read_checked(path: Path, missing: str, damaged: str, problems: Callable[[Any], list[str]]) -> Any:
    """A JSON file of the output folder as data (:func:`read_json`) whose content ``problems`` finds nothing wrong
    with; else every problem in one message naming the file and ``damaged`` (the fix)."""
    content = read_json(path, missing, damaged)
    found = problems(content)
    if found:
        raise KFoldError(f"{path} is damaged ({'; '.join(found)}): {damaged}")
    return content


def record_problems(record: Any, fields: Mapping[str, Field], rules: Sequence[Rule] = ()) -> list[str]:
    """What is wrong with a JSON object whose readers rely on ``fields``: each field missing or of another kind,
    then (all fields right) the problems ``rules`` find across them."""
    if not isinstance(record, dict):
        return [f"it holds {_shown(record)}, not an object"]
    problems = [
        f"{key} is missing" if key not in record else f"{key} {_shown(record[key])} is not {what}"
        for key, (what, test) in fields.items()
        if key not in record or not test(record[key])
    ]
    return problems or [problem for rule in rules for problem in rule(record)]


def read_record(
    path: Path, fields: Mapping[str, Field], missing: str, damaged: str, rules: Sequence[Rule] = ()
) -> dict[str, Any]:
    """A JSON object of the output folder (kfold.json, select.json, selection.json, a fold's metrics.json) with the
    ``fields`` its readers rely on checked, then ``rules`` across them (:func:`record_problems`). Its values stay
    data: nothing read here reaches a config parser or a command line unchecked."""
    return read_checked(path, missing, damaged, lambda record: record_problems(record, fields, rules))


def read_list(
    path: Path, fields: Mapping[str, Field], missing: str, damaged: str = REMADE_FIX, count: int | None = None
) -> list[dict[str, Any]]:
    """A JSON list of objects of the output folder (splits.json, cases.json), ``count`` of them when given, each
    with the ``fields`` its readers rely on checked."""

    def problems(items: Any) -> list[str]:
        if not isinstance(items, list):
            return [f"it holds {_shown(items)}, not a list"]
        found = [
            f"[{index}] {problem}" for index, item in enumerate(items) for problem in record_problems(item, fields)
        ]
        if count is not None and len(items) != count:
            found.append(f"it holds {len(items)} entries where kfold.json counts {count}")
        return found

    return read_checked(path, missing, damaged, problems)


def read_state(output: Path, missing: str = NOT_A_RUN, damaged: str = STATE_FIX) -> dict[str, Any]:
    """The run's ``kfold.json``, its fields checked (:data:`STATE_FIELDS`); a folder without one was not made by
    ``kfold run``."""
    return read_record(output / STATE_FILE, STATE_FIELDS, missing, damaged, [_state_rules])


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
    values = read_record(metrics, METRICS_FIELDS, FOLD_FIX, FOLD_FIX)
    return bool(values.get("stopped")) or values.get("epochs", 0) >= max_epochs


def fold_finished(path: Path, max_epochs: int) -> bool:
    """Trained for ``max_epochs`` and scored: ``metrics.json`` says so and ``evaluation/evaluation.json`` exists."""
    return (path / EVALUATION_FILE).is_file() and training_finished(path, max_epochs)
