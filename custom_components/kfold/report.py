"""The cross-validation report: per-fold and out-of-fold Dice, their spread and confidence, fold balance, verdict.

Reads what the folds wrote (``metrics.json``, ``evaluation/evaluation.json``, ``failed.json``) into the report
(:func:`build_report`), and writes it as ``report.json``, ``report.md`` (``report_markdown``), three PNG plots
(``report_figures``) and the page ``report.html`` (custom_components.report) into the run folder. Costs no
inference, so it can be run at any time, also on a run still in progress.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_components.kfold.evaluation import DICE_SPACE, postprocess_effects
from custom_components.kfold.layout import (
    CASE_FIELDS,
    CASES_FILE,
    ENSEMBLE_FIELDS,
    ENSEMBLE_FIX,
    ENSEMBLE_TEST_FILE,
    EVALUATION_FILE,
    FAILED_FILE,
    FAILED_FIX,
    FOLD_FIX,
    IDENTITY,
    METRICS_FILE,
    REMADE_FIX,
    SCORE_FIX,
    SPLIT_FIELDS,
    SPLITS_FILE,
    STATE_FILE,
    STATE_FIX,
    Field,
    Fold,
    fold_finished,
    fold_layout,
    is_mapping,
    is_number,
    optional,
    read_json,
    read_list,
    read_record,
    read_state,
)
from custom_components.kfold.report_figures import plots
from custom_components.kfold.report_markdown import markdown
from custom_components.kfold.scores import mean_or_none, out_of_fold, valid_scores
from custom_components.kfold.splits import KFoldError
from custom_components.metrics import CASE_METRICS
from custom_components.metrics import summary as metric_summary
from custom_components.run_files import atomic_write_bytes, atomic_write_json

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the confidence interval is reproducible


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation, coefficient of variation (std / mean), min and max of ``values``."""
    array = np.asarray(values, dtype=float)
    if not array.size:
        return {"n": 0, "mean": None, "std": None, "cv": None, "min": None, "max": None}
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if array.size > 1 else None
    cv = std / mean if std is not None and mean > 0 else None
    return {
        "n": int(array.size),
        "mean": mean,
        "std": std,
        "cv": cv,
        "min": float(array.min()),
        "max": float(array.max()),
    }


