"""A training run as a bundle to submit to the MONAI model zoo.

    python -m custom_components.publish RUN OUT [--name NAME] [--version 0.1.0] [--changelog TEXT]
        [--authors TEXT] [--weights_url URL]

writes ``OUT/NAME/``, the folder a pull request adds as ``models/NAME`` of github.com/Project-MONAI/model-zoo, and
``OUT/NAME.large_files/models/model.pt`` beside it, the weights to upload. The zoo keeps no file over 1 MB in git
(its pre-commit hook ``check-added-large-files``): its CI downloads each file ``large_files.yml`` names from its
``url`` and checks it against its ``hash_val``. The bundle holds:

- ``configs/``: the run's train, inference, evaluate and multi-GPU configs as they trained and scored the model, the
  dataset folders written as ``/workspace/data/<the dataset's folder name>`` (the zoo's bundles name their data so;
  no path of this machine goes public) and a ``splits_file`` copied in as ``configs/splits_final.json``;
  ``logging.conf``;
- ``configs/metadata.json``: the run's (inputs, outputs, channel and label names) with ``version`` and a
  ``changelog`` of this release, ``eval_metrics`` as the run's end-of-training evaluation measured them (mean Dice,
  per class Dice, HD95 and NSD; without one the validation Dice), laid out as the zoo's ``pretty-format-json``;
- ``LICENSE``, ``docs/README.md`` (the data, the training and the measured results, how to use it) and
  ``large_files.yml`` (``models/model.pt``: its url and sha256).

Nothing is written when the run lacks a file, ``NAME`` is not a folder name of letters, digits and underscores, or
``OUT/NAME`` exists already; the message names it and the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from custom_components.checkpoint import MODEL_FILE
from custom_components.config_text import flow, freeze, user_keys
from custom_components.kfold.layout import EVALUATION_FILE, METADATA_FILE, METRICS_FILE, STAGE_DIR
from custom_components.run_bundle import CONFIGS, COPIED, intended_use
from custom_components.run_files import atomic_write_bytes, atomic_write_json

DATA_ROOT = "/workspace/data"  # where the published configs look for the dataset, as the zoo's bundles write it
DATASET_KEYS = ("dataset_dir", "training_dataset_dir")  # set to DATA_ROOT/<the dataset's folder name>
SPLITS_KEY = "splits_file"
SPLITS_FILE = Path("configs") / "splits_final.json"  # a run's splits file, copied into the bundle
LARGE_FILES = "large_files.yml"
HASH_TYPE = "sha256"  # one of the hash types the zoo's download check takes (md5, sha1, sha256, sha512)
URL_PLACEHOLDER = "TODO: the public URL of models/model.pt (upload {weights}, then set it here or pass --weights_url)"
DEFAULT_VERSION = "0.1.0"
WIRING_KEYS = ("imports", "bundle_root")  # above the user keys of a config, not settings
REQUIRED = (*(Path("configs") / f"{name}.yaml" for name in ("train", "inference", "evaluate")), METADATA_FILE)


class PublishError(RuntimeError):
    """A run that cannot be published as it is, or a target that exists; the message says why and the fix."""


def bundle_name(run: Path) -> str:
    """The default bundle name: the run folder's, in the letters, digits and underscores the zoo's names use."""
    return re.sub(r"\W+", "_", run.resolve().name).strip("_") or "unet_segmentation"


def file_hash(path: Path, hash_type: str = HASH_TYPE) -> str:
    """The hex digest the zoo's download check compares with ``hash_val``."""
    digest = hashlib.new(hash_type)
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _public_values(train: Mapping[str, Any]) -> dict[str, Any]:
    """The run's path settings as the published configs write them: no folder of this machine."""
    values: dict[str, Any] = {key: f"{DATA_ROOT}/{Path(str(train['dataset_dir'])).name}" for key in DATASET_KEYS}
    if train.get(SPLITS_KEY):
        values[SPLITS_KEY] = f"$@bundle_root + '/{SPLITS_FILE.as_posix()}'"
    return values


