"""Out-of-fold scores: each case scored by the models of the folds that did not train on it.

Read by the K-fold report (``report.json``) and by the report page of a K-fold folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from custom_components.metrics import CASE_METRICS


def valid_scores(values: Sequence[float | None]) -> list[float]:
    """The values that are scores: None (not scored) and NaN (undefined, a class absent from the reference) left
    out."""
    return [v for v in values if v is not None and not math.isnan(v)]


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values``; None for none."""
    return float(np.mean(values)) if len(values) else None


def out_of_fold(folds: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each case scored by the model(s) that did not see it; with repeats, averaged over its repeats.

    ``folds``: ``{"name", "cases"}`` with ``cases`` as a fold's evaluation.json holds them; a metric is given for a
    case when every fold that scored it has it."""
    scores: dict[str, list[tuple[str, dict]]] = {}
    for fold in folds:
        for case, score in fold.get("cases", {}).items():
            scores.setdefault(case, []).append((fold["name"], score))
    result = {}
    for case, entries in sorted(scores.items()):
        means = valid_scores([score["mean_dice"] for _, score in entries])
        result[case] = {
            "folds": [name for name, _ in entries],
            "mean_dice": mean_or_none(means),
            "repeat_std": float(np.std(means, ddof=1)) if len(means) > 1 else None,
        }
        for metric in CASE_METRICS:
            if all(score.get(metric) for _, score in entries):
                result[case][metric] = {
                    name: mean_or_none(valid_scores([score[metric][name] for _, score in entries]))
                    for name in class_names
                }
        if all("largest_component_dice" in score for _, score in entries):
            result[case]["largest_component_dice"] = {
                name: {
                    way: mean_or_none([score["largest_component_dice"][name][way] for _, score in entries])
                    for way in ("without", "with")
                }
                for name in class_names
            }
    return result
