"""Scoring a trained model on its validation cases: the pieces of the bundles' ``evaluate.yaml`` overlay MONAI lacks.

MONAI's ``MetricsSaver`` writes the per-image Dice as CSV keyed by file path with anonymous class columns;
:class:`EvaluationReport` writes the same scores, HD95 and NSD to ``evaluation.json`` keyed by case id and class
name, which the K-fold report reads for the out-of-fold scores of every case and report.html for its tables.
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
from monai.networks.utils import one_hot
from monai.utils import MetricReduction

from custom_components.data import case_id
from custom_components.metrics import EMPTY_POLICY, SURFACE_METRICS, dice_per_class, postprocess_effect, summary
from custom_components.run_files import atomic_write_json

logger = logging.getLogger(__name__)

# Where the scores are measured: the validation preprocessing of the bundle, not the original image grid.
DICE_SPACE = "validation preprocessing: resampled to `spacing` and cropped to the foreground"
EFFECT_TOLERANCE = 1e-6  # a Dice change smaller than this is no change


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


def label_dice(predicted: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice per foreground class of a label map against the reference label map of the same grid (empty masks as
    in evaluation: :data:`custom_components.metrics.EMPTY_POLICY`)."""
    onehots = [one_hot(x.reshape(label.shape)[None, None].long(), num_classes, dim=1) for x in (predicted, label)]
    return dice_per_class(*onehots)[0]


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
    """Write ``evaluation.json``: Dice, HD95 and NSD per case and class by case id and class name, their summary
    (mean, median, SD), and per class the Dice change of keeping only the largest connected component.

    The per-case scores are the evaluator's metric details (``save_details`` of the metric handlers), in the order
    the cases were seen; case ids and file paths come from each batch's metadata. The largest-component effect is
    measured on ``pred_raw``, the prediction before ``postprocess``, so it is reported whatever ``postprocess`` is.
    """

    def __init__(
        self,
        path: str | Path,
        class_names: Sequence[str],
        model_path: str | Path,
        nsd_tolerance_mm: float | None = None,
        predictions_dir: str | Path | None = None,
        key_metric: str = "val_mean_dice",
    ) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self.model_path = str(model_path)
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.predictions_dir = Path(predictions_dir) if predictions_dir else None
        self.key_metric = key_metric
        self._files: list[dict[str, str | None]] = []
        self._effects: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_cases)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _started(self, _engine: Engine) -> None:
        self._files, self._effects = [], []

    def _collect_cases(self, engine: Engine) -> None:
        for item in engine.state.batch:
            image = str(item["image"].meta["filename_or_obj"])
            label = item.get("label")
            case = case_id(image)
            prediction = self.predictions_dir / f"{case}_seg.nii.gz" if self.predictions_dir else None
            self._files.append(
                {
                    "case": case,
                    "image": image,
                    "label": str(label.meta["filename_or_obj"]) if hasattr(label, "meta") else None,
                    "prediction": str(prediction) if prediction else None,
                }
            )
        for output in engine.state.output:
            if "pred_raw" in output:
                self._effects.append(postprocess_effect(output["pred_raw"], output["label"]))

    def write(self, engine: Engine) -> None:
        """Write the report once every case is scored."""
        cases = [files["case"] for files in self._files]
        scores = dice_scores(engine.state.metric_details[self.key_metric], self.class_names, cases)
        details = engine.state.metric_details
        for metric in SURFACE_METRICS:
            if f"val_{metric}" in details:
                table = torch.as_tensor(details[f"val_{metric}"]).reshape(len(cases), len(self.class_names))
                for files, row in zip(self._files, table.tolist(), strict=True):
                    scores["cases"][files["case"]][metric] = dict(zip(self.class_names, row, strict=True))
        for files in self._files:
            scores["cases"][files["case"]].update({key: files[key] for key in ("image", "label", "prediction")})
        for files, effect in zip(self._files, self._effects, strict=bool(self._effects)):  # none: no pred_raw
            scores["cases"][files["case"]]["largest_component_dice"] = {
                name: {"without": without, "with": with_step}
                for name, (without, with_step) in zip(self.class_names, effect.tolist(), strict=True)
            }
        report = {
            "model_path": self.model_path,
            **scores,
            "summary": self._summary(scores["cases"]),
            "postprocess_effect": self._postprocess_effect(),
            "nsd_tolerance_mm": self.nsd_tolerance_mm,
            "empty_policy": EMPTY_POLICY,
            "space": DICE_SPACE,
        }
        atomic_write_json(report, self.path)

    def _summary(self, cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Mean, median and SD over cases of every metric and class."""
        metrics = [metric for metric in ("dice", *SURFACE_METRICS) if cases and metric in next(iter(cases.values()))]
        return {
            metric: {name: summary([case[metric][name] for case in cases.values()]) for name in self.class_names}
            for metric in metrics
        }

    def _postprocess_effect(self) -> dict[str, dict[str, Any]]:
        """Per class: mean Dice without and with keeping the largest component, the change and its direction."""
        return postprocess_effects(self._effects, self.class_names)


def postprocess_effects(effects: Sequence[torch.Tensor], class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class, from per-case (classes, 2) Dice without/with the largest-component step: their means, the change
    and whether the step raises the Dice (nnU-Net keeps a post-processing step only where it does)."""
    if not effects:
        return {}
    means = torch.stack([torch.as_tensor(effect, dtype=torch.float64) for effect in effects]).mean(dim=0).tolist()
    return {name: effect_entry(*pair) for name, pair in zip(class_names, means, strict=True)}


def effect_entry(without: float, with_step: float) -> dict[str, Any]:
    """A class's mean Dice without and with the largest-component step, the change and whether it raises it."""
    change = with_step - without
    verdict = "raises" if change > EFFECT_TOLERANCE else "lowers" if change < -EFFECT_TOLERANCE else "unchanged"
    return {"dice_without": without, "dice_with": with_step, "change": change, "verdict": verdict}