def class_names(metadata: Mapping[str, Any]) -> list[str]:
    """The foreground classes of the model, in label order, from the output channels ``metadata.json`` names."""
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    return [label for _, label in sorted(channels.items(), key=lambda kv: int(kv[0]))][1:]


def _round(value: Any) -> float | None:
    """A score as metadata.json states it: 4 decimals, null when not measured (JSON has no NaN)."""
    return None if value is None or math.isnan(float(value)) else round(float(value), 4)


def eval_metrics(metadata: Mapping[str, Any], evaluation: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The scores ``metadata.json`` states: the end-of-training evaluation's means (Dice, HD95 in mm, NSD per
    class), else the run's validation Dice as its metadata holds it."""
    if not evaluation:
        return dict(metadata.get("eval_metrics", {}))
    scores = {"mean_dice": _round(evaluation.get("mean_dice"))}
    summary = evaluation.get("summary", {})
    for metric, suffix in (("dice", ""), ("hd95", "_mm"), ("nsd", "")):
        for name, stats in summary.get(metric, {}).items():
            scores[f"{metric}_{name}{suffix}"] = _round(stats.get("mean"))
    return scores


def _results_table(evaluation: Mapping[str, Any]) -> str:
    """Markdown table of the evaluation's per-class mean (SD) of Dice, HD95 and NSD."""
    summary = evaluation.get("summary", {})
    names = list(summary.get("dice", {}))

    def cell(metric: str, name: str) -> str:
        stats = summary.get(metric, {}).get(name)
        if not stats or stats.get("mean") is None:
            return "-"
        return f"{stats['mean']:.3f} ({stats.get('sd') or 0:.3f})"

    tolerance = evaluation.get("nsd_tolerance_mm")
    rows = [f"| {name} | {cell('dice', name)} | {cell('hd95', name)} | {cell('nsd', name)} |" for name in names]
    return "\n".join([f"| class | Dice | HD95 (mm) | NSD ({tolerance} mm) |", "|---|---|---|---|", *rows])


