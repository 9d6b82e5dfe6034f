"""nnU-Net's cascade through the user's commands: `kfold select --cascade` cross-validates a first stage
(`resolution: coarse`) and a second stage on its out-of-fold label maps (`previous_stage`) beside the single stage;
the second stage's run folders predict with both stages from anywhere, and unusable first stages are refused. The
crop variant (`stage_input: crop`) trains and predicts inside the box around the first stage's foreground."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_components import settings
from custom_components.cascade import (
    CascadeError,
    PreviousStageChannelsd,
    StageCropd,
    StageCropInferer,
    with_stage_maps,
)
from custom_components.data import check_datalist, load_dataset_json
from custom_components.inference import flip_tta
from custom_components.publish import PublishError, publish
from custom_components.synthetic import write_dataset
from tests.conftest import SMALL_3D, USER_CWD, run_bundle

KFOLD = [sys.executable, "-m", "custom_components.kfold"]
CLASSES = ["organ", "lesion"]
KEYS = {
    **{k: v for k, v in SMALL_3D.items() if k not in ("num_folds", "report")},
    "max_epochs": "1",
    "val_interval": "1",
    "iterations_per_epoch": "2",
}


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The user's `kfold select --cascade` of the 3D bundle on 6 cases (one more is held out) in 2 folds: the
    single-stage bundle, stage 1 (`unet3d_coarse`) and stage 2 on its out-of-fold maps as channels (`unet3d_cascade`)
    and as crops (`unet3d_cascade_crop`)."""
    root = tmp_path_factory.mktemp("cascade")
    dataset = write_dataset(root / "data", cases=7, seed=3, shape=(40, 40, 16))
    description = json.loads((dataset / "dataset.json").read_text())
    description["training"], held_out = description["training"][:6], description["training"][6]
    (dataset / "dataset.json").write_text(json.dumps(description))
    command = [*KFOLD, "select", "--dataset_dir", str(dataset), "--output", str(root / "select"), "--folds", "2"]
    command += ["--bundles", "unet3d", "--cascade", "--set", *[f"{key}={value}" for key, value in KEYS.items()]]
    result = subprocess.run(command, cwd=USER_CWD.name, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return SimpleNamespace(
        root=root,
        dataset=dataset,
        selection=root / "select",
        stage1=root / "select" / "unet3d_coarse",
        stage2=root / "select" / "unet3d_cascade",
        crop=root / "select" / "unet3d_cascade_crop",
        image=dataset / held_out["image"],
    )


def first_conv_inputs(run: Path) -> int:
    """The input channels of a run's trained network (its first convolution's weight)."""
    weights = torch.load(run / "models" / "model.pt", weights_only=True)
    return next(value for value in weights.values() if value.ndim == 5).shape[1]


def test_each_case_gets_the_map_of_the_fold_that_held_it_out(cascade: SimpleNamespace) -> None:
    description = load_dataset_json(cascade.dataset)
    cases = with_stage_maps(
        check_datalist(description, cascade.dataset, 3, 3), cascade.stage1, CLASSES, cascade.dataset
    )
    splits = json.loads((cascade.stage1 / "splits.json").read_text())
    assert len(cases) == 6
    for case in cases:
        name, fold = Path(case["image"]).name.split(".")[0], Path(case["previous"]).parents[2].name
        split = splits[int(fold.removeprefix("fold_"))]
        assert name in split["val"] and name not in split["train"], (name, fold)
        assert Path(case["previous"]).name == f"{name}_seg.nii.gz" and Path(case["previous"]).is_file()


def test_stage_two_takes_the_maps_as_one_channel_per_class(cascade: SimpleNamespace) -> None:
    assert first_conv_inputs(cascade.stage1 / "fold_0") == 1
    assert first_conv_inputs(cascade.stage2 / "fold_0") == 1 + len(CLASSES)
    image, previous = torch.randn(1, 4, 5, 6), torch.randint(0, 3, (1, 4, 5, 6))
    joined = PreviousStageChannelsd(3, True, "channels")({"image": image, "previous": previous})
    assert set(joined) == {"image"} and joined["image"].shape == (3, 4, 5, 6)
    assert torch.equal(joined["image"][0], image[0])
    for label in (1, 2):
        assert torch.equal(joined["image"][label], (previous[0] == label).float())
    with pytest.raises(CascadeError, match="lacks a stage-1 label map"):
        PreviousStageChannelsd(3, True, "channels")({"image": image})
    with pytest.raises(CascadeError, match="has a stage-1 label map .* previous_stage is null"):
        PreviousStageChannelsd(3, False, "channels")({"image": image, "previous": previous})


def test_stage_two_folds_are_scored_on_out_of_fold_maps_and_keep_stage_one(cascade: SimpleNamespace) -> None:
    report = json.loads((cascade.stage2 / "report.json").read_text())
    assert sorted(report["out_of_fold"]) == [f"case_00{i}" for i in range(6)]
    for fold in ("fold_0", "fold_1"):
        run = cascade.stage2 / fold
        assert not (run / "evaluation" / "previous_stage").exists()  # nothing predicted again: the stored maps
        kept = run / "previous_stage"
        assert sorted(p.name for p in kept.glob("fold_*/models/model.pt")) == ["model.pt"] * 2
        assert not list(kept.glob("fold_*/models/checkpoint_last.pt"))
        for config in ("inference.yaml", "evaluate.yaml"):
            assert "previous_stage: \"$@bundle_root + '/previous_stage'\"" in (run / "configs" / config).read_text()


@contextmanager
def held_out_without_stage_one(cascade: SimpleNamespace, tmp_path: Path) -> Iterator[Path]:
    """A folder holding the held-out image as scan.nii.gz, while stage 1's own folder is renamed away: a stage-2 run
    folder must predict from its copy alone."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(cascade.image, images / "scan.nii.gz")
    hidden = cascade.stage1.rename(cascade.root / "stage1_hidden")
    try:
        yield images
    finally:
        hidden.rename(cascade.stage1)


def test_a_moved_stage_two_run_folder_predicts_with_both_stages(cascade: SimpleNamespace, tmp_path: Path) -> None:
    moved = Path(shutil.copytree(cascade.stage2 / "fold_0", tmp_path / "model"))
    with held_out_without_stage_one(cascade, tmp_path) as images:
        run_bundle(
            moved / "configs" / "inference.yaml",
            {"input_dir": images, "output_dir": tmp_path / "out"},
            run_id="inference",
        )
        command = [*KFOLD, "predict", str(cascade.stage2), "--images", str(images), "--out", str(tmp_path / "ens")]
        result = subprocess.run(command, cwd=USER_CWD.name, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    source = nib.load(images / "scan.nii.gz")
    for out in ("out", "ens"):
        for written in (tmp_path / out / "scan_seg.nii.gz", tmp_path / out / "previous_stage" / "scan_seg.nii.gz"):
            label = nib.load(written)
            assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4), written
            assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1, 2}


def test_first_stages_that_cannot_serve_are_refused_with_the_fix(cascade: SimpleNamespace, tmp_path: Path) -> None:
    description = load_dataset_json(cascade.dataset)
    cases = check_datalist(description, cascade.dataset, 3, 3)

    def refused(stage: Path, classes: list[str] = CLASSES, dataset: Path = cascade.dataset) -> str:
        with pytest.raises(CascadeError) as raised:
            with_stage_maps(cases, stage, classes, dataset)
        return str(raised.value)

    assert "is a single training run: its label maps of the cases it trained on would be in-sample" in refused(
        cascade.stage1 / "fold_0"
    )
    assert "does not exist" in refused(tmp_path / "nowhere")
    assert "segments ['organ', 'lesion'], this run ['liver', 'tumour']" in refused(cascade.stage1, ["liver", "tumour"])
    elsewhere = Path(shutil.copytree(cascade.dataset, tmp_path / "other"))
    assert "holds no out-of-fold label map of 6 training case(s)" in refused(cascade.stage1, dataset=elsewhere)
    unfinished = Path(shutil.copytree(cascade.stage1, tmp_path / "unfinished"))
    shutil.rmtree(unfinished / "fold_1" / "evaluation")
    assert "fold_1 not trained and scored yet" in refused(unfinished)
    for message in (refused(cascade.stage1 / "fold_0"), refused(tmp_path / "nowhere")):
        assert "python -m custom_components.kfold run --bundle bundles/unet3d" in message
    # through the user's command: a clean exit with the message, no traceback, nothing trained
    result = run_bundle(
        "bundles/unet3d/configs/train.yaml",
        {
            **KEYS,
            "dataset_dir": cascade.dataset,
            "output_dir": tmp_path / "run",
            "previous_stage": cascade.stage1 / "fold_0",
        },
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "is a single training run" in result.stderr
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


def test_select_compares_the_cascade_with_the_single_stage_bundle(cascade: SimpleNamespace) -> None:
    selection = json.loads((cascade.selection / "selection.json").read_text())
    stages = ("unet3d", "unet3d_coarse", "unet3d_cascade", "unet3d_cascade_crop")
    assert {*stages, "unet3d+unet3d_cascade", "unet3d+unet3d_coarse+unet3d_cascade"} <= set(selection["configurations"])
    for name in stages:  # every configuration scored on all 6 cases out of fold
        assert len(selection["configurations"][name]["cases"]) == 6
        assert np.isfinite(selection["configurations"][name]["mean_dice"])
    plans = json.loads((cascade.selection / "select.json").read_text())["plans"]
    assert plans["unet3d_coarse"]["resolution"] == "coarse" and "previous_stage" not in plans["unet3d"]
    assert plans["unet3d_cascade"]["previous_stage"] == str(cascade.stage1)
    assert plans["unet3d_cascade_crop"]["previous_stage"] == str(cascade.stage1)
    assert (
        plans["unet3d_cascade_crop"]["stage_input"] == "crop" and plans["unet3d_cascade"]["stage_input"] == "channels"
    )
    assert "`unet3d_coarse/`, `unet3d_cascade/`" in (cascade.selection / "selection.md").read_text()


def test_a_stage_two_run_is_not_published_as_a_one_model_bundle(cascade: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="is a cascade's second stage: it predicts with its first stage's fold"):
        publish(cascade.stage2 / "fold_0", tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


def _grid(shape: tuple[int, ...], spacing: tuple[float, float, float], region: tuple[slice, ...]) -> MetaTensor:
    """An image of ``shape`` (channel first, random values) on a grid of ``spacing`` mm whose last channel is 1 on
    ``region``: what PreviousStageChannelsd hands on with ``stage_input: crop``."""
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    image[-1] = 0
    if region:
        image[(-1, *region)] = 1
    return MetaTensor(image, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def test_crop_mode_trains_on_the_box_around_the_first_stage_foreground() -> None:
    previous = torch.zeros(1, 20, 16, 12, dtype=torch.long)
    previous[0, 5:7, 8, 3:5] = 2
    region = PreviousStageChannelsd(num_classes=3, enabled=True, stage_input="crop")(
        {"image": torch.randn(1, 20, 16, 12), "previous": previous}
    )["image"]
    assert region.shape == (2, 20, 16, 12) and torch.equal(region[1], (previous[0] > 0).float())

    image = _grid((2, 20, 16, 12), (1.0, 2.0, 3.0), (slice(5, 7), slice(8, 9), slice(3, 5)))
    label = MetaTensor(torch.arange(20 * 16 * 12).reshape(1, 20, 16, 12), affine=image.affine)
    cut = StageCropd(["image", "label"], margin_mm=4.0, enabled=True)({"image": image, "label": label})
    # 4 mm: 4, 2 and 2 voxels (rounded up) on every side, kept inside the image
    assert cut["image"].shape == (1, 10, 5, 6) and cut["label"].shape == (1, 10, 5, 6)
    assert torch.equal(cut["image"][0], image[0, 1:11, 6:11, 1:7])
    assert torch.equal(cut["label"], label[:, 1:11, 6:11, 1:7])
    # stage 1 found nothing: the whole case, without its region channel
    empty = StageCropd(["image", "label"], 4.0, True)({"image": _grid((2, 20, 16, 12), (1, 1, 1), ()), "label": label})
    assert empty["image"].shape == (1, 20, 16, 12) and empty["label"].shape == (1, 20, 16, 12)
    assert StageCropd(["image", "label"], 4.0, False)({"image": image})["image"].shape == (2, 20, 16, 12)
    with pytest.raises(CascadeError, match="needs the image's grid"):
        StageCropd(["image"], 4.0, True)({"image": torch.zeros(2, 4, 4, 4)})


def test_crop_mode_predicts_inside_the_box_alone_and_background_elsewhere() -> None:
    seen: list[tuple[int, ...]] = []

    def inner(inputs: torch.Tensor, network: object) -> torch.Tensor:
        seen.append(tuple(inputs.shape))
        return torch.stack([torch.zeros_like(inputs[:, 0]), inputs[:, 0].abs() + 1, torch.zeros_like(inputs[:, 0])], 1)

    image = _grid((2, 20, 16, 12), (1.0, 2.0, 3.0), (slice(5, 7), slice(8, 9), slice(3, 5)))
    batch = MetaTensor(image.as_tensor()[None], affine=image.affine[None])
    batch.is_batch = True
    out = StageCropInferer(inner, margin_mm=4.0)(batch, network=None)
    assert seen == [(1, 1, 10, 5, 6)]  # the image channel inside the box, not the region channel
    assert out.shape == (1, 3, 20, 16, 12)
    labels = out.argmax(1)[0]
    inside = torch.zeros(20, 16, 12, dtype=torch.bool)
    inside[1:11, 6:11, 1:7] = True
    assert bool((labels[inside] == 1).all()) and bool((labels[~inside] == 0).all())
    assert torch.allclose(torch.softmax(out, 1)[0, 0][~inside], torch.ones(()))
    assert torch.equal(out[0, 1, 1:11, 6:11, 1:7], image[0, 1:11, 6:11, 1:7].abs() + 1)
    # inside flip test-time augmentation, as evaluation and inference with `tta` wrap it: the same box
    flipped = flip_tta(StageCropInferer(inner, 4.0), True, None, 3)(batch, None)
    assert seen[-1] == (1, 1, 10, 5, 6) and bool((flipped.argmax(1)[0][~inside] == 0).all())
    assert bool((flipped.argmax(1)[0][inside] == 1).all())
    # nothing found by stage 1: the whole image is searched
    whole = MetaTensor(_grid((2, 20, 16, 12), (1, 1, 1), ()).as_tensor()[None], affine=image.affine[None])
    whole.is_batch = True
    StageCropInferer(inner, 4.0)(whole, network=None)
    assert seen[-1] == (1, 1, 20, 16, 12)


def test_a_stage_input_set_without_a_first_stage_is_refused() -> None:
    bundle = Path("bundles/unet3d").resolve()
    problems = settings.check({"stage_input": "channels"}, bundle, "train")
    fix = "set previous_stage to a first stage's `kfold run` folder, or leave stage_input out"
    why = "says how a cascade's second stage sees its first, and previous_stage is null"
    assert [str(p) for p in problems] == [f'stage_input = "channels": {why}; {fix}']
    assert settings.check({"stage_input": "crop"}, bundle, "train") == []  # the default, inert in one stage
    assert settings.check({"stage_margin_mm": -1.0}, bundle, "train")[0].key == "stage_margin_mm"


def test_a_crop_stage_two_predicts_from_its_moved_run_folder(cascade: SimpleNamespace, tmp_path: Path) -> None:
    run = Path(shutil.copytree(cascade.crop / "fold_0", tmp_path / "model"))
    assert first_conv_inputs(run) == 1  # the region channel is cut around, never seen by the network
    assert "stage_input: crop" in (run / "configs" / "inference.yaml").read_text()
    with held_out_without_stage_one(cascade, tmp_path) as images:
        keys = {"input_dir": images, "output_dir": tmp_path / "out"}
        run_bundle(run / "configs" / "inference.yaml", keys, run_id="inference")
    source, label = nib.load(images / "scan.nii.gz"), nib.load(tmp_path / "out" / "scan_seg.nii.gz")
    assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4)
    first = np.asarray(nib.load(tmp_path / "out" / "previous_stage" / "scan_seg.nii.gz").dataobj) > 0
    found = np.asarray(label.dataobj) > 0
    if first.any():  # foreground only within stage 1's box widened by the margin (and two voxels of resampling)
        spacing = np.abs(np.diag(source.affine)[:3])
        reach = np.ceil(10.0 / spacing).astype(int) + 2
        lows, highs = np.argwhere(first).min(0) - reach, np.argwhere(first).max(0) + reach
        outside = np.ones_like(found)
        outside[tuple(slice(max(lo, 0), hi + 1) for lo, hi in zip(lows, highs, strict=True))] = False
        assert not found[outside].any()
