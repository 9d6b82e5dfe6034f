"""``resolution: coarse``: the plan coarsens the spacing as nnU-Net makes its ``3d_lowres`` until one patch holds a
whole median volume (and keeps the spacing where one already does); the plan cache keeps full and coarse plans
apart; ``plan: off`` cannot make a coarse stage; a spacing the user sets wins; ``prepare plan`` writes the coarse
plan a training makes. Planning only: no training."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from custom_components import auto_plan, prepare, settings
from custom_components.config_text import freeze
from custom_components.planning import bundle_config, fit_plan
from custom_components.settings_declarations import BundleConfigs
from custom_components.step_measure import bundle_parser
from custom_components.synthetic import write_dataset
from tests.conftest import REPO, run_bundle

BUNDLE_3D = REPO / "bundles/unet3d"
# a tiny network (fast steps) that divides each axis by 4, and a step budget that a patch of the median volume at
# full resolution (about 128x128x64 voxels) is well over
NETWORK = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}
DIVISOR = 4
GFLOP = 1.0


class _Lines(logging.Handler):
    """Every message logged to the handler, for the tests to read what the plan said."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _plan_log() -> Iterator[list[str]]:
    """The messages ``plan: auto`` (and the plan it makes) logs meanwhile."""
    logger, handler = logging.getLogger(auto_plan.__name__), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _median_patch(fingerprint: dict, spacing: list[float]) -> np.ndarray:
    """The median case resampled to ``spacing``, rounded down to the network's divisor: the first patch the plan
    tries at that spacing."""
    shapes = np.array([case["shape"] for case in fingerprint["cases"]], dtype=float)
    spacings = np.array([case["spacing"] for case in fingerprint["cases"]], dtype=float)
    return np.median(shapes * spacings / np.asarray(spacing), axis=0) // DIVISOR * DIVISOR


def _planned(dataset: Path, cache: Path, **keys: object) -> dict:
    """What ``plan: auto`` plans for a training of the 3D bundle on CPU with the tiny network, its step budget and
    ``keys`` (the settings as the settings check hands them over: the bundle's own, with those set on top)."""
    values = BundleConfigs.read(BUNDLE_3D).values("train")
    values.update(dataset_dir=str(dataset), plan_cache_dir=str(cache), plan_cpu_step_gflop=GFLOP, **NETWORK, **keys)
    return auto_plan.planned_values(values, BUNDLE_3D, lambda: "cpu")


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic CT volumes of about 128x128x64 voxels of 0.8x0.8x2.5 mm."""
    return write_dataset(tmp_path_factory.mktemp("coarse") / "ct", cases=4, seed=3, shape=(128, 128, 64))


@pytest.fixture(scope="module")
def plans(large: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``plan: auto``'s plans for a full and a coarse training on ``large`` (one cache), what each logged, and the
    dataset's fingerprint."""
    cache = tmp_path_factory.mktemp("plans")
    found: dict = {"cache": cache}
    for resolution in ("full", "coarse"):
        with _plan_log() as lines:
            found[resolution] = _planned(large, cache, resolution=resolution)
        found[f"{resolution}_log"] = "\n".join(lines)
    found["fingerprint"] = json.loads(next(cache.glob("*.json")).read_text())["fingerprint"]
    return found


def test_the_coarse_spacing_follows_nnunets_steps_and_one_patch_holds_the_median_volume(plans: dict) -> None:
    full, coarse = plans["full"], plans["coarse"]
    assert full["spacing"] == [0.8, 0.8, 2.5]  # the data's own
    assert all(c >= f for c, f in zip(coarse["spacing"], full["spacing"], strict=True))
    assert any(c > f for c, f in zip(coarse["spacing"], full["spacing"], strict=True))
    # nnU-Net's steps: each axis is its full spacing times a whole power of 1.03, and the in-plane axes, over twice
    # finer than the slices, took 16 steps alone (0.8 * 1.03**16 = 1.28 mm is the first within twice 2.5 mm)
    steps = [math.log(c / f, 1.03) for c, f in zip(coarse["spacing"], full["spacing"], strict=True)]
    assert steps == pytest.approx([round(n) for n in steps], abs=0.01)
    assert round(steps[0]) == round(steps[1]) == round(steps[2]) + 16

    # the coarse patch holds the whole median volume at its spacing (rounded down to the divisor); at full resolution
    # the patch the same budget affords does not
    fingerprint = plans["fingerprint"]
    assert all(np.asarray(coarse["patch_size"]) >= _median_patch(fingerprint, coarse["spacing"]))
    assert any(np.asarray(full["patch_size"]) < _median_patch(fingerprint, full["spacing"]))
    logged = f"resolution coarse: spacing {coarse['spacing']} mm: the patch {coarse['patch_size']} holds"
    assert logged in plans["coarse_log"] and "of the median volume" in plans["coarse_log"]
    assert "resolution coarse" not in plans["full_log"]


def test_the_cache_keeps_full_and_coarse_plans_apart(plans: dict, large: Path) -> None:
    cached = [json.loads(path.read_text()) for path in plans["cache"].glob("*.json")]
    assert len(cached) == 2
    by_resolution = {plan["identity"]["user"].get("resolution", "full"): plan["values"] for plan in cached}
    assert by_resolution["coarse"]["spacing"] == plans["coarse"]["spacing"] != by_resolution["full"]["spacing"]
    for resolution in ("coarse", "full"):  # a second training of each reads its own plan, not the other's
        with _plan_log() as lines:
            assert _planned(large, plans["cache"], resolution=resolution) == plans[resolution]
        assert any("from the cached plan" in line for line in lines)
    assert len(list(plans["cache"].glob("*.json"))) == 2


