"""The fold models as one: their softmax outputs averaged on new images, as nnU-Net ships its final model.

Built on the bundle's inference overlay (configs/inference.yaml), so an image goes through exactly what a single
model's inference does: its preprocessing, the bundle's ``val_inferer``, then ``Invertd`` back onto the input's
grid and affine, argmax and ``SaveImaged``. Only the softmax moves: MONAI's ``EnsembleEvaluator`` predicts with
every fold, each prediction is softmaxed and ``MeanEnsembled`` averages the class probabilities.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.engines import EnsembleEvaluator
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms import Activationsd, Compose, MeanEnsembled, SaveImaged

from custom_components.data import DatasetError, case_id, check_datalist, list_images, load_dataset_json
from custom_components.handlers import atomic_write_json
from custom_components.kfold.bundle import Bundle
from custom_components.kfold.evaluation import dice_scores
from custom_components.kfold.layout import ENSEMBLE_TEST_FILE, Fold, fold_finished, fold_layout, read_state
from custom_components.kfold.splits import KFoldError
from custom_components.paths import working_directory

logger = logging.getLogger(__name__)


def ensemble_folds(output: Path, state: dict[str, Any]) -> list[Fold]:
    """The folds whose model joins the ensemble: every finished one."""
    layout = fold_layout(output, state["fold_count"], state["split_count"])
    folds = [fold for fold in layout if fold_finished(fold.path, state["max_epochs"])]
    if not folds:
        raise KFoldError(f"{output} has no finished fold: run `python -m custom_components.kfold run` to the end first")
    return folds


def image_paths(images: Sequence[str | Path]) -> list[Path]:
    """NIfTI files named directly or found in the named folders (sorted), each checked to exist."""
    paths = []
    for image in images:
        try:
            paths += [Path(item["image"]) for item in list_images(image)]
        except DatasetError as err:
            raise KFoldError(f"--images {image} is neither a NIfTI file (.nii, .nii.gz) nor a folder of them") from err
    return paths


def predict(output: str | Path, images: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Segment ``images`` with the ensemble of the run in ``output``; the label maps written to ``out_dir``.

    Every finished fold's ``model.pt`` predicts each image; the folds' softmax are averaged and the result
    goes through the inference overlay's postprocessing. Returns the written files (``<case id>_seg.nii.gz``).
    """
    output = Path(output).resolve()
    state = read_state(output)
    folds = ensemble_folds(output, state)
    paths = image_paths(images)
    bundle = Bundle.find(state["bundle"], overlays=("inference",))
    overrides = {
        **state["overrides"],
        "dataset_dir": state["dataset_dir"],
        "num_classes": str(state["num_classes"]),
        "in_channels": str(state["in_channels"]),
        "input_dir": str(paths[0]),  # what the overlay's own file list would read; the loader below gets them all
        "prediction_dir": str(Path(out_dir).resolve()),
    }
    parser = bundle.parser(overrides, overlays=("inference",))
    with working_directory(bundle.root):
        device = parser.get_parsed_content("device")
        network = parser.get_parsed_content("network")
        preprocessing = parser.get_parsed_content("infer#preprocessing")
        postprocessing = parser.get_parsed_content("infer#postprocessing")
        inferer = parser.get_parsed_content("val_inferer")
        amp = parser.get_parsed_content("amp")
    networks = []
    for fold in folds:
        model = copy.deepcopy(network)
        model.load_state_dict(torch.load(fold.path / "model.pt", map_location=device, weights_only=True))
        networks.append(model)
    keys = [f"pred_{fold.name}" for fold in folds]
    # the overlay's postprocessing without its softmax, which is applied to each fold before the average
    after_softmax = [t for t in postprocessing.transforms if not isinstance(t, Activationsd)]
    ensemble_postprocessing = Compose(
        [Activationsd(keys=keys, softmax=True), MeanEnsembled(keys=keys, output_key="pred"), *after_softmax]
    )
    loader = DataLoader(Dataset([{"image": str(path)} for path in paths], transform=preprocessing), batch_size=1)
    evaluator = EnsembleEvaluator(
        device=device,
        val_data_loader=loader,
        networks=networks,
        pred_keys=keys,
        inferer=inferer,
        postprocessing=ensemble_postprocessing,
        amp=amp,
    )
    logger.info("ensemble of %d folds on %d image(s) into %s", len(folds), len(paths), overrides["prediction_dir"])
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
        previous = json.loads(path.read_text())
        if previous.get("models") == folds:
            return previous
    checked = check_datalist(
        {**description, "training": tests}, state["dataset_dir"], state["num_classes"], state["image_dims"]
    )
    predictions = predict(output, [entry["image"] for entry in checked], path.parent / "test")
    rows = []
    for entry, prediction in zip(checked, predictions, strict=True):
        predicted = torch.as_tensor(np.asarray(nib.load(prediction).dataobj), dtype=torch.long)
        label = torch.as_tensor(np.asarray(nib.load(entry["label"]).dataobj), dtype=torch.long)
        onehots = [one_hot(x.reshape(label.shape)[None, None], state["num_classes"], dim=1) for x in (predicted, label)]
        rows.append(compute_dice(*onehots, include_background=False, ignore_empty=True)[0])
    cases = [case_id(entry["image"]) for entry in checked]
    scores = dice_scores(torch.stack(rows), state["class_names"], cases)
    result = {"models": folds, **scores, "space": "original image grid"}
    atomic_write_json(result, path)
    return result
