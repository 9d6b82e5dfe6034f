"""A cascade of the 3D bundle, as nnU-Net's: a first stage's label maps guide a full-resolution second stage.

Stage 1 is a cross-validated run of the 3D bundle (``kfold run``, usually with ``resolution: coarse``). Stage 2
trains with ``previous_stage`` naming that run's folder: each case gets the label map stage 1 predicted for it out
of fold (by the fold that held it out, never by a model that trained on it, as nnU-Net does), and
:class:`PreviousStageChannelsd` appends it to the image. A stage-2 run folder keeps a copy of stage 1
(:func:`keep_previous_stage`: its folds' configs, weights and out-of-fold label maps) and names it in its evaluate
and inference configs, so it predicts new images from its own folder: stage 1's fold ensemble first
(:func:`custom_components.kfold.ensemble.predict`, label maps in ``OUTPUT/previous_stage/``), then stage 2 on each
image with its map.

``stage_input`` says how stage 2 sees the map. ``crop`` (the default, measured better in benchmarks/RESULTS.md):
stage 2 trains on the box around stage 1's foreground widened by ``stage_margin_mm`` (:class:`StageCropd`) and
predicts inside that box alone, background outside (:class:`StageCropInferer`); the map travels as one region
channel that no network sees. ``channels`` (nnU-Net's): one input channel per foreground class, the whole image
searched. Scores are measured on the whole image either way, so what stage 1 missed counts as missed.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.inferers import Inferer
from monai.transforms import MapTransform, SpatialCrop
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_dst_type

from custom_components.data import DatasetError, _exit_on_dataset_error, case_id
from custom_components.kfold.ensemble import predict
from custom_components.kfold.layout import (
    EVALUATION_FILE,
    METRICS_FILE,
    PREDICTIONS_DIR,
    PREVIOUS_KEY,
    SPLIT_FIELDS,
    SPLITS_FILE,
    STAGE_DIR,
    STATE_FILE,
    fold_finished,
    fold_layout,
    read_list,
    read_state,
)
from custom_components.kfold.splits import KFoldError

KFOLD_RUN = (
    "cross-validate the first stage on this dataset: python -m custom_components.kfold run --bundle bundles/unet3d "
    "--dataset_dir DIR --output STAGE1 --set resolution=coarse, then pass previous_stage=STAGE1"
)
# in a stage-2 run folder's evaluate and inference configs: its own copy of stage 1, wherever the folder is moved
RUN_PREVIOUS_STAGE = f"$@bundle_root + '/{STAGE_DIR}'"
STAGE_INPUTS = ("channels", "crop")  # how stage 2 sees stage 1's label map (the `stage_input` key)
BACKGROUND_LOGIT_GAP = 1.0e4  # outside a crop: the background's logit this far above the others (softmax 1 and 0)
# of a stage-1 fold, what predicting and out-of-fold maps need (not its checkpoint, cache or logs)
KEPT = ("configs", "models/model.pt", METRICS_FILE, str(EVALUATION_FILE), str(PREDICTIONS_DIR), STAGE_DIR)


class CascadeError(DatasetError):
    """``previous_stage`` cannot serve as a first stage; the message names the folder and the fix."""


def stage_channels(previous_stage: str | Path | None, num_classes: int, stage_input: str) -> int:
    """The network's extra input channels: one per foreground class of stage 1's label map with ``channels``; none
    with ``crop`` (its region channel is dropped before the network) or without a first stage."""
    return num_classes - 1 if previous_stage is not None and stage_input == "channels" else 0


def stage_problem(previous_stage: str | Path) -> tuple[str, str] | None:
    """What keeps ``previous_stage`` from being a first stage, and the fix; None for a finished ``kfold run``. Read
    by the settings check before any work, and again when the cases are read."""
    stage = Path(previous_stage)
    if not stage.is_dir():
        return "does not exist", KFOLD_RUN
    if not (stage / STATE_FILE).is_file():
        if (stage / "configs" / "train.yaml").is_file():
            why = "is a single training run: its label maps of the cases it trained on would be in-sample, and stage 2"
            return f"{why} would learn to trust them", KFOLD_RUN
        return f"is not a `kfold run` folder (it has no {STATE_FILE})", KFOLD_RUN
    try:
        state = read_state(stage)
    except KFoldError as err:
        return f"is a damaged `kfold run` folder: {err}", "repair it as said, or cross-validate the first stage again"
    unfinished = [
        fold.name
        for fold in fold_layout(stage, state["fold_count"], state["split_count"])
        if not fold_finished(fold.path, state["max_epochs"])
    ]
    if unfinished:
        fix = "run its `kfold run` command again to the end (finished folds are kept)"
        return f"has {', '.join(unfinished)} not trained and scored yet", fix
    return None


def stage_state(previous_stage: str | Path, class_names: Sequence[str]) -> dict[str, Any]:
    """``previous_stage``'s kfold.json, once it is known to be a finished cross-validation of the same classes."""
    problem = stage_problem(previous_stage)
    if problem is not None:
        raise CascadeError(f"previous_stage {previous_stage} {problem[0]}; {problem[1]}")
    state = read_state(Path(previous_stage))
    if list(state["class_names"]) != list(class_names):
        raise CascadeError(
            f"previous_stage {previous_stage} segments {state['class_names']}, this run {list(class_names)}: a first "
            f"stage must segment the same classes; {KFOLD_RUN}"
        )
    return state


