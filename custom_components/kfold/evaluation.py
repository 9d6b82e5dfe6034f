"""Scoring a trained model on its validation cases: the pieces of the bundles' ``evaluate.yaml`` overlay MONAI lacks.

MONAI's ``MetricsSaver`` writes the per-image Dice as CSV keyed by file path with anonymous class columns;
:class:`EvaluationReport` writes the same scores to ``evaluation.json`` keyed by case id and class name, which the
K-fold report reads for the out-of-fold Dice of every case.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from custom_components.data import case_id
from custom_components.handlers import atomic_write_json

logger = logging.getLogger(__name__)

# Where the scores are measured: the validation preprocessing of the bundle, not the original image grid.
DICE_SPACE = "validation preprocessing: resampled to `spacing` and cropped to the foreground"


def json_number(value: float) -> float | None:
    """A float for JSON: NaN (a class absent from the reference, so its Dice is undefined) becomes null."""
    value = float(value)
    return None if math.isnan(value) else value


def dice_scores(details: torch.Tensor, class_names: Sequence[str], case_ids: Sequence[str]) -> dict[str, Any]:
    """Mean, per-class and per-case Dice of a (cases x classes) Dice table, NaN meaning "class absent".

    The mean and per-class values are MONAI's ``MeanDice`` reductions (``mean`` and ``mean_batch``: NaN skipped),
    so they equal the bundle's validation ``val_mean_dice`` and ``val_dice_per_class``; with nothing to score
    they are null where MONAI would report 0.
    """
    details = torch.as_tensor(details, dtype=torch.float64).reshape(len(case_ids), len(class_names))

    def named(values: torch.Tensor) -> dict[str, float | None]:
        return {name: json_number(value) for name, value in zip(class_names, values.tolist(), strict=True)}

    def reduce(values: torch.Tensor, reduction: MetricReduction) -> torch.Tensor:
        reduced, scored = do_metric_reduction(values.clone(), reduction)  # (it zeroes NaNs in place: a copy)
        return torch.where(scored > 0, reduced, torch.nan)  # nothing scored: undefined, not 0

    mean, per_class = reduce(details, MetricReduction.MEAN), reduce(details, MetricReduction.MEAN_BATCH)
    cases = {}
    for case, row in zip(case_ids, details, strict=True):
        case_mean = reduce(row[None], MetricReduction.MEAN)
        cases[case] = {"mean_dice": json_number(case_mean), "dice": named(row)}
    return {"mean_dice": json_number(mean), "dice_per_class": named(per_class), "cases": cases}


def require_model(path: str | Path) -> str:
    """``path`` when the weights file exists; otherwise end the run with a message naming it (no torch traceback)."""
    if not Path(path).is_file():
        message = (
            f"model_path {path} does not exist: train into this output_dir first (model.pt is written at the first "
            "validation) or pass --model_path with a weights file"
        )
        logger.error("%s", message)
        sys.exit(f"error: {message}")
    return str(path)


class EvaluationReport:
    """Write ``evaluation.json``: mean and per-class Dice, and the Dice of every case by id and class name.

    The per-case scores are the evaluator's metric details (``save_details`` of MONAI's ``MeanDice``), in the
    order the cases were seen; the case ids come from the file names in each batch's image metadata.
    """

    def __init__(
        self, path: str | Path, class_names: Sequence[str], model_path: str | Path, key_metric: str = "val_mean_dice"
    ) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self.model_path = str(model_path)
        self.key_metric = key_metric
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_cases)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _started(self, _engine: Engine) -> None:
        self._cases = []

    def _collect_cases(self, engine: Engine) -> None:
        self._cases += [case_id(str(item["image"].meta["filename_or_obj"])) for item in engine.state.batch]

    def write(self, engine: Engine) -> None:
        """Write the report once every case is scored."""
        scores = dice_scores(engine.state.metric_details[self.key_metric], self.class_names, self._cases)
        atomic_write_json({"model_path": self.model_path, **scores, "space": DICE_SPACE}, self.path)