def bootstrap_ci(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (resampling cases with replacement), seeded."""
    array = np.asarray(values, dtype=float)
    if array.size < 2:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = array[rng.integers(0, array.size, (BOOTSTRAP_RESAMPLES, array.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


# The fields of a fold's evaluation.json that the report reads (per-case scores are keyed by the class names too).
EVALUATION_FIELDS: dict[str, Field] = {
    "mean_dice": ("a Dice or null", optional(is_number)),
    "dice_per_class": ("an object of class names to Dice", is_mapping),
    "cases": ("an object of case ids to scores", is_mapping),
}


def _fold_entry(fold: Fold, split: Mapping[str, list[str]], max_epochs: int) -> dict[str, Any]:
    """One fold's row: its status, cases and scores (scores only once it is finished)."""
    entry: dict[str, Any] = {
        "name": fold.name,
        "index": fold.index,
        "repeat": fold.repeat,
        "fold": fold.fold,
        "train_cases": len(split["train"]),
        "val_cases": list(split["val"]),
        "status": "not finished",
    }
    failure = fold.path / FAILED_FILE
    if failure.is_file():
        entry.update(status="failed", failure=read_json(failure, FAILED_FIX, FAILED_FIX))
    if not fold_finished(fold.path, max_epochs):
        return entry
    metrics = read_json(fold.path / METRICS_FILE, FOLD_FIX, FOLD_FIX)  # an object: fold_finished checked it
    evaluation = read_record(fold.path / EVALUATION_FILE, EVALUATION_FIELDS, SCORE_FIX, SCORE_FIX)
    entry.update(
        status="finished",
        mean_dice=evaluation["mean_dice"],
        dice_per_class=evaluation["dice_per_class"],
        cases=evaluation["cases"],
        best_epoch=metrics.get("best_epoch"),
        epochs=metrics.get("epochs"),
        wall_time_s=metrics.get("wall_time_s"),
    )
    return entry


def _postprocessing(oof: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any] | None:
    """Whether keeping the largest component raises each class's out-of-fold Dice, and the `postprocess` value
    that follows (the classes where it does), as nnU-Net decides its post-processing; None before any fold."""
    effects = [
        torch.tensor([[case["largest_component_dice"][n][w] for w in ("without", "with")] for n in class_names])
        for case in oof.values()
        if "largest_component_dice" in case
    ]
    if not effects:
        return None
    per_class = postprocess_effects(effects, class_names)
    chosen = [name for name, effect in per_class.items() if effect["verdict"] == "raises"]
    return {"cases": len(effects), "per_class": per_class, "recommended_postprocess": chosen}


def _balance(folds: Sequence[Mapping[str, Any]], cases: Sequence[Mapping[str, Any]], state: Mapping) -> list[dict]:
    """Per fold, what its validation cases hold: classes present, foreground size and the stratify/group field."""
    by_id = {case["case"]: case for case in cases}
    rows = []
    for fold in folds:
        val = [by_id[c] for c in fold["val_cases"]]
        sizes = [case["foreground_size"] for case in val]
        row: dict[str, Any] = {
            "name": fold["name"],
            "cases": len(val),
            "class_cases": {name: sum(name in case["classes"] for case in val) for name in state["class_names"]},
            "foreground_size": {"median": float(np.median(sizes)), "min": min(sizes), "max": max(sizes)},
        }
        for option, key in (("stratify", state["stratify"]), ("group", state["group"])):
            if key and key not in ("auto", "none"):
                row[option] = dict(sorted(Counter(str(case.get(key)) for case in val).items()))
        rows.append(row)
    return rows


def _verdict(fold_spread: Mapping[str, Any], threshold: float, repeat_spread: Mapping[str, Any] | None) -> dict:
    """Stable or not in words: the coefficient of variation of the fold mean Dice against ``threshold``."""
    if fold_spread["n"] < 2 or fold_spread["cv"] is None:
        text = f"cannot judge: {fold_spread['n']} fold(s) finished with a positive mean Dice, at least 2 are needed"
        return {"stable": None, "text": text, "cv_threshold": threshold}
    mean, std, cv = fold_spread["mean"], fold_spread["std"], fold_spread["cv"]
    stable = cv <= threshold
    text = f"fold mean Dice {mean:.3f} ± {std:.3f}, a coefficient of variation of {cv:.1%} "
    if stable:
        text = "stable: " + text + f"(threshold {threshold:.0%}): the folds agree"
    else:
        text = (
            "unstable: "
            + text
            + f"(above the {threshold:.0%} threshold): one split of this dataset would be a coin toss; check the "
            "worst out-of-fold cases, and add cases or --repeats"
        )
    if repeat_spread and repeat_spread["cv"] is not None:
        text += f". Across repeats the mean Dice varies by {repeat_spread['cv']:.1%}"
    return {"stable": stable, "text": text, "cv_threshold": threshold}


def _check_classes(output: Path, class_names: Sequence[str], scored: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """kfold.json's class_names must be the classes each scores file (a finished fold's evaluation.json, written
    from the fold's own configs; the ensemble's test Dice) holds: the report looks the scores up by them."""
    differ = [f"{path} scores {list(per_class)}" for path, per_class in scored if list(per_class) != list(class_names)]
    if differ:
        raise KFoldError(
            f"{output / STATE_FILE} is damaged (class_names {list(class_names)} are not the classes the folds scored: "
            f"{'; '.join(differ)}): {STATE_FIX}"
        )


def _ensemble(output: Path) -> dict[str, Any]:
    """The fold ensemble's scores on dataset.json's labelled test cases, or why there are none."""
    ensemble_path = output / ENSEMBLE_TEST_FILE
    if not ensemble_path.is_file():
        return {
            "measured": False,
            "note": "not measured: dataset.json lists no `test` case with a label. Every training case was seen by "
            "all but one fold, so the ensemble has no fair validation case; the out-of-fold Dice estimates one "
            "fold model, and the ensemble is usually at least as good",
        }
    ensemble = {"measured": True, **read_record(ensemble_path, ENSEMBLE_FIELDS, ENSEMBLE_FIX, ENSEMBLE_FIX)}
    ensemble["note"] = f"softmax average of {len(ensemble['models'])} fold models on the labelled test cases"
    return ensemble


def _summary(
    finished: Sequence[Mapping[str, Any]], oof: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]
) -> dict[str, Any]:
    """The folds' Dice spread, the out-of-fold Dice with its bootstrap interval, and the out-of-fold metrics, each
    mean and per class."""
    case_means = valid_scores([score["mean_dice"] for score in oof.values()])
    summary = {
        "folds_finished": len(finished),
        "fold_mean_dice": spread(valid_scores([fold["mean_dice"] for fold in finished])),
        "fold_dice_per_class": {
            name: spread(valid_scores([fold["dice_per_class"][name] for fold in finished])) for name in class_names
        },
        "oof_mean_dice": {
            "cases": len(case_means),
            "mean": mean_or_none(case_means),
            "ci95": bootstrap_ci(case_means),
        },
        "oof_dice_per_class": {},
    }
    for name in class_names:
        values = valid_scores([score["dice"][name] for score in oof.values()])
        summary["oof_dice_per_class"][name] = {
            "cases": len(values),
            "mean": mean_or_none(values),
            "ci95": bootstrap_ci(values),
        }
    summary["oof_metrics"] = {
        metric: {name: metric_summary([score[metric][name] for score in oof.values()]) for name in class_names}
        for metric in CASE_METRICS
        if oof and all(metric in score for score in oof.values())
    }
    return summary


def _repeats(finished: Sequence[Mapping[str, Any]], state: Mapping[str, Any]) -> dict[str, Any] | None:
    """With ``--repeats``, the mean Dice of each repeat's finished folds and their spread; None without."""
    if state["split_count"] <= state["fold_count"]:
        return None
    per_repeat = []
    for repeat in range(state["split_count"] // state["fold_count"]):
        done = valid_scores([fold.get("mean_dice") for fold in finished if fold["repeat"] == repeat])
        per_repeat.append(mean_or_none(done))
    return {"mean_dice_per_repeat": per_repeat, "spread": spread(valid_scores(per_repeat))}


def build_report(output: Path, cv_threshold: float = 0.1) -> dict[str, Any]:
    """The report of the run in ``output`` as a dict (what ``report.json`` holds)."""
    state = read_state(output)
    splits = read_list(output / SPLITS_FILE, SPLIT_FIELDS, "start the run with `kfold run`", count=state["split_count"])
    cases = read_list(output / CASES_FILE, CASE_FIELDS, "start the run with `kfold run`")
    unlisted = sorted({case for split in splits for case in split["val"]} - {case["case"] for case in cases})
    if unlisted:
        raise KFoldError(f"{output / CASES_FILE} is damaged (it lacks {', '.join(unlisted)}): {REMADE_FIX}")
    class_names = state["class_names"]
    layout = fold_layout(output, state["fold_count"], state["split_count"])
    folds = [_fold_entry(fold, splits[fold.index], state["max_epochs"]) for fold in layout]
    finished = [fold for fold in folds if fold["status"] == "finished"]
    ensemble = _ensemble(output)
    scored = [(f"{fold['name']}/{EVALUATION_FILE}", fold["dice_per_class"]) for fold in finished]
    if ensemble["measured"]:
        scored.append((str(ENSEMBLE_TEST_FILE), ensemble["dice_per_class"]))
    _check_classes(output, class_names, scored)
    oof = out_of_fold(finished, class_names)
    summary = _summary(finished, oof, class_names)
    repeats = _repeats(finished, state)
    for fold in folds:
        fold.pop("cases", None)  # per-case scores live in out_of_fold
    return {
        "run": {key: state[key] for key in (*IDENTITY, "max_epochs")},
        "classes": class_names,
        "dice_space": DICE_SPACE,
        "folds": folds,
        "summary": summary,
        "repeats": repeats,
        "verdict": _verdict(summary["fold_mean_dice"], cv_threshold, repeats["spread"] if repeats else None),
        "out_of_fold": oof,
        "postprocessing": _postprocessing(oof, class_names),
        "missing_out_of_fold": sorted({c for s in splits for c in s["val"]} - set(oof)),
        "balance": _balance(folds, cases, state),
        "ensemble": ensemble,
        "failed": [fold["name"] for fold in folds if fold["status"] == "failed"],
    }


def write_report(output: str | Path, cv_threshold: float = 0.1) -> dict[str, Any]:
    """Write ``report.json``, ``report.md``, the plots and ``report.html`` of the run in ``output``; returns the
    report."""
    from custom_components.report import write_report as write_page  # the page reads report.json: after it

    output = Path(output).resolve()
    report = build_report(output, cv_threshold)
    atomic_write_json(report, output / "report.json")
    atomic_write_bytes(output / "report.md", markdown(report).encode())
    for name, figure in plots(report).items():
        atomic_write_bytes(output / name, figure)
    write_page(output)
    return report
