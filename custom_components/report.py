"""One self-contained report page, ``report.html``, of a training run folder, a K-fold output folder or a sweep.

    python -m custom_components.report RUN_DIR [--output FILE]

The page opens from disk with no server and no network: its images are embedded PNGs (``data:`` addresses), its
style and its script (sorting the per-case table) are inline. It shows the headline scores, the learning curves,
per-class and per-case metrics, the best, median and worst case drawn over their image, the settings and the
environment. What is not there yet (no evaluation, no predictions) is said on the page. Nothing read is executed:
configs are parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import importlib.metadata
import io
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from custom_components.data import case_id, voxel_sizes
from custom_components.handlers import atomic_write_bytes
from custom_components.imageio import ImageReadError, read_image
from custom_components.kfold.layout import (
    EVALUATION_FILE,
    IDENTITY,
    METADATA_FILE,
    PREDICTIONS_DIR,
    SPLITS_FILE,
    STATE_FILE,
    fold_layout,
)
from custom_components.kfold.report import out_of_fold
from custom_components.metrics import summary
from custom_components.run_bundle import WIRING, flow

REPORT_FILE = "report.html"
SWEEP_REPORT = "sweep_report.json"  # what `python -m custom_components.sweep report` writes into a sweep folder
TRAIN_CONFIG = Path("configs") / "train.yaml"
# the per-case metrics an evaluation may hold: key, name on the page, digits shown
METRICS = (("dice", "Dice", 3), ("hd95", "HD95 [mm]", 2), ("nsd", "NSD", 3))
PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # the voxel axis each plane cuts across (RAS order)
PACKAGES = ("torch", "monai", "numpy")  # versions in the environment section, besides Python's
VERSION_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version")
DPI = 100


class ReportError(ValueError):
    """A folder the report cannot be made of; the message names what was expected."""


@dataclass
class Source:
    """What the page shows, read from a run folder (:func:`read_run`) or a K-fold folder (:func:`read_kfold`)."""

    kind: str  # "training run" or "K-fold cross-validation"
    folder: Path
    class_names: list[str]
    overview: list[tuple[str, Any]]  # (what, value) rows describing the folder
    curves: dict[str, list[dict[str, float | None]]]  # learning-curve rows per run (one per fold)
    cases: dict[str, dict[str, Any]]  # per case: mean_dice, dice/hd95/nsd per class, image, label, prediction
    summary: dict[str, dict[str, dict[str, Any]]]  # metric -> class -> mean, median, sd, n over cases
    mean_dice: float | None  # the headline mean Dice over all classes
    headline: dict[str, dict[str, Any]]  # metric -> class -> the headline value (a mean over cases)
    headline_note: str  # where the headline numbers come from
    settings: list[tuple[str, list[tuple[str, Any]]]]  # (title, key/value rows)
    metadata: dict[str, Any]  # the version fields of configs/metadata.json
    notes: list[str] = field(default_factory=list)  # missing pieces, said at the top of the page
    folds: list[list[Any]] = field(default_factory=list)  # K-fold: name, cases scored, epochs, best epoch, mean Dice
    best_epoch: int | None = None
    trials: list[list[Any]] = field(default_factory=list)  # sweep: rank, trial, state, Dice, settings, time, note
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # sweep: Optuna's plots (name, PNG)


def _read_json(path: Path) -> Any:
    """A JSON file of the folder; invalid JSON is an error naming the file (a missing one is checked by callers)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err}): restore it or run the step that writes it") from err


def _number(text: str) -> float | None:
    """A CSV cell as a number, empty as None."""
    return float(text) if text.strip() else None


def read_curve(run: Path) -> list[dict[str, float | None]]:
    """The rows of a run's ``learning_curve.csv`` (epoch, train_loss, val_mean_dice, dice_<class>), [] if none."""
    path = run / "learning_curve.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: _number(value or "") for key, value in row.items()} for row in csv.DictReader(handle)]


def user_settings(train_yaml: Path) -> dict[str, Any]:
    """The user keys of a config: the YAML above its ``# Wiring:`` line, read as data (``imports`` left out)."""
    lines = train_yaml.read_text().splitlines()
    wiring = next((index for index, line in enumerate(lines) if line.startswith(WIRING)), len(lines))
    settings = yaml.safe_load("\n".join(lines[:wiring])) or {}
    if not isinstance(settings, dict):
        raise ReportError(f"{train_yaml} does not hold a mapping of settings: restore the run's config")
    return {str(key): value for key, value in settings.items() if key != "imports"}


def _dataset_files(settings: Mapping[str, Any]) -> dict[str, tuple[Path, Path | None]]:
    """Image and label of each case of the run's ``dataset_dir/dataset.json`` by case id ({} when unreadable)."""
    root = Path(str(settings.get("dataset_dir", "")))
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(description, dict):
        return {}
    files = {}
    for entry in [*description.get("training", []), *description.get("test", [])]:
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            label = entry.get("label")
            files[case_id(entry["image"])] = (
                (root / entry["image"]).resolve(),
                (root / label).resolve() if isinstance(label, str) else None,
            )
    return files


