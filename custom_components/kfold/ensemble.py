"""The fold models as one: their softmax outputs averaged on new images, as nnU-Net ships its final model.

Built from the folds' own run bundles: the first finished fold's ``configs/inference.yaml`` (every model key
literal in it, read as data; the other folds' must agree) gives the preprocessing, the inferer and the
postprocessing, so an image goes through exactly what one fold's ``monai.bundle run inference`` does: its
preprocessing, the ``inferer``, then ``Invertd`` back onto the input's grid and affine, argmax and ``SaveImaged``.
Each fold's ``models/model.pt`` is loaded (tensors only) into a copy of that network. Only the softmax moves:
MONAI's ``EnsembleEvaluator`` predicts with every fold, each prediction is softmaxed and ``MeanEnsembled`` averages
the class probabilities. Nothing of kfold.json reaches the config parser.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.engines import EnsembleEvaluator
from monai.transforms import Activationsd, Compose, MeanEnsembled, SaveImaged

from custom_components.checkpoint import MODEL_FILE
from custom_components.data import DatasetError, case_id, check_datalist, list_images, load_dataset_json
from custom_components.imageio import read_image
from custom_components.kfold.evaluation import dice_scores, label_dice
from custom_components.kfold.layout import (
    ENSEMBLE_FIELDS,
    ENSEMBLE_FIX,
    ENSEMBLE_TEST_FILE,
    INFERENCE_CONFIG,
    PREVIOUS_KEY,
    STAGE_DIR,
    Fold,
    fold_finished,
    fold_layout,
    read_record,
    read_state,
)
from custom_components.kfold.splits import KFoldError
from custom_components.run_files import ModelError, atomic_write_json, load_weights

logger = logging.getLogger(__name__)

# Keys of a fold's inference.yaml that say where and how it runs, not what the model is: they may differ by fold.
RUN_ONLY_KEYS = frozenset(
    "_meta_ bundle_root output_dir model_path input_dir dataset_dir device amp num_workers progress_bar".split()
)


def ensemble_folds(output: Path, state: dict[str, Any]) -> list[Fold]:
    """The folds whose model joins the ensemble: every finished one."""
    layout = fold_layout(output, state["fold_count"], state["split_count"])
    folds = [fold for fold in layout if fold_finished(fold.path, state["max_epochs"])]
    if not folds:
        raise KFoldError(f"{output} has no finished fold: run `python -m custom_components.kfold run` to the end first")
    return folds


def image_paths(images: Sequence[str | Path]) -> list[Path]:
    """Image files (NIfTI, PNG, TIFF) named directly or found in the named folders (sorted), each checked to exist."""
    paths = []
    for image in images:
        try:
            paths += [Path(item["image"]).resolve() for item in list_images(image)]
        except DatasetError as err:
            raise KFoldError(f"--images {image} is neither an image (NIfTI, PNG, TIFF) nor a folder of them") from err
    return paths


def inference_parser(folds: Sequence[Fold]) -> ConfigParser:
    """A ConfigParser of the first fold's ``configs/inference.yaml`` (its ``bundle_root`` that fold's folder), after
    checking that every fold's inference.yaml describes the same model: same keys and values, apart from where and
    how it runs (:data:`RUN_ONLY_KEYS`). The files are read as data; nothing is evaluated until a key is parsed."""
    configs = {}
    for fold in folds:
        path = fold.path / INFERENCE_CONFIG
        if not path.is_file():
            raise KFoldError(
                f"{path} is missing: {fold.name} is not a run bundle (trained before run folders held their configs?); "
                "cross-validate again into a new --output"
            )
        configs[fold.name] = ConfigParser.load_config_file(str(path))
    (first, reference), *others = configs.items()
    for name, config in others:
        differ = sorted(
            key
            for key in (set(reference) | set(config)) - RUN_ONLY_KEYS
            if reference.get(key, KeyError) != config.get(key, KeyError)
        )
        if differ:
            raise KFoldError(
                f"the folds' models differ: {first}/{INFERENCE_CONFIG} and {name}/{INFERENCE_CONFIG} disagree on "
                f"{', '.join(differ)}; an ensemble averages models of one configuration: cross-validate again into a "
                "new --output, or remove the odd fold's folder"
            )
    parser = ConfigParser(reference)
    parser["bundle_root"] = str(folds[0].path)
    return parser


def predict(
    output: str | Path, images: Sequence[str | Path], out_dir: str | Path, save_probabilities: bool = False
) -> list[Path]:
    """Segment ``images`` with the ensemble of the run in ``output``; the label maps written to ``out_dir``.

    Every finished fold's ``models/model.pt`` predicts each image; the folds' softmax are averaged and the result
    goes through the postprocessing of the folds' ``configs/inference.yaml`` (with ``save_probabilities``, which
    also writes the averaged probabilities, ``<case id>_prob.nii.gz``). Returns the written label maps
    (``<case id>_seg.nii.gz``).
    """
    output = Path(output).resolve()
    state = read_state(output)  # which folds exist and are finished: nothing of it goes into the parser
    folds = ensemble_folds(output, state)
    paths = image_paths(images)
    out_dir = Path(out_dir).resolve()
    parser = inference_parser(folds)
    parser["input_dir"] = str(paths[0])  # what its own input list reads (2D: volumes or images); the loader gets all
    parser["output_dir"] = str(out_dir)  # SaveImaged writes here
    parser["save_probabilities"] = save_probabilities
    device = parser.get_parsed_content("device")
    network = parser.get_parsed_content("network")
    preprocessing = parser.get_parsed_content("preprocessing")
    postprocessing = parser.get_parsed_content("postprocessing")
    inferer = parser.get_parsed_content("inferer")
    amp = parser.get_parsed_content("amp")
    previous_stage = parser.get_parsed_content("previous_stage") if "previous_stage" in parser else None  # 3D key
    items: list[dict[str, str]] = [{"image": str(path)} for path in paths]
    if previous_stage is not None:
        logger.info("first stage: the ensemble of %s", previous_stage)
        maps = predict(previous_stage, paths, out_dir / STAGE_DIR)
        items = [{**item, PREVIOUS_KEY: str(path)} for item, path in zip(items, maps, strict=True)]
    networks = []
    for fold in folds:
        try:
            networks.append(load_weights(copy.deepcopy(network), fold.path / MODEL_FILE, device))
        except ModelError as err:
            raise KFoldError(f"{fold.name}: {err}") from err
    keys = [f"pred_{fold.name}" for fold in folds]
    # the inference postprocessing without its softmax, which is applied to each fold before the average
    after_softmax = [t for t in postprocessing.transforms if not isinstance(t, Activationsd)]
    ensemble_postprocessing = Compose(
        [Activationsd(keys=keys, softmax=True), MeanEnsembled(keys=keys, output_key="pred"), *after_softmax]
    )
    loader = DataLoader(Dataset(items, transform=preprocessing), batch_size=1)
    evaluator = EnsembleEvaluator(
        device=device,
        val_data_loader=loader,
        networks=networks,
        pred_keys=keys,
        inferer=inferer,
        postprocessing=ensemble_postprocessing,
        amp=amp,
    )
    logger.info("ensemble of %d folds on %d image(s) into %s", len(folds), len(paths), out_dir)
    evaluator.run()
    saver = next(t for t in after_softmax if isinstance(t, SaveImaged)).saver
    return [Path(saver.folder_layout.filename(subject=str(path))) for path in paths]


def score_test_cases(output: str | Path) -> dict[str, Any] | None:
    """Dice of the ensemble on dataset.json's labelled ``test`` cases, written to ``ensemble/test_dice.json``.

    The one fair ensemble score: no fold saw these cases. Measured on the original image grid. None when
    dataset.json lists no ``test`` entry with a ``label``; an earlier result from the same folds is reused.
    """
    output = Path(output).resolve()
    state = read_state(output)
    description = load_dataset_json(state["dataset_dir"])
    tests = [entry for entry in description.get("test", []) if isinstance(entry, dict) and "label" in entry]
    if not tests:
        return None
    folds = [fold.name for fold in ensemble_folds(output, state)]
    path = output / ENSEMBLE_TEST_FILE
    if path.is_file():
        previous = read_record(path, ENSEMBLE_FIELDS, ENSEMBLE_FIX, ENSEMBLE_FIX)
        if previous["models"] == folds:
            return previous
    checked = check_datalist(
        {**description, "training": tests}, state["dataset_dir"], state["num_classes"], state["image_dims"]
    )
    predictions = predict(output, [entry["image"] for entry in checked], path.parent / "test")
    rows = []
    for entry, prediction in zip(checked, predictions, strict=True):
        predicted = torch.as_tensor(read_image(prediction)[0], dtype=torch.long)
        label = torch.as_tensor(read_image(entry["label"])[0], dtype=torch.long)
        rows.append(label_dice(predicted, label, state["num_classes"]))
    cases = [case_id(entry["image"]) for entry in checked]
    scores = dice_scores(torch.stack(rows), state["class_names"], cases)
    result = {"models": folds, **scores, "space": "original image grid"}
    atomic_write_json(result, path)
    return result
