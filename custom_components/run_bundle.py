"""A training run's ``output_dir`` as a bundle of its own, in the model zoo's layout.

At the start of training :class:`RunBundle` writes ``configs/`` (the bundle's train, inference, evaluate and
multi-GPU configs with every user key replaced by the literal value this run resolved, so that predicting,
evaluating, exporting and resuming need the run folder and the inputs only), the bundle's ``logging.conf`` and
``LICENSE`` (a file the model zoo requires of every bundle), ``configs/metadata.json`` (inputs, outputs and label
names of this model) and ``docs/README.md``; whenever the best model improves it updates the Dice
those state. The weights are ``models/model.pt`` (written by ``TrainingReport``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow

from custom_components.bundle import expression_ids
from custom_components.cascade import RUN_PREVIOUS_STAGE, keep_previous_stage
from custom_components.config_text import flow, freeze, plain, user_keys
from custom_components.data import case_id
from custom_components.networks import total_downsampling
from custom_components.run_files import atomic_write_bytes, atomic_write_json
from custom_components.settings_declarations import as_parsed, run_sources
from custom_components.settings_values import active_parser, bundle_kind, run_settings
from custom_components.training_report import TrainingReport

CONFIGS = ("train", "inference", "evaluate", "multi_gpu_train")  # the bundle's workflows, each copied if present
TRAINING_CONFIGS = ("train", "multi_gpu_train")  # their output_dir is the run folder itself, wherever it is moved
RUN_OUTPUT_DIR = "$@bundle_root"
COPIED = ("configs/logging.conf", "LICENSE")  # from the bundle that trained the run, as they are

logger = logging.getLogger(__name__)


def run_values(settings: Mapping[str, Any], paths: Sequence[str] = ()) -> dict[str, Any]:
    """``settings`` as a run folder writes them: plain data, the ``paths`` keys as absolute paths. A resolved value
    holding text that MONAI's parser would evaluate in the run's configs (``$``, ``@``, ``%`` first) stops the run
    before anything is written: values are data, never code."""
    values = {key: plain(value) for key, value in settings.items()}
    for key in paths:
        if isinstance(values.get(key), str):
            values[key] = str(Path(values[key]).resolve())
    planted = [f"{id} = {flow(value)}" for key, value in values.items() for id in expression_ids(value, key)]
    if planted:
        sys.exit(
            "error: these values would be run as code by the run folder's configs, so nothing was written: "
            + "; ".join(planted)
            + ". Rename them (in dataset.json or the settings) without $, @ or % at their start"
        )
    return values


def intended_use(class_names: Sequence[str]) -> str:
    """metadata.json's intended use of a trained model (the source bundle's says that it holds no weights)."""
    return (
        f"Research: segments {', '.join(class_names)} in images like its training data; not a medical device. Score "
        "it on labelled cases of your own (configs/evaluate.yaml) before relying on it."
    )


class RunBundle:
    """Write the run folder's configs, metadata and docs (see the module docstring); main process only.

    The values of the user keys are resolved in the running training config
    (:func:`custom_components.settings_values.run_settings`): written into every config of the run that has the key,
    or into its training configs only (``frozen: train`` in settings.yaml); ``paths`` (keys among them) as absolute
    paths. A cascade's ``previous_stage`` (its first
    stage's ``kfold run`` folder) is copied into the run folder, whose evaluate and inference configs name the copy.
    """

    def __init__(
        self,
        bundle_root: str | Path,
        output_dir: str | Path,
        report: TrainingReport,
        dataset: Mapping[str, Any],
        cases: Mapping[str, Sequence[Mapping[str, Any]]],
        network_in_channels: int,
        paths: Sequence[str] = (),
        planned: Mapping[str, Any] = {},  # noqa: B006 (read only)
        previous_stage: str | Path | None = None,
        enabled: bool = True,
    ) -> None:
        self.source = Path(bundle_root)
        self.output_dir = Path(output_dir)
        self.report = report
        self.dataset = dict(dataset)
        self.cases = {split: [case_id(str(item["image"])) for item in items] for split, items in cases.items()}
        self.network_in_channels = int(network_in_channels)
        kind = bundle_kind(bundle_root)
        self.values = run_values(run_settings(kind), paths)
        self.training_values = {key: plain(value) for key, value in run_settings(kind, "train").items()}
        # not written into the run's configs (the machine's keys), logged as MLflow parameters with the others
        self.machine_values = {"output_dir": str(self.output_dir.resolve()), **run_settings(kind, False)}
        self.planned = {key: plain(value) for key, value in planned.items()}
        self.previous_stage = previous_stage
        self.enabled = enabled
        self._written_best: Any = object()

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        keep_previous_stage(self.previous_stage, self.output_dir)
        self.write_configs()
        self.write_results()
        if not engine.has_event_handler(self._epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_completed(self, _engine: Engine) -> None:
        if self.report.best != self._written_best:
            self.write_results()

    def write_configs(self) -> None:
        """configs/*.yaml with this run's values, and the files of ``COPIED``, from the bundle that trained it."""
        configs = self.output_dir / "configs"
        for name in CONFIGS:
            source = self.source / "configs" / f"{name}.yaml"
            if not source.is_file():
                continue
            values = dict(self.values)
            if name in TRAINING_CONFIGS:
                # every key of a run is decided: training again from its folder plans nothing
                values.update(self.training_values, output_dir=RUN_OUTPUT_DIR, plan="off")
            elif self.previous_stage is not None:  # a cascade's run folder predicts with its own copy of stage 1
                values["previous_stage"] = RUN_PREVIOUS_STAGE
            atomic_write_bytes(configs / f"{name}.yaml", freeze(source.read_text(), values).encode())
        for name in COPIED:
            source = self.source / name
            if source.is_file():
                atomic_write_bytes(self.output_dir / name, source.read_bytes())

    def write_results(self) -> None:
        """metadata.json and docs/README.md with the validation Dice reached so far."""
        self._written_best = dict(self.report.best)
        atomic_write_json(self.metadata(), self.output_dir / "configs" / "metadata.json")
        atomic_write_bytes(self.output_dir / "docs" / "README.md", self.readme().encode())

    def _dice(self) -> dict[str, float | None]:
        best = self.report.best
        scores = {"mean_dice": best.get(self.report.key_metric)}
        for name in self.values["class_names"]:
            scores[f"dice_{name}"] = best.get(f"dice_{name}")
        return {key: None if v is None or math.isnan(v) else round(float(v), 4) for key, v in scores.items()}

    def metadata(self) -> dict[str, Any]:
        """The source bundle's metadata.json with this model's inputs, outputs, label names and Dice."""
        meta = json.loads((self.source / "configs" / "metadata.json").read_text())
        values = self.values
        dims = int(values["spatial_dims"])
        shape = [
            f"{2 * size}*n" for size in total_downsampling(values["strides"], dims)
        ]  # n=1 leaves a bottleneck of 2
        modalities = [str(name) for _, name in sorted(values["modality"].items(), key=lambda kv: int(kv[0]))]
        context = int(values.get("context_slices", 0))
        if context:
            channels = [f"{name} slice {offset:+d}" for name in modalities for offset in range(-context, context + 1)]
        else:
            channels = modalities
        image = meta["network_data_format"]["inputs"]["image"]
        image.update(
            format="hounsfield" if set(modalities) == {"CT"} else "magnitude",
            modality=", ".join(dict.fromkeys(modalities)),
            num_channels=self.network_in_channels,
            spatial_shape=shape,
            value_range=[0, 1] if values["intensity"].get("scheme") == "ct_window" else [],
            channel_def={str(index): name for index, name in enumerate(channels)},
        )
        pred = meta["network_data_format"]["outputs"]["pred"]
        labels = ["background", *values["class_names"]]
        pred.update(
            num_channels=int(values["num_classes"]),
            spatial_shape=shape,
            channel_def={str(index): name for index, name in enumerate(labels)},
        )
        name = self.dataset.get("name", Path(values["dataset_dir"]).name)
        meta["data_source"] = (
            f"{name} ({values['dataset_dir']}): trained on {len(self.cases['train'])} cases, validated on "
            f"{len(self.cases['validation'])}"
            if self.cases["validation"]
            else f"{name} ({values['dataset_dir']}): trained on every case ({len(self.cases['train'])}, num_folds 1), "
            "no validation: models/model.pt holds the last epoch's weights"
        )
        meta["label_classes"] = ", ".join(f"{index}: {label}" for index, label in enumerate(labels))
        meta["eval_metrics"] = self._dice()
        meta["intended_use"] = intended_use(values["class_names"])
        if self.planned:
            meta["planned_settings"] = self.planned  # what `plan: auto` chose for the dataset and device
        return meta

    def readme(self) -> str:
        """docs/README.md: what was trained on what, with which result, and the commands that use this folder."""
        values, best, dice = self.values, self.report.best, self._dice()
        validated = bool(self.cases["validation"])  # num_folds 1: every case trained, none held out
        run = self.output_dir.resolve()
        name = self.dataset.get("name", Path(values["dataset_dir"]).name)
        result = (
            f"Best validation mean Dice **{dice['mean_dice']}** at epoch {best.get('epoch')} ("
            + ", ".join(f"{key.removeprefix('dice_')} {value}" for key, value in dice.items() if key != "mean_dice")
            + ")."
            if best
            else "Not validated yet."
            if validated
            else "No validation: every case was trained on (num_folds 1), and `models/model.pt` holds the last "
            "epoch's weights. Score it on another labelled dataset (below), or trust the cross-validation that chose "
            "its settings."
        )
        split = values.get("splits_file") or f"fold {values['fold']} of {values['num_folds']}"
        if not validated and not values.get("splits_file"):
            split = "every case (num_folds 1)"
        where = (
            " Dice on the validation cases, resampled to `spacing` and cropped to the foreground." if validated else ""
        )
        weights = "the best weights" if validated else "the last epoch's weights (no validation)"
        score = (
            "on its own dataset the validation cases, on any other labelled MSD dataset every labelled case"
            if validated
            else "on another labelled MSD dataset (every labelled case): it trained on every case of its own"
        )
        dataset_arg = "[--dataset_dir DIR]" if validated else "--dataset_dir DIR"
        chosen = {key: "plan auto" if key in self.planned else "" for key in values}
        settings = "\n".join(f"| `{key}` | `{flow(value)}` | {chosen[key]} |" for key, value in values.items())
        planned = (
            f"`plan: auto` chose {', '.join(f'`{key}`' for key in self.planned)} for this dataset and device (marked "
            "below); every other key is the bundle's default or was set for the run."
            if self.planned
            else "No key was planned here: each is the bundle's default or was set for the run."
        )
        modality = ", ".join(str(name) for name in values["modality"].values())
        return f"""# {int(values["spatial_dims"])}D U-Net model: {run.name}

A training run of the {int(values["spatial_dims"])}D U-Net bundle, itself a MONAI bundle: `configs/` holds every key
as the value this run used, `models/model.pt` {weights}.

## Trained on
- dataset: {name} (`{values["dataset_dir"]}`), classes {", ".join(values["class_names"])}, modality {modality}
- split: {split}, {len(self.cases["train"])} training and {len(self.cases["validation"])} validation cases
- validation cases: {", ".join(self.cases["validation"]) or "none"}

## Result
{result}{where}
Curves: `learning_curve.png`; per epoch: `learning_curve.csv`; summary: `metrics.json`; everything on one page,
with the best, median and worst validation case drawn: `report.html` (scores per case: `evaluation/evaluation.json`).

## Use it
```bash
# label maps on each input's own grid and affine
python -m monai.bundle run inference --config_file {run}/configs/inference.yaml --input_dir SCANS --output_dir OUT
# score it: {score}
python -m monai.bundle run evaluating --config_file {run}/configs/evaluate.yaml {dataset_arg}
# ONNX (or --format torchscript), checked against PyTorch before it is written
python -m custom_components.export {run} --format onnx
# the report page (written at the end of training): {run}/report.html
python -m custom_components.report {run}
# resume an interrupted training
python -m monai.bundle run training --config_file {run}/configs/train.yaml
```

## Settings
{planned}

| key | value | chosen by |
|---|---|---|
{settings}
"""


# --- the end of a training run: its best model scored, and the report page ------------------------------------------


def evaluate_run(run: str | Path) -> Path:
    """Score the run's best model on its validation cases with its own ``configs/evaluate.yaml``, in this process:
    ``evaluation/evaluation.json`` (Dice, HD95, NSD per case) and the predicted label maps for report.html."""
    from custom_components.kfold.layout import EVALUATION_DIR, EVALUATION_FILE  # the layout kfold gives its folds

    run = Path(run)
    workflow = ConfigWorkflow(
        config_file=str(run / "configs" / "evaluate.yaml"),
        workflow_type="eval",
        output_dir=str(run / EVALUATION_DIR),
        progress_bar=False,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return run / EVALUATION_FILE


class RunReport:
    """At the end of training (main process): with ``enabled``, the best model scored on the validation cases by
    the run's own evaluate.yaml (``evaluation/``; skipped without validation cases), then ``report.html``."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, validate: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.validate = validate

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self.write)

    def write(self, _engine: Engine) -> None:
        """Evaluate (when there are validation cases) and write report.html; a failure is logged, not raised: the
        model and metrics are already written, and the report can be made again with custom_components.report."""
        from custom_components.report import write_report  # matplotlib's figures only when a report is made

        try:
            if self.validate:
                evaluate_run(self.output_dir)
            page = write_report(self.output_dir)
        except (Exception, SystemExit):  # a check's clean exit (no model, say) must not fail a finished training
            logger.exception(
                "the end-of-training report failed; the run is complete. Write it again with: "
                "python -m custom_components.report %s",
                self.output_dir,
            )
            return
        logger.info("report: %s", page)


# --- a restart on a run folder: faithful or refused ---------------------------------------------------------------

CHECKPOINT_FILE = Path("models") / "checkpoint_last.pt"  # what ResumableCheckpoint resumes from
# keys a resume may change: how a session shows its progress, holds and loads its data (every item is seeded by its
# epoch and index, whichever worker loads it), saves and reports, never what it computes
RESULT_NEUTRAL = (
    "progress_bar",
    "log_every_iteration",
    "cache_rate",
    "num_workers",
    "data_device",
    "checkpoint_interval_min",
    "report",
    "save_probabilities",
)
EXTENDABLE = "max_epochs"  # the one key `extend_training` lets grow
_ABSENT = "(not set)"


def _literal(value: Any) -> bool:
    """Whether a raw config value is data as it stands: no expression, reference, macro or component in it."""
    if isinstance(value, str):
        return value[:1] not in ("$", "@", "%")
    if isinstance(value, Mapping):
        return "_target_" not in value and all(_literal(item) for item in value.values())
    if isinstance(value, list | tuple):
        return all(_literal(item) for item in value)
    return True


def _as_written(value: Any) -> Any:
    """A value as a run folder's config reads back (YAML-dumped on one line, then loaded)."""
    return yaml.safe_load(flow(value))


def truthy(value: Any) -> bool:
    """A boolean key as the command line may give it (``True``, ``true``, ``1``)."""
    return value is True or (isinstance(value, int | str) and str(value).strip().lower() in ("1", "true"))


def _differences(
    stored: Mapping[str, Any], now: Mapping[str, Any], defaults: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """The keys whose value now differs from the stored one; a key the stored run lacks (added to the bundle since)
    counts as the bundle's default, which is what the run trained with."""
    was = {key: stored[key] if key in stored else defaults.get(key, _ABSENT) for key in now}
    return [(key, was[key], value) for key, value in now.items() if was[key] != value]


def _verdict(differences: list[tuple[str, Any, Any]], extend: bool, run: Path, stored_file: Path) -> str | None:
    """None when the start continues the stored run (or extends it as asked), else the refusal."""
    if not differences:
        return None
    keys = [key for key, _, _ in differences]
    grows = {
        key: isinstance(old, int) and isinstance(new, int) and new > old
        for key, old, new in differences
        if key == EXTENDABLE
    }
    if extend and keys == [EXTENDABLE] and grows[EXTENDABLE]:
        return None
    lines = [f"  {key}: {flow(old)} -> {flow(new)}" for key, old, new in differences]
    if extend and grows.get(EXTENDABLE):
        hint = f" With extend_training only {EXTENDABLE} may differ from the stored values."
    elif extend and EXTENDABLE in keys:
        hint = f" extend_training lets {EXTENDABLE} grow only."
    elif grows.get(EXTENDABLE):
        hint = (
            f" To train the run longer, pass the larger --{EXTENDABLE} with --extend_training True (every other "
            "key as stored): the learning-rate schedule is then laid out again over the new length."
        )
    else:
        hint = ""
    return (
        f"{run} holds a run started with other settings (stored in {stored_file} -> this start):\n"
        + "\n".join(lines)
        + f"\nStart a new output_dir, or resume with the stored values (e.g. --config_file {stored_file}).{hint}"
    )


def resume_problem(
    output_dir: str | Path,
    bundle_root: str | Path,
    run_bundle_id: str = "train#run_bundle",
    extend_training: Any = False,
    parser: Any = None,
) -> str | None:
    """Why this start may not resume the run in ``output_dir`` (None: it may, or there is nothing to resume).

    A run folder holding ``models/checkpoint_last.pt`` is resumed only with the values its ``configs/train.yaml``
    stores (read as data, never evaluated), compared with what the run bundle (``run_bundle_id`` in the config being
    parsed, by default the train config's RunBundle) would write for this start; only ``max_epochs`` may grow, and
    only with ``extend_training``. Keys whose value here is literal are compared first, before anything is read;
    the ones derived from the dataset (``num_classes``, ...) are resolved and compared after, still before any
    case is read or cached. The checkpoint is tried as tensors and plain values first (nothing in it executed).
    """
    from custom_components.run_files import CheckpointError, read_checkpoint

    run = Path(output_dir)
    checkpoint = run / CHECKPOINT_FILE
    if not checkpoint.is_file():
        return None  # a new run, or one stopped before its first epoch's checkpoint: nothing is resumed
    try:
        read_checkpoint(checkpoint)
    except CheckpointError as err:
        return str(err)
    stored_file = run / "configs" / "train.yaml"
    fix = f"delete {checkpoint} to train this folder from scratch, or start a new output_dir"
    try:
        stored = yaml.safe_load(stored_file.read_text())
    except (OSError, yaml.YAMLError) as err:
        reason = "is missing" if isinstance(err, FileNotFoundError) else f"cannot be read as YAML ({err})"
        return f"{checkpoint} cannot be resumed: {stored_file}, the settings it trained with, {reason}; {fix}"
    if not isinstance(stored, Mapping):
        return f"{checkpoint} cannot be resumed: {stored_file} holds no settings; {fix}"
    parser = parser if parser is not None else active_parser()
    target = str(parser.get(f"{run_bundle_id}#_target_", ""))
    if not target.endswith("RunBundle"):
        raise RuntimeError(f"{run_bundle_id} of the config is {target or 'not a component'}, not the RunBundle")
    extend = truthy(extend_training)
    own_text = (Path(bundle_root) / "configs" / "train.yaml").read_text()
    keys = set(user_keys(own_text)) - set(RESULT_NEUTRAL)
    own = yaml.safe_load(own_text)
    paths = parser.get(f"{run_bundle_id}#paths", [])
    kind = bundle_kind(bundle_root)
    ids = {}  # key -> the training key whose value the run bundle writes for it (training values last, as it does)
    for frozen in (True, "train"):
        ids.update({key: source for key, source in run_sources(kind, frozen).items() if key in keys})

    def source(config_id: str) -> Any:
        return parser.get(config_id)

    def now(selected: list[str]) -> dict[str, Any]:
        values = run_values({key: parser.get_parsed_content(ids[key]) for key in selected}, paths)
        return {key: _as_written(value) for key, value in values.items()}

    literal = [key for key in ids if _literal(source(ids[key]))]
    defaults = {key: value for key, value in own.items() if _literal(value)}
    first = _verdict(_differences(stored, now(literal), defaults), extend, run, stored_file)  # before anything is read
    if first:
        return first
    values = now(list(ids))
    # a key the run lacks whose default the bundle computes (an aug_ key from the `augmentation` preset) counts as
    # that default too, when this start leaves it at its default
    computed = {
        key: value
        for key, value in values.items()
        if key not in stored
        and key in own
        and not _literal(own[key])
        and parser.get(key) in (own[key], as_parsed(key, own[key]))  # as written, or as the parser holds it
    }
    return _verdict(_differences(stored, values, {**defaults, **computed}), extend, run, stored_file)


def check_resume(
    output_dir: str | Path,
    bundle_root: str | Path,
    run_bundle_id: str = "train#run_bundle",
    extend_training: Any = False,
) -> None:
    """:func:`resume_problem` from a config's ``initialize``: a refused restart stops with the differences and the
    fix, without a traceback (``ResumableCheckpoint`` logs the resume, and an extension, when training starts)."""
    problem = resume_problem(output_dir, bundle_root, run_bundle_id, extend_training, parser=active_parser())
    if problem:
        logger.error("%s", problem)
        sys.exit(f"error: {problem}")