def readme(
    name: str,
    metadata: Mapping[str, Any],
    metrics: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None,
    train_text: str,
    weights_hash: str,
) -> str:
    """docs/README.md of the published bundle: the model, its data, its training, its measured results, its use."""
    train = yaml.safe_load(train_text)
    dims = int(train["spatial_dims"])
    pred = metadata["network_data_format"]["outputs"]["pred"]
    image = metadata["network_data_format"]["inputs"]["image"]
    classes = class_names(metadata)
    shown = [key for key in user_keys(train_text) if key in train and key not in WIRING_KEYS]
    settings = "\n".join(f"| `{key}` | `{flow(train[key])}` |" for key in shown)
    if evaluation:
        cases = ", ".join(evaluation.get("cases", {})) or "none"
        results = (
            f"Scored at the end of training by `configs/evaluate.yaml` on the {len(evaluation.get('cases', {}))} "
            f"validation cases ({cases}), {evaluation.get('space', 'as validation preprocesses them')}; "
            f"mean (SD) per class, mean Dice **{_round(evaluation.get('mean_dice'))}**:\n\n{_results_table(evaluation)}"
        )
    elif metrics.get("best_mean_dice") is not None:
        results = (
            f"Best validation mean Dice **{_round(metrics['best_mean_dice'])}** at epoch {metrics.get('best_epoch')}."
        )
    else:
        results = f"Not measured: {metrics.get('validation', 'no validation cases')}."
    stopped = f", stopped: {metrics['stopped']}" if metrics.get("stopped") else ""
    seconds = float(metrics.get("training_time_s") or metrics.get("wall_time_s") or 0)
    duration = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    return f"""# {name}

{metadata.get("description", "")}

Version {metadata["version"]}: {metadata["changelog"][metadata["version"]]}

## Model
- {dims}D {train.get("architecture", "unet")} (channels `{flow(train.get("channels"))}`, strides \
`{flow(train.get("strides"))}`, norm `{flow(train.get("norm"))}`), {metrics.get("parameters", "?")} parameters
- input: {image["num_channels"]} channel(s) ({", ".join(image["channel_def"].values())}), resampled to \
`{flow(train.get("spacing"))}` mm, intensity `{flow(train.get("intensity"))}`; sliding window of \
`{flow(train.get("patch_size"))}` voxels
- output: {pred["num_channels"]} channels (background, {", ".join(classes)}); the label map is written on each \
input's own grid

## Data
{metadata.get("data_source", "")}. Labels: {metadata.get("label_classes", "")}. The configs look for the dataset in \
`{train.get("dataset_dir")}` (pass `--dataset_dir` with yours, in the Medical Segmentation Decathlon layout).

## Training
{metrics.get("epochs", "?")} epochs{stopped} in {duration} on {metrics.get("device", "?")} \
({metrics.get("seconds_per_iteration", "?")} s per iteration), loss `{train.get("loss")}`, optimizer \
`{train.get("optimizer")}`, schedule `{train.get("lr_scheduler")}`; `models/model.pt`: \
{metrics.get("model_weights", "the trained weights")}. Every setting is in `configs/train.yaml` and below.

## Performance
{results}

## Use it
Needs the packages of `configs/metadata.json`, the `unet-bundles` package (`custom_components`) among them. From this
folder:
```bash
python -m monai.bundle run inference --config_file configs/inference.yaml --input_dir IMAGES --output_dir OUT
python -m monai.bundle run evaluating --config_file configs/evaluate.yaml --dataset_dir LABELLED_DATASET
python -m monai.bundle run training --config_file configs/train.yaml --dataset_dir DATASET --output_dir RUN
```

## Large files
`models/model.pt` is not in this folder: `{LARGE_FILES}` names its URL and {HASH_TYPE} `{weights_hash}`; the model
zoo downloads and checks it.

## Settings
| key | value |
|---|---|
{settings}

## License
`LICENSE` (Apache 2.0) covers the configs; the weights were trained on the data above, whose own terms apply to them.
Research use only: not a medical device.
"""