def _optional_path(value: Any) -> Path | None:
    """A path an evaluation names; None for null or an empty string."""
    return Path(value) if isinstance(value, str) and value else None


def evaluated_cases(run: Path, evaluation: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, dict]:
    """The per-case scores of an evaluation with the files of each case: image and label from the evaluation where
    it names them, else from the run's dataset.json; the prediction it names, else (none named, or a run folder
    moved since) ``evaluation/predictions/<case>_seg.nii.gz`` where inference wrote it."""
    found: dict[str, tuple[Path, Path | None]] | None = None
    cases = {}
    for case, scores in sorted(evaluation.get("cases", {}).items()):
        row = {key: scores.get(key) for key in ("mean_dice", *(metric for metric, _, _ in METRICS))}
        image, label = _optional_path(scores.get("image")), _optional_path(scores.get("label"))
        if image is None or label is None:
            found = _dataset_files(settings) if found is None else found
            image, label = image or found.get(case, (None, None))[0], label or found.get(case, (None, None))[1]
        named, local = _optional_path(scores.get("prediction")), run / PREDICTIONS_DIR / f"{case}_seg.nii.gz"
        prediction = next((path for path in (named, local) if path is not None and path.is_file()), None)
        cases[case] = {**row, "image": image, "label": label, "prediction": prediction}
    return cases


