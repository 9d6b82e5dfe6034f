"""``report.md`` of a cross-validation: the verdict first, then the tables a reader checks it against.

Written from the report (what ``report.json`` holds, :func:`custom_components.kfold.report.build_report`), one
function a section.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from custom_components.metrics import CASE_METRICS, EMPTY_POLICY, METRIC_TITLES

WORST_CASES = 5  # the lowest out-of-fold cases named in the verdict section


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _verdict(report: Mapping[str, Any]) -> list[str]:
    """The title, the run's options, the verdict, the lowest out-of-fold cases and the failed folds."""
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
    return lines


def _summary(report: Mapping[str, Any]) -> list[str]:
    """Fold and out-of-fold Dice, mean and per class, with the folds' spread and the bootstrap interval."""
    summary = report["summary"]
    rows = []
    for label, fold_spread, oof in [("mean", summary["fold_mean_dice"], summary["oof_mean_dice"])] + [
        (name, summary["fold_dice_per_class"][name], summary["oof_dice_per_class"][name]) for name in report["classes"]
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
    lines = ["## Summary", "", f"Dice is measured in the {report['dice_space']}.", ""]
    lines += _table(["Dice", "fold mean", "fold std", "fold CV", "out-of-fold mean", "95% CI (bootstrap)"], rows)
    return lines + [
        "",
        "Fold columns: MONAI MeanDice of each fold's best model on its validation cases. Out-of-fold: the "
        "mean over cases of each case's Dice from the model that did not see it; the interval resamples cases.",
        "",
    ]


def _metrics(report: Mapping[str, Any]) -> list[str]:
    """The out-of-fold surface metrics per class (HD95, NSD), when every case has them."""
    metrics = report["summary"].get("oof_metrics", {})
    if not metrics:
        return []
    lines = ["## Out-of-fold metrics per class", ""]
    lines += _table(
        ["metric", "class", "mean", "median", "SD", "cases"],
        [
            [METRIC_TITLES[metric], name, *[_number(s[k]) for k in ("mean", "median", "sd")], s["n"]]
            for metric, per_class in metrics.items()
            for name, s in per_class.items()
        ],
    )
    return lines + ["", f"Empty masks: {EMPTY_POLICY}.", ""]


def _postprocessing(report: Mapping[str, Any]) -> list[str]:
    """Per class, whether keeping the largest connected component raises the out-of-fold Dice."""
    post = report.get("postprocessing")
    if not post:
        return []
    lines = ["## Post-processing: largest connected component", ""]
    lines += _table(
        ["class", "out-of-fold Dice without", "with", "change", "verdict"],
        [
            [name, _number(e["dice_without"]), _number(e["dice_with"]), f"{e['change']:+.4f}", e["verdict"]]
            for name, e in post["per_class"].items()
        ],
    )
    chosen = json.dumps(post["recommended_postprocess"])
    return lines + ["", f"Over {post['cases']} out-of-fold cases. Use it: `--postprocess '{chosen}'`.", ""]


def _repeats(report: Mapping[str, Any]) -> list[str]:
    """The mean Dice of each repeat and their spread, with ``--repeats``."""
    if not report["repeats"]:
        return []
    per_repeat = ", ".join(_number(v) for v in report["repeats"]["mean_dice_per_repeat"])
    return [
        "## Repeats",
        "",
        f"Mean Dice per repeat: {per_repeat}; std {_number(report['repeats']['spread']['std'])}.",
        "",
    ]


def _folds(report: Mapping[str, Any]) -> list[str]:
    """Each fold's status, case counts, Dice and best epoch."""
    names = report["classes"]
    lines = ["## Folds", ""]
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
    return lines + [""]


def _ensemble(report: Mapping[str, Any]) -> list[str]:
    """The fold ensemble's Dice on the labelled test cases, or why it was not measured."""
    ensemble = report["ensemble"]
    if not ensemble["measured"]:
        return ["## Ensemble", "", ensemble["note"] + ".", ""]
    return [
        "## Ensemble",
        "",
        f"{ensemble['note']} ({len(ensemble['cases'])} cases, {ensemble['space']}): mean Dice "
        f"{_number(ensemble['mean_dice'])}; "
        + ", ".join(f"{n} {_number(ensemble['dice_per_class'][n])}" for n in report["classes"])
        + ".",
        "",
    ]


def _balance(report: Mapping[str, Any]) -> list[str]:
    """Per fold, the validation cases containing each class and their foreground size."""
    names = report["classes"]
    lines = ["## Fold balance (validation cases)", ""]
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
    return lines + ["", "Foreground size in mm³ (mm² for 2D images).", ""]


def _cases(report: Mapping[str, Any]) -> list[str]:
    """Each case's out-of-fold scores, lowest mean Dice first, and the cases not scored yet."""
    names = report["classes"]
    shown = [m for m in CASE_METRICS if all(m in s for s in report["out_of_fold"].values())]
    lines = ["## Out-of-fold scores per case", ""]
    lines += _table(
        ["case", "fold(s)", "mean Dice", *[f"{METRIC_TITLES[m]} {n}" for m in shown for n in names]],
        [
            [case, ", ".join(s["folds"]), _number(s["mean_dice"]), *[_number(s[m][n]) for m in shown for n in names]]
            for case, s in sorted(report["out_of_fold"].items(), key=lambda item: item[1]["mean_dice"] or 0.0)
        ],
    )
    if report["missing_out_of_fold"]:
        lines += ["", "Not scored yet (their fold is not finished): " + ", ".join(report["missing_out_of_fold"])]
    return lines + ["", "Plots: `fold_dice.png`, `case_dice.png`, `fold_balance.png`.", ""]


SECTIONS = (_verdict, _summary, _metrics, _postprocessing, _repeats, _folds, _ensemble, _balance, _cases)


def markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the verdict first, then the tables a reader checks it against."""
    return "\n".join(line for section in SECTIONS for line in section(report))