def publish(
    run: str | Path,
    out: str | Path,
    name: str | None = None,
    version: str = DEFAULT_VERSION,
    changelog: str | None = None,
    authors: str | None = None,
    weights_url: str | None = None,
) -> Path:
    """Write the bundle ``OUT/NAME`` and its weights beside it (see the module docstring); return the bundle."""
    run = Path(run)
    missing = [str(path) for path in (*REQUIRED, *COPIED, MODEL_FILE, METRICS_FILE) if not (run / path).is_file()]
    train_text = "" if missing else (run / "configs" / "train.yaml").read_text()
    train = yaml.safe_load(train_text) if train_text else {}
    if train.get(SPLITS_KEY) and not Path(train[SPLITS_KEY]).is_file():
        missing.append(f"{SPLITS_KEY} {train[SPLITS_KEY]} (the run's split)")
    if missing:
        raise PublishError(
            f"{run} is not a finished training run folder: {', '.join(missing)} missing. Publish the output_dir of a "
            "training that ran (a run from before LICENSE was copied: copy its bundle's LICENSE into it)"
        )
    if (run / STAGE_DIR).is_dir():
        raise PublishError(
            f"{run} is a cascade's second stage: it predicts with its first stage's fold models ({run / STAGE_DIR}) "
            "too, and a model-zoo bundle holds one model (models/model.pt). Publish a single-stage run, or share the "
            "run folder itself, which predicts with both stages"
        )
    name = name or bundle_name(run)
    if not re.fullmatch(r"\w+", name):
        raise PublishError(f"--name {name!r}: use letters, digits and underscores only (the zoo's folder models/NAME)")
    bundle = Path(out) / name
    weights = Path(out) / f"{name}.large_files" / MODEL_FILE
    for target in (bundle, weights.parent.parent):
        if target.exists():
            raise PublishError(f"{target} exists: remove it or choose another OUT or --name")

    values = _public_values(train)
    for config in CONFIGS:
        source = run / "configs" / f"{config}.yaml"
        if source.is_file():
            atomic_write_bytes(bundle / "configs" / f"{config}.yaml", freeze(source.read_text(), values).encode())
    for copied in COPIED:
        atomic_write_bytes(bundle / copied, (run / copied).read_bytes())
    if train.get(SPLITS_KEY):
        atomic_write_bytes(bundle / SPLITS_FILE, Path(train[SPLITS_KEY]).read_bytes())

    metrics = _read_json(run / METRICS_FILE)
    evaluation = _read_json(run / EVALUATION_FILE)
    metadata = _read_json(run / METADATA_FILE)
    dataset_dir = str(train["dataset_dir"])
    metadata["data_source"] = metadata.get("data_source", "").replace(dataset_dir, values["dataset_dir"])
    metadata["version"] = version
    metadata["changelog"] = {
        version: changelog
        or f"first release: {metadata.get('name', 'U-Net segmentation')} trained on {Path(dataset_dir).name}"
    }
    metadata["eval_metrics"] = eval_metrics(metadata, evaluation)
    metadata["intended_use"] = intended_use(class_names(metadata))  # a run from before runs wrote their own
    if authors:
        metadata.update(authors=authors, copyright=f"Copyright (c) {authors}")
    atomic_write_json(metadata, bundle / METADATA_FILE)

    atomic_write_bytes(weights, (run / MODEL_FILE).read_bytes())
    digest = file_hash(weights)
    url = weights_url or URL_PLACEHOLDER.format(weights=weights)
    entry = {"path": MODEL_FILE.as_posix(), "url": url, "hash_val": digest, "hash_type": HASH_TYPE}
    atomic_write_bytes(bundle / LARGE_FILES, yaml.safe_dump({"large_files": [entry]}, sort_keys=False).encode())
    atomic_write_bytes(
        bundle / "docs" / "README.md",
        readme(name, metadata, metrics, evaluation, (bundle / "configs" / "train.yaml").read_text(), digest).encode(),
    )
    return bundle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m custom_components.publish",
        description="Write a training run as a bundle to submit to the MONAI model zoo, and its weights beside it.",
    )
    parser.add_argument("run", help="a finished training run folder (its output_dir)")
    parser.add_argument("out", help="folder to write NAME/ (the bundle) and NAME.large_files/ (the weights) into")
    parser.add_argument("--name", help="the bundle's name in the zoo, its folder models/NAME (default: the run's)")
    parser.add_argument("--version", default=DEFAULT_VERSION, help=f"the bundle's version (default {DEFAULT_VERSION})")
    parser.add_argument("--changelog", help="what this version is (default: first release, trained on DATASET)")
    parser.add_argument("--authors", help="authors and copyright holder (default: the bundle's)")
    parser.add_argument("--weights_url", help="public URL of models/model.pt once uploaded (else a TODO in its place)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Publish; a run that cannot be published ends with ``error: ...`` and the fix, no traceback."""
    args = _parser().parse_args(argv)
    try:
        bundle = publish(args.run, args.out, args.name, args.version, args.changelog, args.authors, args.weights_url)
    except PublishError as err:
        sys.exit(f"error: {err}")
    weights = bundle.parent / f"{bundle.name}.large_files"
    print(f"bundle: {bundle} (add it as models/{bundle.name} of a model-zoo checkout)")
    print(f"weights: {weights / MODEL_FILE} (upload; its URL goes into {bundle / LARGE_FILES})")
    print(f"check it as the zoo's CI does, weights in place: cp -r {weights}/. {bundle}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