def _finite(values: Sequence[Any]) -> list[float]:
    """The finite numbers among ``values`` (null, NaN and infinities left out)."""
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def summarise(cases: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Mean, median and sample SD over cases of each metric and class present, on the cases with a finite value."""
    return {
        metric: {name: summary([(case.get(metric) or {}).get(name) for case in cases.values()]) for name in class_names}
        for metric, _, _ in METRICS
        if any(case.get(metric) for case in cases.values())
    }


def _class_names(settings: Mapping[str, Any], evaluation: Mapping[str, Any] | None, metrics: Mapping) -> list[str]:
    """Foreground class names: the run's config, else the evaluation's or metrics.json's per-class keys."""
    names = settings.get("class_names")
    if isinstance(names, list) and all(isinstance(name, str) for name in names):
        return names
    return list((evaluation or {}).get("dice_per_class") or metrics.get("best_dice_per_class") or {})


def _metadata(run: Path) -> dict[str, Any]:
    """The run's ``configs/metadata.json`` ({} when it has none)."""
    path = run / METADATA_FILE
    return _read_json(path) if path.is_file() else {}


def _means(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each metric's per-class mean of a summary."""
    return {metric: {name: stats.get("mean") for name, stats in classes.items()} for metric, classes in summary.items()}


def read_run(run: Path) -> Source:
    """A training run folder: its curve, metrics.json, settings and (once scored) its evaluation."""
    settings = user_settings(run / TRAIN_CONFIG)
    metrics = _read_json(run / "metrics.json")
    metadata = _metadata(run)
    evaluation_path = run / EVALUATION_FILE
    evaluation = _read_json(evaluation_path) if evaluation_path.is_file() else None
    class_names = _class_names(settings, evaluation, metrics)
    notes = []
    if evaluation is None:
        notes.append(
            f"no evaluation yet ({EVALUATION_FILE} is missing): per-class and per-case metrics and the case overlays "
            f"need it; run `python -m monai.bundle run evaluating --config_file {run / 'configs' / 'evaluate.yaml'}`"
        )
        cases, summary, mean_dice = {}, {}, metrics.get("best_mean_dice")
        headline = {"dice": dict(metrics.get("best_dice_per_class") or {})} if mean_dice is not None else {}
        where = f"best validation Dice during training (metrics.json), at epoch {metrics.get('best_epoch')}"
    else:
        cases = evaluated_cases(run, evaluation, settings)
        summary = evaluation.get("summary") or summarise(cases, class_names)
        mean_dice = evaluation.get("mean_dice")
        headline = _means(summary)
        if evaluation.get("dice_per_class"):
            headline["dice"] = dict(evaluation["dice_per_class"])
        details = [f"means over the {len(cases)} cases of {EVALUATION_FILE}"]
        details += [
            f"{key.replace('_', ' ')}: {evaluation[key]}" for key in ("space", "empty_policy") if key in evaluation
        ]
        if "nsd_tolerance_mm" in evaluation:
            details.append(f"NSD tolerance {evaluation['nsd_tolerance_mm']} mm")
        where = "; ".join(details)
        if cases and not any(case["prediction"] for case in cases.values()):
            notes.append(
                f"no predictions in {PREDICTIONS_DIR}: the overlays show the reference only; evaluate again with "
                f"save_predictions true, or run `python -m monai.bundle run inference --config_file "
                f"{run / 'configs' / 'inference.yaml'} --input_dir IMAGES --output_dir {run / PREDICTIONS_DIR}`"
            )
    curve = read_curve(run)
    if not curve:
        notes.append("no learning_curve.csv: the run has not finished an epoch")
    overview = [
        ("folder", str(run)),
        ("model", metadata.get("name")),
        ("data", metadata.get("data_source")),
        ("epochs trained", metrics.get("epochs")),
        ("stopped", metrics.get("stopped")),  # why a run ended before max_epochs (time budget, early stopping)
        ("best epoch", metrics.get("best_epoch")),
        ("best validation mean Dice", _shown(metrics.get("best_mean_dice"))),
        ("validation", metrics.get("validation")),
        ("weights", metrics.get("model_weights")),
        ("training time [s]", metrics.get("wall_time_s")),
        ("device", metrics.get("device")),
        ("parameters", metrics.get("parameters")),
    ]
    return Source(
        kind="training run",
        folder=run,
        class_names=class_names,
        overview=[(what, value) for what, value in overview if value is not None],
        curves={run.name: curve},
        cases=cases,
        summary=summary,
        mean_dice=mean_dice,
        headline=headline,
        headline_note=where,
        settings=[(f"{TRAIN_CONFIG}: the keys above `{WIRING}`", list(settings.items()))],
        metadata={key: metadata[key] for key in VERSION_KEYS if key in metadata},
        notes=notes,
        best_epoch=metrics.get("best_epoch"),
    )


def _mean(values: Sequence[Any]) -> float | None:
    """Mean of the finite numbers among ``values``; None when there are none."""
    finite = _finite(values)
    return float(np.mean(finite)) if finite else None


def _out_of_fold(scored: Sequence[tuple[str, Mapping[str, dict]]], class_names: Sequence[str]) -> dict[str, dict]:
    """The K-fold report's out-of-fold scores of each case (averaged over repeats), with its files from the first
    fold that scored it."""
    scores = out_of_fold([{"name": fold, "cases": cases} for fold, cases in scored], class_names)
    files: dict[str, dict] = {}
    for _, cases in scored:
        for case, row in cases.items():
            files.setdefault(case, row)
    return {
        case: {
            "fold": ", ".join(score["folds"]),
            **{key: score[key] for key in ("mean_dice", *(metric for metric, _, _ in METRICS)) if key in score},
            **{key: files[case][key] for key in ("image", "label", "prediction")},
        }
        for case, score in scores.items()
    }


def read_kfold(output: Path) -> Source:
    """A K-fold output folder: each fold's curve and evaluation, the out-of-fold scores of every case."""
    state = _read_json(output / STATE_FILE)
    if not isinstance(state, dict) or not {"fold_count", "split_count"} <= set(state):
        raise ReportError(f"{output / STATE_FILE} lacks fold_count and split_count: it was not written by `kfold run`")
    class_names = [str(name) for name in state.get("class_names", [])]
    layout = fold_layout(output, int(state["fold_count"]), int(state["split_count"]))
    curves, scored, folds, notes = {}, [], [], []
    settings: list[tuple[str, list[tuple[str, Any]]]] = []
    metadata: dict[str, Any] = {}
    for fold in layout:
        curves[fold.name] = read_curve(fold.path)
        metrics_path, evaluation_path = fold.path / "metrics.json", fold.path / EVALUATION_FILE
        metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
        evaluation = _read_json(evaluation_path) if evaluation_path.is_file() else None
        fold_settings = user_settings(fold.path / TRAIN_CONFIG) if (fold.path / TRAIN_CONFIG).is_file() else {}
        if fold_settings and not settings:
            title = f"{fold.name}/{TRAIN_CONFIG}: the keys above `{WIRING}` (every fold has them, but its split)"
            settings.append((title, list(fold_settings.items())))
            metadata = {key: value for key, value in _metadata(fold.path).items() if key in VERSION_KEYS}
        if evaluation is None:
            notes.append(f"{fold.name}: not evaluated yet ({EVALUATION_FILE} is missing); its cases are not scored")
            folds.append([fold.name, None, metrics.get("epochs"), metrics.get("best_epoch"), None])
            continue
        fold_cases = evaluated_cases(fold.path, evaluation, fold_settings)
        scored.append((fold.name, fold_cases))
        row = [
            fold.name,
            len(fold_cases),
            metrics.get("epochs"),
            metrics.get("best_epoch"),
            evaluation.get("mean_dice"),
        ]
        folds.append(row)
    cases = _out_of_fold(scored, class_names)
    summary = summarise(cases, class_names)
    if cases and not any(case["prediction"] for case in cases.values()):
        notes.append(f"no predictions in any fold's {PREDICTIONS_DIR}: the overlays show the reference only")
    report_path = output / "report.json"
    verdict = (_read_json(report_path).get("verdict") or {}).get("text") if report_path.is_file() else None
    overview = [
        ("folder", str(output)),
        ("bundle", state.get("bundle")),
        ("dataset", state.get("dataset_dir")),
        ("models", f"{len(layout)} ({len(scored)} evaluated)"),
        ("verdict (report.json)", verdict),
    ]
    return Source(
        kind="K-fold cross-validation",
        folder=output,
        class_names=class_names,
        overview=[(what, value) for what, value in overview if value is not None],
        curves=curves,
        cases=cases,
        summary=summary,
        mean_dice=_mean([case["mean_dice"] for case in cases.values()]),
        headline=_means(summary),
        headline_note=f"out-of-fold means: each of {len(cases)} cases scored by the model that did not train on it",
        settings=[(STATE_FILE, [(key, state.get(key)) for key in (*IDENTITY, "max_epochs")]), *settings],
        metadata=metadata,
        notes=notes,
        folds=folds,
    )


def read_sweep(output: Path) -> Source:
    """A sweep folder: its ranked trials and Optuna's plots (``sweep_report.json``, data only), each trial's curve,
    and the best trial's own run (its evaluation, cases and settings)."""
    report = _read_json(output / SWEEP_REPORT)
    trials = report.get("trials") or []
    best = report.get("best") or {}
    folder = Path(best["folder"]) if best.get("folder") else None
    if folder is not None and (folder / TRAIN_CONFIG).is_file() and (folder / "metrics.json").is_file():
        source = read_run(folder)
        source.headline_note = f"the best trial ({best['trial']}): " + source.headline_note
    else:
        source = Source(
            kind="",
            folder=output,
            class_names=[],
            overview=[],
            curves={},
            cases={},
            summary={},
            mean_dice=None,
            headline={},
            headline_note="",
            settings=[],
            metadata={},
            notes=["no trial has finished yet"],
        )
    source.kind, source.folder = "hyperparameter sweep", output
    source.overview = [
        ("folder", str(output)),
        ("study", f"{report.get('study')} in {report.get('storage')}"),
        ("score of a trial", report.get("score")),
        ("trials", ", ".join(f"{count} {state}" for state, count in (report.get("counts") or {}).items())),
        ("best trial", f"{best.get('trial')}: {_shown(best.get('value'))} ({best.get('folder')})" if best else None),
        ("best settings as a config overlay", report.get("best_config")),
    ]
    source.overview = [(what, value) for what, value in source.overview if value is not None]
    source.curves = {f"trial {row['trial']}": read_curve(Path(row["folder"])) for row in trials if row.get("folder")}
    source.trials = [
        [row.get(key) for key in ("rank", "trial", "state", "value")]
        + [flow(row.get("settings") or {}), row.get("duration_s"), row.get("note")]
        for row in trials
    ]
    source.figures = [
        (name, (output / name).read_bytes()) for name in report.get("plots") or [] if (output / name).is_file()
    ]
    importance = report.get("importance")
    if importance:
        source.overview.append(("importance", ", ".join(f"{key} {value:.2f}" for key, value in importance.items())))
    return source


def read_source(folder: str | Path) -> Source:
    """The folder read as what it is: a K-fold output folder or a training run folder; anything else an error."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ReportError(
            f"{folder} does not exist: pass a training run folder (configs/train.yaml and metrics.json), a K-fold "
            f"output folder ({STATE_FILE} and {SPLITS_FILE}) or a sweep folder ({SWEEP_REPORT})"
        )
    if (folder / SWEEP_REPORT).is_file():
        return read_sweep(folder)
    if (folder / STATE_FILE).is_file() and (folder / SPLITS_FILE).is_file():
        return read_kfold(folder)
    if (folder / TRAIN_CONFIG).is_file() and (folder / "metrics.json").is_file():
        return read_run(folder)
    raise ReportError(
        f"{folder} is neither a training run folder (configs/train.yaml and metrics.json), a K-fold output "
        f"folder ({STATE_FILE} and {SPLITS_FILE}) nor a sweep folder ({SWEEP_REPORT}: `python -m "
        "custom_components.sweep report` writes it)"
    )


# --- figures ----------------------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported on first use so that importing this module stays cheap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    """A figure as PNG bytes (closed afterwards), without the software tag, so the same figure gives the same bytes."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def plot_curves(source: Source) -> bytes:
    """Training loss and validation Dice per epoch: per class for a run, one line per fold for a K-fold folder."""
    plt = _pyplot()
    figure, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 4))
    several = len(source.curves) > 1
    for index, (name, rows) in enumerate(source.curves.items()):
        colour = plt.get_cmap("tab10")(index % 10)
        label = name if several else "mean"
        epochs = [row.get("epoch") for row in rows]
        loss_ax.plot(epochs, [row.get("train_loss") for row in rows], marker=".", color=colour, label=name)
        validated = [row for row in rows if row.get("val_mean_dice") is not None]
        val_epochs = [row["epoch"] for row in validated]
        dice_ax.plot(val_epochs, [row["val_mean_dice"] for row in validated], marker="o", color=colour, label=label)
        for class_index, class_name in enumerate([] if several else source.class_names):
            values = [row.get(f"dice_{class_name}") for row in validated]
            if any(value is not None for value in values):
                style = {"marker": ".", "linestyle": "--", "color": plt.get_cmap("tab10")((class_index + 1) % 10)}
                dice_ax.plot(val_epochs, values, label=class_name, **style)
    if source.best_epoch is not None:
        dice_ax.axvline(source.best_epoch, color="grey", linestyle=":", label="best epoch")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    dice_ax.set(title="validation Dice", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    if several:
        loss_ax.legend(fontsize="small")
    if dice_ax.get_legend_handles_labels()[0]:  # nothing validated (num_folds 1): no legend to draw
        dice_ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return _png(figure)


def _spatial(array: np.ndarray, dims: int) -> np.ndarray:
    """``array`` cut to ``dims`` axes: trailing axes (channels, single axes) reduced to their first entry."""
    while array.ndim > dims:
        array = array[..., 0]
    return array


def _to_ras(arrays: Sequence[np.ndarray | None], affine: np.ndarray) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Volumes of one grid with their axes turned to the closest RAS order (no resampling), and the orientation
    (nibabel's: per voxel axis, the RAS axis it became and whether it was flipped)."""
    orientation = nib.orientations.io_orientation(affine)
    return [None if a is None else nib.orientations.apply_orientation(a, orientation) for a in arrays], orientation


def _file_slice(orientation: np.ndarray, axis: int, index: int, size: int) -> int:
    """Slice ``index`` across RAS axis ``axis`` numbered as in the file (before the turn of :func:`_to_ras`)."""
    source = int(np.flatnonzero(orientation[:, 0] == axis)[0])
    return index if orientation[source, 1] > 0 else size - 1 - index


def _fullest_slice(masks: Sequence[np.ndarray | None], axis: int, size: int) -> int:
    """The slice across ``axis`` with the most foreground of the first non-empty mask; the middle one if none is."""
    for mask in masks:
        if mask is not None and mask.any():
            return int(np.argmax(mask.sum(axis=tuple(i for i in range(mask.ndim) if i != axis))))
    return size // 2


def _load_case(case: Mapping[str, Any]) -> tuple[dict[str, np.ndarray | None], np.ndarray | None, list[str]]:
    """Image, reference and prediction of a case on the image's grid (spatial axes only), its affine, and what is
    missing or unusable, in words."""
    problems: list[str] = []
    arrays: dict[str, np.ndarray | None] = {"image": None, "reference": None, "prediction": None}
    if case.get("image") is None:
        return arrays, None, ["image path unknown: neither the evaluation nor the run's dataset.json names it"]
    try:
        image, affine = read_image(case["image"])
    except ImageReadError as err:
        return arrays, None, [str(err)]
    for key, what in (("label", "reference"), ("prediction", "prediction")):
        if case.get(key) is None:
            problems.append(f"no {what}" + (f" (none in {PREDICTIONS_DIR})" if key == "prediction" else ""))
            continue
        try:
            arrays[what] = np.asarray(read_image(case[key])[0])
        except ImageReadError as err:
            problems.append(str(err))
    dims = min(next((a.ndim for a in arrays.values() if a is not None), image.ndim), 3)
    arrays["image"] = _spatial(np.asarray(image, dtype=np.float32), dims)
    for what in ("reference", "prediction"):
        if arrays[what] is not None:
            labels = _spatial(arrays[what], dims)
            if labels.shape != arrays["image"].shape:
                problems.append(
                    f"the {what}'s grid {labels.shape} is not the image's {arrays['image'].shape}: not drawn"
                )
                labels = None
            arrays[what] = labels
    return arrays, affine, problems


@dataclass(frozen=True)
class Plane:
    """One panel of a case figure: slices indexed (horizontal, vertical), drawn ``aspect`` times taller than wide
    per voxel (the spacing ratio, so a millimetre is as long either way)."""

    title: str
    image: np.ndarray
    reference: np.ndarray | None
    prediction: np.ndarray | None
    aspect: float
    top_down: bool  # a 2D picture: its first row on top, as it is drawn


def case_planes(
    image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray | None, affine: np.ndarray
) -> list[Plane]:
    """The panels of a case: for a volume (turned to RAS) its axial, coronal and sagittal slice with the most
    foreground (reference, else prediction, else the middle one), numbered as in the file; a 2D image whole."""
    if image.ndim == 2:
        spacing = voxel_sizes(affine, 2)
        return [Plane("image", image, reference, prediction, float(spacing[1] / spacing[0]), top_down=True)]
    (image, reference, prediction), orientation = _to_ras([image, reference, prediction], affine)
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = voxel_sizes(affine, 3)
    masks = [None if labels is None else labels > 0 for labels in (reference, prediction)]
    planes = []
    for name, axis in PLANES:
        horizontal, vertical = (index for index in range(3) if index != axis)
        index = _fullest_slice(masks, axis, image.shape[axis])
        cut = [
            None if volume is None else np.take(volume, index, axis=axis) for volume in (image, reference, prediction)
        ]
        title = f"{name}, slice {_file_slice(orientation, axis, index, image.shape[axis])}"
        planes.append(Plane(title, *cut, aspect=float(spacing[vertical] / spacing[horizontal]), top_down=False))
    return planes


def plot_case(case: Mapping[str, Any], class_names: Sequence[str]) -> tuple[bytes | None, list[str]]:
    """The case's image (grey, 1st-99th percentile) with reference (solid) and prediction (dashed) contours in one
    colour per class, in the panels of :func:`case_planes`.

    Returns the PNG (None when the image cannot be read) and what is missing, in words."""
    arrays, affine, problems = _load_case(case)
    if affine is None:
        return None, problems
    low, high = (float(v) for v in np.percentile(arrays["image"], [1, 99]))
    high = high if high > low else low + 1.0
    planes = case_planes(arrays["image"], arrays["reference"], arrays["prediction"], affine)
    plt = _pyplot()
    colours = [plt.get_cmap("tab10")(index % 10) for index in range(1, len(class_names) + 1)]
    figure, axes = plt.subplots(1, len(planes), figsize=(4 * len(planes), 4.6), squeeze=False)
    for ax, plane in zip(axes[0], planes, strict=True):
        ax.imshow(plane.image.T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=plane.aspect)
        for labels, style in ((plane.reference, "solid"), (plane.prediction, "dashed")):
            for value, colour in enumerate(colours, start=1):
                if labels is not None and min(labels.shape) > 1 and (labels == value).any():
                    mask = (labels == value).T.astype(np.float32)
                    ax.contour(mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
        if plane.top_down:
            ax.invert_yaxis()
        ax.set_title(plane.title, fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], color=colour, label=name) for colour, name in zip(colours, class_names, strict=True)]
    handles += [
        plt.Line2D([], [], color="black", label="reference"),
        plt.Line2D([], [], color="black", linestyle="dashed", label="prediction"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(figure), problems


def chosen_cases(cases: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """The best, median and worst case by mean Dice (ties broken by case id), each once with its role(s)."""
    ranked = sorted((row["mean_dice"], case) for case, row in cases.items() if _finite([row.get("mean_dice")]))
    if not ranked:
        return []
    picks = (("best", ranked[-1][1]), ("median", ranked[len(ranked) // 2][1]), ("worst", ranked[0][1]))
    roles: dict[str, list[str]] = {}
    for role, case in picks:
        roles.setdefault(case, []).append(role)
    return list(roles.items())


# --- the page ---------------------------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1.5rem 3rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
nav a { margin-right: 1rem; } .subtitle { color: #555; margin-top: 0; }
.notes { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5rem 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f3f3f3; }
table.sortable th button { all: unset; cursor: pointer; } table.sortable th button:focus { outline: 2px solid #48c; }
table.sortable th[aria-sort="ascending"] button::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"] button::after { content: " \\25BC"; }
img { max-width: 100%; height: auto; } figure { margin: 1rem 0; } figcaption { color: #555; font-size: 0.9rem; }
code { word-break: break-all; }
"""

# Sorts a table.sortable by the clicked column: numbers by value, text by natural order, empty cells last both ways.
SCRIPT = """
"use strict";
function sortRows(table, column, numeric, ascending) {
  const body = table.tBodies[0];
  const key = (row) => {
    const value = row.cells[column].dataset.value;
    if (value === "") return null;
    return numeric ? Number(value) : value;
  };
  const sign = ascending ? 1 : -1;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    if (numeric) return x < y ? -sign : x > y ? sign : 0;
    return sign * x.localeCompare(y, undefined, {numeric: true});
  });
  for (const row of rows) body.appendChild(row);
}
for (const table of document.querySelectorAll("table.sortable")) {
  const headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach((header, column) => {
    header.addEventListener("click", () => {
      const ascending = header.getAttribute("aria-sort") !== "ascending";
      for (const other of headers) other.removeAttribute("aria-sort");
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      sortRows(table, column, header.dataset.type === "number", ascending);
    });
  });
}
"""


def _e(value: Any) -> str:
    """``value`` as HTML text, every special character escaped (quotes too, for attributes)."""
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    """A number the sort can order (NaN, "not defined", sorts as missing)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _shown(value: Any, digits: int = 3) -> str:
    """A value as the page shows it: floats rounded to ``digits``, infinities as ∞, missing as –."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return ("∞" if value > 0 else "-∞") if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(value: Any, digits: int | None) -> str:
    """A table cell: numbers right-aligned with their full value in ``data-value`` (what the sort reads)."""
    if digits is None:
        return f'<td data-value="{_e("" if value is None else value)}">{_e(_shown(value))}</td>'
    key = json.dumps(float(value)) if _is_number(value) else ""  # Infinity, as JavaScript's Number() reads it
    return f'<td class="number" data-value="{_e(key)}">{_e(_shown(value, digits))}</td>'


def _table(columns: Sequence[tuple[str, int | None]], rows: Sequence[Sequence[Any]], sortable: bool = False) -> str:
    """A table of ``rows``; ``columns`` are (title, digits), digits None for text. A sortable table's headers are
    buttons that sort it (see SCRIPT)."""
    header = []
    for title, digits in columns:
        kind = "text" if digits is None else "number"
        label = f'<button type="button">{_e(title)}</button>' if sortable else _e(title)
        header.append(f'<th scope="col" data-type="{kind}">{label}</th>')
    body = ["<tr>" + "".join(_cell(v, d) for v, (_, d) in zip(row, columns, strict=True)) + "</tr>" for row in rows]
    attribute = ' class="sortable"' if sortable else ""
    return f"<table{attribute}><thead><tr>{''.join(header)}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _key_values(rows: Sequence[tuple[str, Any]], formatter: Any = str) -> str:
    """A two-column table of (key, value) rows, values written by ``formatter``."""
    return _table([("key", None), ("value", None)], [(key, formatter(value)) for key, value in rows])


def _image(png: bytes, alt: str) -> str:
    """A PNG embedded in the page itself, so that it opens from disk with nothing beside it."""
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_e(alt)}">'


def _section(anchor: str, title: str, body: str) -> str:
    """A section of the page, its ``anchor`` the target of the navigation links."""
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    """A highlighted paragraph: what is missing and how to get it."""
    return f'<p class="notes">{_e(text)}</p>'


def headline_section(source: Source) -> str:
    """Mean Dice over all classes, then each metric's mean per class, and where the numbers come from."""
    rows = []
    for metric, title, digits in METRICS:
        if metric in source.headline:
            values = [source.headline[metric].get(name) for name in source.class_names]
            overall = source.mean_dice if metric == "dice" else None
            rows.append([title, *(_shown(value, digits) for value in (overall, *values))])
    if not rows:
        return _note("no scores yet: the run has not validated")
    columns = [("metric", None), ("all classes", None), *((name, None) for name in source.class_names)]
    return _table(columns, rows) + f"<p>{_e(source.headline_note)}</p>"


def per_class_section(source: Source) -> str:
    """Mean, median and SD over cases of every metric and class the evaluation holds."""
    rows = [
        [title, name, *(stats.get(key) for key in ("mean", "median", "sd")), stats.get("n")]
        for metric, title, _ in METRICS
        for name, stats in source.summary.get(metric, {}).items()
    ]
    if not rows:
        return _note("no per-class metrics: nothing was evaluated yet")
    columns = [("metric", None), ("class", None), ("mean", 3), ("median", 3), ("SD", 3), ("cases", None)]
    caption = "<p>Over cases; <em>cases</em> counts those with a value. SD: the sample standard deviation.</p>"
    return _table(columns, rows) + caption


def case_columns(source: Source) -> list[tuple[str, str, str | None, int | None]]:
    """The per-case table's columns: (title, key in a case's row, class or None, digits or None for text)."""
    columns: list[tuple[str, str, str | None, int | None]] = [("case", "case", None, None)]
    if source.folds:
        columns.append(("fold", "fold", None, None))
    columns.append(("mean Dice", "mean_dice", None, 3))
    for metric, title, digits in METRICS:
        if any(case.get(metric) for case in source.cases.values()):
            columns += [(f"{title.split(' ')[0]} {name}", metric, name, digits) for name in source.class_names]
    return columns


def per_case_section(source: Source) -> str:
    """One row per case, sortable by any column (click its header)."""
    if not source.cases:
        return _note("no per-case scores: nothing was evaluated yet")
    columns = case_columns(source)
    rows = []
    for case, scores in source.cases.items():
        row = []
        for _, metric, name, _ in columns:
            if metric == "case":
                row.append(case)
            else:
                row.append(scores.get(metric) if name is None else (scores.get(metric) or {}).get(name))
        rows.append(row)
    units = " HD95 in mm." if any(metric == "hd95" for _, metric, _, _ in columns) else ""
    hint = f"<p>Click a column header to sort by it (again to reverse); empty cells stay last.{units}</p>"
    return hint + _table([(title, digits) for title, _, _, digits in columns], rows, sortable=True)


def overlays_section(source: Source) -> str:
    """The best, median and worst case by mean Dice drawn over their image, with what is missing for each."""
    chosen = chosen_cases(source.cases)
    if not chosen:
        return _note("no case to show: nothing was evaluated yet")
    parts = [
        "<p>Reference contours solid, prediction contours dashed, one colour per class; each plane on its slice with "
        "the most foreground (reference, or prediction where the reference is empty), in the voxels' aspect ratio, "
        "grey levels from the image's 1st to 99th percentile.</p>"
    ]
    for case, roles in chosen:
        scores = source.cases[case]
        title = f"{' / '.join(roles)}: {case}, mean Dice {_shown(scores.get('mean_dice'))}"
        if scores.get("fold"):
            title += f" ({scores['fold']})"
        png, problems = plot_case(scores, source.class_names)
        body = _image(png, title) if png is not None else ""
        missing = f"<br>Missing: {_e('; '.join(problems))}" if problems else ""
        parts.append(f'<figure data-case="{_e(case)}">{body}<figcaption>{_e(title)}{missing}</figcaption></figure>')
    return "\n".join(parts)


def _version(package: str) -> str:
    """The installed version of ``package`` (its distribution's metadata: nothing is imported)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_section(source: Source) -> str:
    """This machine's Python, torch, MONAI and numpy versions, platform and CPUs; the run's recorded versions."""
    here = [("python", platform.python_version()), *((package, _version(package)) for package in PACKAGES)]
    here += [("platform", platform.platform()), ("CPU count", os.cpu_count())]
    body = "<p>Where this report was written:</p>" + _key_values(here)
    recorded = []
    for key, value in source.metadata.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        recorded += [(f"{key} {name}".strip(), version) for name, version in items]
    if recorded:
        body += f"<p>What the run recorded ({METADATA_FILE}):</p>" + _key_values(recorded)
    else:
        body += _note(f"the run has no {METADATA_FILE}: its versions are unknown")
    return body


def settings_section(source: Source) -> str:
    """The settings of the run as key/value tables, values as one line of YAML."""
    if not source.settings:
        return _note(f"no {TRAIN_CONFIG} found")
    return "\n".join(f"<p>{_e(title)}</p>" + _key_values(rows, flow) for title, rows in source.settings)


def overview_section(source: Source) -> str:
    """What the folder is and, for a K-fold folder, its folds."""
    body = _key_values(source.overview)
    if source.folds:
        columns = [("fold", None), ("cases scored", None), ("epochs", None), ("best epoch", None), ("mean Dice", 3)]
        body += _table(columns, source.folds)
    return body


def curves_section(source: Source) -> str:
    """The learning-curve figure with its caption, or what is missing."""
    if not any(source.curves.values()):
        return _note("no learning curve yet: no epoch has finished")
    caption = "One line per fold." if len(source.curves) > 1 else "Validation Dice: mean and per class."
    return _image(plot_curves(source), f"learning curves. {caption}") + f"<p>{_e(caption)}</p>"


def trials_section(source: Source) -> str:
    """A sweep's trials, ranked and sortable, and Optuna's plots."""
    columns = [("rank", 0), ("trial", 0), ("state", None), ("Dice", 3), ("settings", None), ("time [s]", 1)]
    body = _table([*columns, ("note", None)], source.trials, sortable=True)
    return body + "".join(_image(png, name.removesuffix(".png").replace("_", " ")) for name, png in source.figures)


def render(source: Source) -> str:
    """The whole page as HTML text: every value escaped, every image embedded, no outside reference."""
    trials = [("trials", "Trials", trials_section(source))] if source.trials else []
    sections = [
        ("overview", "Overview", overview_section(source)),
        *trials,
        ("headline", "Headline numbers", headline_section(source)),
        ("curves", "Learning curves", curves_section(source)),
        ("per-class", "Per-class metrics", per_class_section(source)),
        ("per-case", "Per-case metrics", per_case_section(source)),
        ("overlays", "Best, median and worst case", overlays_section(source)),
        ("settings", "Settings", settings_section(source)),
        ("environment", "Environment", environment_section(source)),
    ]
    nav = " ".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in sections)
    notes = "".join(f"<li>{_e(note)}</li>" for note in source.notes)
    missing = f'<div class="notes" id="missing"><strong>Missing</strong><ul>{notes}</ul></div>' if notes else ""
    title = f"{source.folder.name}: {source.kind}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>",
            "<body>",
            f'<header><h1>{_e(title)}</h1><p class="subtitle">{_e(source.folder)}</p><nav>{nav}</nav></header>',
            missing,
            *(_section(anchor, heading, body) for anchor, heading, body in sections),
            f"<script>{SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report page of ``run_dir`` (a training run, K-fold or sweep folder) to ``output`` (default
    ``RUN_DIR/report.html``) atomically, and return its path. Raises :class:`ReportError` for any other folder."""
    source = read_source(run_dir)
    path = Path(output) if output is not None else source.folder / REPORT_FILE
    atomic_write_bytes(path, render(source).encode())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: write the page and print its path; a folder of another kind is one line of error."""
    parser = argparse.ArgumentParser(prog="python -m custom_components.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a training run folder, a K-fold output folder or a sweep folder")
    parser.add_argument("--output", help=f"where to write the page (default RUN_DIR/{REPORT_FILE})")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.output)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
