"""The three PNG plots of a cross-validation report: Dice per fold, out-of-fold Dice per case, and what each fold's
validation cases hold (classes present, foreground size).

Drawn from the report (what ``report.json`` holds, :func:`custom_components.kfold.report.build_report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from custom_components.figures import png_bytes, pyplot


def _png(figure: Any) -> bytes:
    figure.tight_layout()
    return png_bytes(figure)


def _fold_dice(report: Mapping[str, Any]) -> bytes:
    """Each finished fold's mean and per-class Dice as bars, the mean over folds as a line."""
    folds = [f for f in report["folds"] if f["status"] == "finished"]
    fig, ax = pyplot().subplots(figsize=(max(6, 1.2 * len(report["folds"])), 4))
    series = [("mean", "mean_dice", None)] + [(n, "dice_per_class", n) for n in report["classes"]]
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
    return _png(fig)


def _case_dice(report: Mapping[str, Any]) -> bytes:
    """Each case's out-of-fold mean Dice, lowest first, coloured by the fold that scored it."""
    from matplotlib.patches import Patch

    plt = pyplot()
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
    return _png(fig)


def _fold_balance(report: Mapping[str, Any]) -> bytes:
    """Per fold, the validation cases containing each class, and their foreground size (median, min-max)."""
    from matplotlib.ticker import MaxNLocator

    names = report["classes"]
    balance = report["balance"]
    fig, (count_ax, size_ax) = pyplot().subplots(1, 2, figsize=(11, 4))
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
    return _png(fig)


def plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """The report's PNG plots by file name: ``fold_dice.png``, ``case_dice.png``, ``fold_balance.png``."""
    return {
        "fold_dice.png": _fold_dice(report),
        "case_dice.png": _case_dice(report),
        "fold_balance.png": _fold_balance(report),
    }