def test_a_coarse_stage_gains_nothing_when_a_volume_is_one_patch(dataset3d: Path) -> None:
    lines: list[str] = []
    user = {**NETWORK, "resolution": "coarse"}
    fitted = fit_plan(dataset3d, bundle_config(3), 3, "cpu", 2**30, gflop=GFLOP, user=user, log=lines.append)
    assert fitted.values["spacing"] == [0.8, 0.8, 2.5]  # the full resolution, kept
    assert all(np.asarray(fitted.values["patch_size"]) >= _median_patch(fitted.fingerprint, [0.8, 0.8, 2.5]))
    assert any("a coarse stage gains nothing on this data: spacing kept" in line for line in lines)


def test_a_spacing_the_user_sets_wins_over_coarse(plans: dict, large: Path, tmp_path: Path) -> None:
    with _plan_log() as lines:
        planned = _planned(large, tmp_path / "cache", resolution="coarse", spacing=[0.8, 0.8, 2.5])
    assert "spacing" not in planned  # the user's, kept
    assert planned["patch_size"] == plans["full"]["patch_size"]  # fitted at that spacing, not at a coarser one
    assert "resolution coarse had no effect on spacing: spacing [0.8, 0.8, 2.5] is set (kept)" in lines


def test_with_a_patch_size_set_the_spacing_is_the_first_whose_median_volume_fits_it(large: Path) -> None:
    patch, lines = [64, 64, 32], []
    user = {**NETWORK, "resolution": "coarse"}
    fitted = fit_plan(
        large, bundle_config(3), 3, "cpu", 2**30, gflop=GFLOP, user=user, fixed={"patch_size": patch}, log=lines.append
    )
    spacing = fitted.values["spacing"]
    assert all(_median_patch(fitted.fingerprint, spacing) <= patch)
    # one step of 1.03 finer (every axis: x and y are within twice z by then) the median volume does not fit
    assert spacing[2] > 2.5 and any(_median_patch(fitted.fingerprint, [s / 1.03 for s in spacing]) > patch)
    assert any(line.startswith(f"resolution coarse: spacing {spacing} mm") for line in lines)


def test_plan_off_cannot_make_a_coarse_stage(large: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    keys = {"dataset_dir": large, "output_dir": out, "plan": "off", "resolution": "coarse"}
    result = run_bundle("bundles/unet3d/configs/train.yaml", keys, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    fix = "set plan: auto, or set spacing and patch_size yourself"
    assert f'resolution = "coarse": the plan chooses the coarse spacing, and plan is off; {fix}' in result.stderr
    assert not (out / "configs").exists() and not (out / "models").exists()

    by_hand = {"plan": "off", "resolution": "coarse", "spacing": [2.0, 2.0, 4.0], "patch_size": [64, 64, 32]}
    assert settings.check(by_hand, BUNDLE_3D) == []  # a coarse stage set by hand
    half = {key: by_hand[key] for key in ("plan", "resolution", "spacing")}
    assert [problem.key for problem in settings.check(half, BUNDLE_3D)] == ["resolution"]
    # a run folder writes every planned value down with plan off: coarse asked of a full run's folder is refused,
    # a coarse run's folder trains again as it is
    run = Path(shutil.copytree(BUNDLE_3D, tmp_path / "run_folder"))
    train = run / "configs" / "train.yaml"
    text = train.read_text()
    train.write_text(freeze(text, {"plan": "off", "spacing": [0.8, 0.8, 2.5], "patch_size": [48, 32, 24]}))
    assert [problem.key for problem in settings.check({"resolution": "coarse"}, run)] == ["resolution"]
    train.write_text(freeze(text, {**by_hand, "spacing": [2.1219, 2.1219, 4.1321], "patch_size": [40, 40, 32]}))
    assert settings.check({"max_epochs": 10}, run) == []


def test_prepare_plan_writes_the_coarse_plan_a_training_makes(plans: dict, large: Path, copy_dataset) -> None:
    dataset = copy_dataset(large)
    network = ["--set", "channels=[4,8,16]", "--set", "strides=[2,2]", "--set", "num_res_units=0"]
    args = ["plan", str(dataset), "--device", "cpu", "--cpu-step-gflop", str(GFLOP), "--set", "resolution=coarse"]
    assert prepare.main([*args, *network]) == 0
    written = yaml.safe_load((dataset / "plan_3d.yaml").read_text())
    assert written["resolution"] == "coarse"
    for key in ("spacing", "patch_size", "batch_size"):  # FLOPs are counted: the training's plan
        assert written[key] == plans["coarse"][key], key


def test_a_cascade_stage_is_planned_with_its_extra_channels_and_cached_apart(large: Path, tmp_path: Path) -> None:
    """Stage 2's step takes the image and one channel per foreground class of stage 1's map: the step the plan
    measures is built with them, and its plan is not the single stage's."""
    stage1 = str(tmp_path / "stage1")
    keys = {"previous_stage": stage1, "num_classes": 3, "in_channels": 1, "stage_input": "channels"}
    assert bundle_parser(bundle_config(3), keys).get_parsed_content("network_in_channels") == 3
    crop = bundle_parser(bundle_config(3), {**keys, "stage_input": "crop"})
    assert crop.get_parsed_content("network_in_channels") == 1  # the crop's region channel reaches no network
    cache = tmp_path / "cache"
    _planned(large, cache)
    with _plan_log() as lines:
        _planned(large, cache, previous_stage=stage1, stage_input="channels")
    assert not any("from the cached plan" in line for line in lines)
    cached = [json.loads(path.read_text()) for path in cache.glob("*.json")]
    assert sorted(str(plan["identity"]["user"].get("previous_stage")) for plan in cached) == sorted([stage1, "None"])
