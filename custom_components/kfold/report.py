"""The cross-validation report: per-fold and out-of-fold Dice, their spread and confidence, fold balance, verdict.

Reads what the folds wrote (``metrics.json``, ``evaluation/evaluation.json``, ``failed.json``) and writes
``report.json``, ``report.md``, three PNG plots and the page ``report.html`` (custom_components.report) into the run
folder. Costs no inference, so it can be run at
any time, also on a run still in progress.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_components.figures import png_bytes, pyplot
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
from custom_components.kfold.scores import mean_or_none, out_of_fold, valid_scores
from custom_components.kfold.splits import KFoldError
from custom_components.metrics import CASE_METRICS, EMPTY_POLICY, METRIC_TITLES
from custom_components.metrics import summary as metric_summary
from custom_components.run_files import atomic_write_bytes, atomic_write_json

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the confidence interval is reproducible
WORST_CASES = 5  # the lowest out-of-fold cases named in the verdict section


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
    ensemble_path = output / ENSEMBLE_TEST_FILE
    if ensemble_path.is_file():
        ensemble = {"measured": True, **read_record(ensemble_path, ENSEMBLE_FIELDS, ENSEMBLE_FIX, ENSEMBLE_FIX)}
        ensemble["note"] = f"softmax average of {len(ensemble['models'])} fold models on the labelled test cases"
    else:
        ensemble = {
            "measured": False,
            "note": "not measured: dataset.json lists no `test` case with a label. Every training case was seen by "
            "all but one fold, so the ensemble has no fair validation case; the out-of-fold Dice estimates one "
            "fold model, and the ensemble is usually at least as good",
        }
    scored = [(f"{fold['name']}/{EVALUATION_FILE}", fold["dice_per_class"]) for fold in finished]
    if ensemble["measured"]:
        scored.append((str(ENSEMBLE_TEST_FILE), ensemble["dice_per_class"]))
    _check_classes(output, class_names, scored)
    oof = out_of_fold(finished, class_names)
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
    repeats = None
    if state["split_count"] > state["fold_count"]:
        per_repeat = []
        for repeat in range(state["split_count"] // state["fold_count"]):
            done = valid_scores([fold.get("mean_dice") for fold in finished if fold["repeat"] == repeat])
            per_repeat.append(mean_or_none(done))
        repeats = {"mean_dice_per_repeat": per_repeat, "spread": spread(valid_scores(per_repeat))}
    for fold in folds:
        fold.pop("cases", None)  # per-case scores live in out_of_fold
    report = {
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
    return report


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


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the verdict first, then the tables a reader checks it against."""
    names = report["classes"]
    summary = report["summary"]
    run = report["run"]
    lines = [
        f"# Cross-validation of `{run['bundle']}`",
        "",
        f"{len(report['folds'])} models: --folds {run['folds']} --repeats {run['repeats']} --seed {run['seed']} "
        f"--stratify {run['stratify']}"
        + (f" --group {run['group']}" if run["group"] else "")
        + f"; dataset `{run['dataset_dir']}`.",
        "",
        "## Verdict",
        "",
        report["verdict"]["text"] + ".",
        "",
    ]
    worst = sorted((s["mean_dice"], c) for c, s in report["out_of_fold"].items() if s["mean_dice"] is not None)
    if worst:
        lines += ["Lowest out-of-fold cases: " + ", ".join(f"{c} ({d:.3f})" for d, c in worst[:WORST_CASES]), ""]
    if report["failed"]:
        lines += ["Failed folds (see their logs): " + ", ".join(report["failed"]), ""]
    lines += ["## Summary", "", f"Dice is measured in the {report['dice_space']}.", ""]
    rows = []
    for label, fold_spread, oof in [("mean", summary["fold_mean_dice"], summary["oof_mean_dice"])] + [
        (name, summary["fold_dice_per_class"][name], summary["oof_dice_per_class"][name]) for name in names
    ]:
        ci = oof["ci95"]
        rows.append(
            [
                label,
                _number(fold_spread["mean"]),
                _number(fold_spread["std"]),
                "–" if fold_spread["cv"] is None else f"{fold_spread['cv']:.1%}",
                _number(oof["mean"]),
                "–" if ci is None else f"{ci[0]:.3f} – {ci[1]:.3f}",
            ]
        )
    lines += _table(["Dice", "fold mean", "fold std", "fold CV", "out-of-fold mean", "95% CI (bootstrap)"], rows)
    lines += [
        "",
        "Fold columns: MONAI MeanDice of each fold's best model on its validation cases. Out-of-fold: the "
        "mean over cases of each case's Dice from the model that did not see it; the interval resamples cases.",
        "",
    ]
    metrics = report["summary"].get("oof_metrics", {})
    if metrics:
        lines += ["## Out-of-fold metrics per class", ""]
        lines += _table(
            ["metric", "class", "mean", "median", "SD", "cases"],
            [
                [METRIC_TITLES[metric], name, *[_number(s[k]) for k in ("mean", "median", "sd")], s["n"]]
                for metric, per_class in metrics.items()
                for name, s in per_class.items()
            ],
        )
        lines += ["", f"Empty masks: {EMPTY_POLICY}.", ""]
    post = report.get("postprocessing")
    if post:
        lines += ["## Post-processing: largest connected component", ""]
        lines += _table(
            ["class", "out-of-fold Dice without", "with", "change", "verdict"],
            [
                [name, _number(e["dice_without"]), _number(e["dice_with"]), f"{e['change']:+.4f}", e["verdict"]]
                for name, e in post["per_class"].items()
            ],
        )
        chosen = json.dumps(post["recommended_postprocess"])
        lines += ["", f"Over {post['cases']} out-of-fold cases. Use it: `--postprocess '{chosen}'`.", ""]
    if report["repeats"]:
        per_repeat = ", ".join(_number(v) for v in report["repeats"]["mean_dice_per_repeat"])
        lines += [
            "## Repeats",
            "",
            f"Mean Dice per repeat: {per_repeat}; std {_number(report['repeats']['spread']['std'])}.",
            "",
        ]
    lines += ["## Folds", ""]
    lines += _table(
        ["fold", "status", "train", "val", "mean Dice", *names, "best epoch"],
        [
            [
                f["name"],
                f["status"],
                f["train_cases"],
                len(f["val_cases"]),
                _number(f.get("mean_dice")),
                *[_number(f.get("dice_per_class", {}).get(n)) for n in names],
                f.get("best_epoch", "–"),
            ]
            for f in report["folds"]
        ],
    )
    lines += ["", "## Ensemble", ""]
    ensemble = report["ensemble"]
    if ensemble["measured"]:
        lines += [
            f"{ensemble['note']} ({len(ensemble['cases'])} cases, {ensemble['space']}): mean Dice "
            f"{_number(ensemble['mean_dice'])}; "
            + ", ".join(f"{n} {_number(ensemble['dice_per_class'][n])}" for n in names)
            + "."
        ]
    else:
        lines += [ensemble["note"] + "."]
    lines += ["", "## Fold balance (validation cases)", ""]
    lines += _table(
        ["fold", "cases", *[f"with {n}" for n in names], "foreground median", "min", "max"],
        [
            [
                b["name"],
                b["cases"],
                *[b["class_cases"][n] for n in names],
                *[_number(b["foreground_size"][k], 0) for k in ("median", "min", "max")],
            ]
            for b in report["balance"]
        ],
    )
    lines += ["", "Foreground size in mm³ (mm² for 2D images).", "", "## Out-of-fold scores per case", ""]
    shown = [m for m in CASE_METRICS if all(m in s for s in report["out_of_fold"].values())]
    lines += _table(
        ["case", "fold(s)", "mean Dice", *[f"{METRIC_TITLES[m]} {n}" for m in shown for n in names]],
        [
            [case, ", ".join(s["folds"]), _number(s["mean_dice"]), *[_number(s[m][n]) for m in shown for n in names]]
            for case, s in sorted(report["out_of_fold"].items(), key=lambda item: item[1]["mean_dice"] or 0.0)
        ],
    )
    if report["missing_out_of_fold"]:
        lines += ["", "Not scored yet (their fold is not finished): " + ", ".join(report["missing_out_of_fold"])]
    lines += ["", "Plots: `fold_dice.png`, `case_dice.png`, `fold_balance.png`.", ""]
    return "\n".join(lines)


def plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """The three PNG plots: Dice per fold, out-of-fold Dice per case, class presence and size per fold."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    names = report["classes"]
    folds = [f for f in report["folds"] if f["status"] == "finished"]
    figures = {}

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(report["folds"])), 4))
    series = [("mean", "mean_dice", None)] + [(n, "dice_per_class", n) for n in names]
    width = 0.8 / len(series)
    for offset, (label, key, name) in enumerate(series):
        values = [(f[key] if name is None else f[key][name]) for f in folds]
        ax.bar(np.arange(len(folds)) + offset * width, [np.nan if v is None else v for v in values], width, label=label)
    mean = report["summary"]["fold_mean_dice"]["mean"]
    if mean is not None:
        ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="mean over folds")
    ax.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [f["name"] for f in folds], rotation=30, ha="right")
    ax.set(title="validation Dice per fold", ylabel="Dice", ylim=(0, 1))
    ax.legend(fontsize="small")
    figures["fold_dice.png"] = fig

    oof = sorted(report["out_of_fold"].items(), key=lambda item: item[1]["mean_dice"] or 0.0)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(oof)), 4))
    fold_names = sorted({s["folds"][0] for _, s in oof})
    colours = plt.get_cmap("tab10")
    ax.bar(
        range(len(oof)),
        [score["mean_dice"] or 0.0 for _, score in oof],
        color=[colours(fold_names.index(score["folds"][0]) % 10) for _, score in oof],
    )
    handles = [Patch(color=colours(index % 10), label=name) for index, name in enumerate(fold_names)]
    ax.set_xticks(range(len(oof)), [case for case, _ in oof], rotation=90, fontsize="small")
    ax.set(title="out-of-fold mean Dice per case, by scoring fold", ylabel="Dice", ylim=(0, 1))
    ax.legend(handles=handles, fontsize="small")
    figures["case_dice.png"] = fig

    balance = report["balance"]
    fig, (count_ax, size_ax) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(names), 1)
    for offset, name in enumerate(names):
        counts = [b["class_cases"][name] for b in balance]
        count_ax.bar(np.arange(len(balance)) + offset * width, counts, width, label=name)
    count_ax.set_xticks(
        np.arange(len(balance)) + 0.4 - width / 2, [b["name"] for b in balance], rotation=30, ha="right"
    )
    count_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    count_ax.set(title="validation cases containing each class", ylabel="cases")
    count_ax.legend(fontsize="small")
    size_ax.bar(
        range(len(balance)),
        [b["foreground_size"]["median"] for b in balance],
        yerr=[
            [b["foreground_size"]["median"] - b["foreground_size"]["min"] for b in balance],
            [b["foreground_size"]["max"] - b["foreground_size"]["median"] for b in balance],
        ],
        capsize=4,
    )
    size_ax.set_xticks(range(len(balance)), [b["name"] for b in balance], rotation=30, ha="right")
    size_ax.set(title="foreground size of validation cases (median, min-max)", ylabel="mm³ (mm² in 2D)")
    figures["fold_balance.png"] = fig

    encoded = {}
    for name, figure in figures.items():
        figure.tight_layout()
        encoded[name] = png_bytes(figure)
    return encoded
