"""What a report page shows, read from a training run folder, a K-fold output folder or a sweep folder.

Everything is read as data: configs with ``yaml.safe_load``, JSON and CSV files as values; a folder the page
cannot be made of is a :class:`ReportError` naming what was expected.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from custom_components.config_text import WIRING, flow, user_text
from custom_components.data import case_id
from custom_components.kfold.layout import (
    EVALUATION_FILE,
    IDENTITY,
    METADATA_FILE,
    PREDICTIONS_DIR,
    SPLITS_FILE,
    STATE_FILE,
    fold_layout,
)
from custom_components.kfold.scores import mean_or_none, out_of_fold, valid_scores
from custom_components.metrics import CASE_METRICS, METRIC_TITLES, summary
from custom_components.sweep.layout import REPORT_JSON as SWEEP_REPORT

TRAIN_CONFIG = Path("configs") / "train.yaml"
# the per-case metrics an evaluation may hold: key, name on the page, digits shown
METRICS = tuple((metric, METRIC_TITLES[metric], {"hd95": 2}.get(metric, 3)) for metric in CASE_METRICS)
PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # the voxel axis each plane cuts across (RAS order)
VERSION_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version")


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
    settings = yaml.safe_load(user_text(train_yaml.read_text())) or {}
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


def finite(values: Sequence[Any]) -> list[float]:
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
        ("best validation mean Dice", shown(metrics.get("best_mean_dice"))),
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
        mean_dice=mean_or_none(valid_scores([case["mean_dice"] for case in cases.values()])),
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
        ("best trial", f"{best.get('trial')}: {shown(best.get('value'))} ({best.get('folder')})" if best else None),
        ("best settings as a plan file", report.get("best_config")),
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


def shown(value: Any, digits: int = 3) -> str:
    """A value as the page shows it: floats rounded to ``digits``, infinities as ∞, missing as –."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return ("∞" if value > 0 else "-∞") if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)