def out_of_fold_maps(previous_stage: str | Path, state: Mapping[str, Any]) -> dict[str, Path]:
    """Case id -> the label map of stage 1's fold that held the case out (the first repeat's, when repeated)."""
    stage = Path(previous_stage)
    splits = read_list(stage / SPLITS_FILE, SPLIT_FIELDS, f"{stage} lacks {SPLITS_FILE}; {KFOLD_RUN}", KFOLD_RUN)
    maps: dict[str, Path] = {}
    for fold in fold_layout(stage, state["fold_count"], state["split_count"]):
        trained = {case_id(case) for case in splits[fold.index]["train"]}
        for case in map(case_id, splits[fold.index]["val"]):
            if case not in trained:
                maps.setdefault(case, fold.path / PREDICTIONS_DIR / f"{case}_seg.nii.gz")
    missing = sorted(str(path) for path in maps.values() if not path.is_file())
    if missing:
        raise CascadeError(
            f"previous_stage {stage}: {len(missing)} out-of-fold label maps are missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), their folds scored with save_predictions false; delete those "
            "folds' evaluation/ folders and run its `kfold run` command again (only the scoring reruns)"
        )
    return maps


def with_stage_maps(
    cases: Sequence[Mapping[str, Any]],
    previous_stage: str | Path | None,
    class_names: Sequence[str],
    dataset_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """``cases`` with each one's stage-1 label map under :data:`PREVIOUS_KEY` (``cases`` as they are without a
    ``previous_stage``).

    A case of stage 1's own dataset (``dataset_dir``) takes its out-of-fold map. Without an ``output_dir`` (training)
    every case must have one; with it (evaluation, inference) the other cases are predicted by stage 1's fold
    ensemble into ``output_dir/previous_stage/``, as new images are.
    """
    if previous_stage is None:
        return [dict(case) for case in cases]
    state = stage_state(previous_stage, class_names)
    same = dataset_dir is not None and os.path.realpath(dataset_dir) == os.path.realpath(state["dataset_dir"])
    maps = out_of_fold_maps(previous_stage, state) if same else {}
    new = [case for case in cases if case_id(str(case["image"])) not in maps]
    if new and output_dir is None:
        where = f"its dataset is {state['dataset_dir']}, not {dataset_dir}" if not same else "it has no fold for them"
        shown = ", ".join(case_id(str(case["image"])) for case in new[:5])
        raise CascadeError(
            f"previous_stage {previous_stage} holds no out-of-fold label map of {len(new)} training case(s) ({shown}"
            f"{', ...' if len(new) > 5 else ''}): {where}; {KFOLD_RUN}"
        )
    if new:
        images = [str(case["image"]) for case in new]
        try:
            written = predict(previous_stage, images, Path(output_dir) / STAGE_DIR)
        except KFoldError as err:
            raise CascadeError(f"previous_stage: {err}") from err
        maps.update(zip((case_id(image) for image in images), written, strict=True))
    return [{**case, PREVIOUS_KEY: str(maps[case_id(str(case["image"]))])} for case in cases]


read_stage_maps = _exit_on_dataset_error(with_stage_maps)


def keep_previous_stage(previous_stage: str | Path | None, output_dir: str | Path) -> None:
    """Copy what of stage 1 predicting and scoring need (:data:`KEPT` of each fold, kfold.json, splits.json) into the
    run folder's ``previous_stage/``, once: the copy is made beside it and renamed, so it is whole or absent."""
    if previous_stage is None:
        return
    stage, target = Path(previous_stage), Path(output_dir) / STAGE_DIR
    if (target / STATE_FILE).is_file():
        return
    partial = target.with_name(f".{STAGE_DIR}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    state = read_state(stage)
    for name in (STATE_FILE, SPLITS_FILE):
        _copy(stage / name, partial / name)
    for fold in fold_layout(stage, state["fold_count"], state["split_count"]):
        for kept in KEPT:
            if (fold.path / kept).exists():
                _copy(fold.path / kept, partial / fold.name / kept)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


class PreviousStageChannelsd(MapTransform):
    """The stage-1 label map under :data:`PREVIOUS_KEY` appended to the image, then dropped: with ``channels`` one
    channel per foreground class (1 inside the class, 0 elsewhere), with ``crop`` one region channel (1 on any
    foreground) for :class:`StageCropd` and :class:`StageCropInferer` to cut around. After the spatial transforms,
    which move it with the image (nearest neighbour), so both lie on one grid; the image keeps its metadata and
    applied operations (inverted from there at inference). ``enabled`` (a ``previous_stage`` is set) and the map's
    presence must agree."""

    def __init__(self, num_classes: int, enabled: bool, stage_input: str, image_key: str = "image") -> None:
        super().__init__(keys=[PREVIOUS_KEY], allow_missing_keys=True)
        if stage_input not in STAGE_INPUTS:
            raise CascadeError(f"stage_input {stage_input!r} is none of {', '.join(STAGE_INPUTS)}: give one of them")
        self.num_classes, self.enabled, self.image_key = int(num_classes), bool(enabled), image_key
        self.stage_input = stage_input

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if (PREVIOUS_KEY in d) != self.enabled:
            raise CascadeError(
                f"a case {'lacks' if self.enabled else 'has'} a stage-1 label map ('{PREVIOUS_KEY}') while "
                f"previous_stage is {'set' if self.enabled else 'null'}: build its cases with "
                "custom_components.cascade.with_stage_maps"
            )
        if not self.enabled:
            return d
        image, labels = d[self.image_key], _plain(d.pop(PREVIOUS_KEY)).round().long()
        if labels.shape[1:] != image.shape[1:]:
            raise CascadeError(
                f"a stage-1 label map of shape {tuple(labels.shape[1:])} does not lie on its image's grid "
                f"{tuple(image.shape[1:])}: predict it on the image's own grid (kfold predict does)"
            )
        if self.stage_input == "crop":
            channels = (labels[:1] > 0).to(image.dtype)
        else:
            classes = torch.arange(1, self.num_classes, device=labels.device).view(-1, *([1] * (labels.ndim - 1)))
            channels = (labels[:1] == classes).to(image.dtype)
        joined = torch.cat([_plain(image), channels.to(image.device)], dim=0)
        if isinstance(image, MetaTensor):
            joined = MetaTensor(joined, meta=image.meta, applied_operations=image.applied_operations)
        d[self.image_key] = joined
        return d


def stage_box(region: torch.Tensor, margin_mm: float, spacing: Sequence[float]) -> tuple[list[int], list[int]]:
    """Start and end (exclusive) per spatial axis of the box around ``region``'s non-zero voxels (channel first),
    widened by ``margin_mm`` (whole voxels of ``spacing``, rounded up) and kept inside it; the whole region when it
    holds nothing, so a case stage 1 found nothing in is searched whole."""
    margin = [math.ceil(float(margin_mm) / float(step)) for step in spacing]
    start, end = generate_spatial_bounding_box(region, lambda x: x > 0, margin=margin, allow_smaller=True)
    if all(b <= a for a, b in zip(start, end, strict=True)):
        return [0] * (region.ndim - 1), list(region.shape[1:])
    return [int(v) for v in start], [int(v) for v in end]


def grid_spacing(image: torch.Tensor, index: int = 0) -> list[float]:
    """The voxel size in mm of ``image`` (a MetaTensor, one case or the ``index``-th of a batch); refused for a plain
    tensor, whose grid is unknown."""
    if not isinstance(image, MetaTensor):
        raise CascadeError("stage_input crop needs the image's grid (a MetaTensor with its affine) to widen the box")
    affine = image.affine[index] if image.affine.ndim == 3 else image.affine  # a batch's affines, or one
    return [float(v) for v in affine_to_spacing(affine, r=affine.shape[-1] - 1)]


class StageCropd(MapTransform):
    """``stage_input: crop`` in training: ``keys`` (the image and label) cut to :func:`stage_box` of the image's last
    channel (stage 1's region, from :class:`PreviousStageChannelsd`), which is then dropped. Off (as it is) when not
    ``enabled``: without a first stage, or with ``channels``."""

    def __init__(self, keys: Sequence[str], margin_mm: float, enabled: bool, image_key: str = "image") -> None:
        super().__init__(keys=keys, allow_missing_keys=True)
        self.margin_mm, self.enabled, self.image_key = float(margin_mm), bool(enabled), image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        image = d[self.image_key]
        start, end = stage_box(_plain(image[-1:]), self.margin_mm, grid_spacing(image))
        crop = SpatialCrop(roi_start=start, roi_end=end)
        d[self.image_key] = image[:-1]
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class StageCropInferer(Inferer):
    """``stage_input: crop`` when predicting: ``inferer`` runs on the image channels inside :func:`stage_box` of the
    last channel (stage 1's region) alone; outside it the output is certain background (its logit
    :data:`BACKGROUND_LOGIT_GAP` above the others), so the scores and label maps cover the whole image."""

    def __init__(self, inferer: Callable[..., torch.Tensor], margin_mm: float) -> None:
        super().__init__()
        self.inferer, self.margin_mm = inferer, float(margin_mm)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs, plain = [], _plain(inputs)
        for index in range(inputs.shape[0]):
            case = plain[index : index + 1]
            start, end = stage_box(case[0, -1:], self.margin_mm, grid_spacing(inputs, index))
            box = tuple(slice(a, b) for a, b in zip(start, end, strict=True))
            inside = self.inferer(case[(slice(None), slice(0, -1), *box)], network, *args, **kwargs)
            output = torch.full(
                (1, inside.shape[1], *case.shape[2:]), -BACKGROUND_LOGIT_GAP, dtype=inside.dtype, device=inside.device
            )
            output[:, 0] = 0.0
            output[(slice(None), slice(None), *box)] = _plain(inside)
            outputs.append(output)
        return convert_to_dst_type(torch.cat(outputs), inputs, dtype=outputs[0].dtype)[0]  # the image's metadata


def stage_inferer(
    inferer: Callable[..., torch.Tensor], previous_stage: str | Path | None, stage_input: str, margin_mm: float
) -> Callable[..., torch.Tensor]:
    """``inferer`` itself, or with a first stage and ``stage_input: crop`` inside :class:`StageCropInferer`."""
    return StageCropInferer(inferer, margin_mm) if previous_stage is not None and stage_input == "crop" else inferer


def _plain(tensor: Any) -> torch.Tensor:
    """The tensor without MONAI's metadata."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


__all__ = [
    "CascadeError",
    "PreviousStageChannelsd",
    "RUN_PREVIOUS_STAGE",
    "STAGE_INPUTS",
    "StageCropInferer",
    "StageCropd",
    "keep_previous_stage",
    "read_stage_maps",
    "stage_box",
    "stage_channels",
    "stage_inferer",
    "stage_problem",
    "with_stage_maps",
]
