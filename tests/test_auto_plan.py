"""``plan: auto``: the one training command fits the planned keys to the data and the device, caches the plan outside
the dataset, keeps every key the user set, never plans a resumed run again, and stops with the key to set when no
step fits."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from custom_components import auto_plan, prepare
from tests.conftest import REPO, SMALL_3D, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"
# SMALL_3D without the keys the plan decides, and with the plan on (the bundle's default); the tiny volumes fit
# whole in a step under the GFLOP budget
AUTO_3D = {
    **{k: v for k, v in SMALL_3D.items() if k not in ("plan", "spacing", "patch_size", "channels", "strides")},
}
# on CPU the plan decides the network too
PLANNED = (
    "spacing", "intensity", "class_weights", "patch_size", "batch_size", "iterations_per_epoch", "channels", "strides",
)  # fmt: skip


def _read_only(folder: Path) -> None:
    """Take write permission away from ``folder`` and everything in it."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def planned_run(dataset3d: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One training with the plan on, on a read-only copy of the dataset, its plan cached in a fresh folder."""
    root = tmp_path_factory.mktemp("auto_plan")
    dataset = Path(shutil.copytree(dataset3d, root / "readonly"))
    _read_only(dataset)
    out, cache = root / "run", root / "cache"
    overrides = {**AUTO_3D, "dataset_dir": dataset, "output_dir": out, "max_epochs": 1, "plan_cache_dir": cache}
    result = run_bundle(TRAIN_3D, overrides)
    yield {"dataset": dataset, "out": out, "cache": cache, "log": result.stdout + result.stderr, "root": root}
    dataset.chmod(0o755)


def test_the_plan_is_made_for_a_read_only_dataset_and_recorded_in_the_run(planned_run: dict) -> None:
    # (root writes into a read-only folder too: its listing shows that nothing was written)
    dataset, out, log = planned_run["dataset"], planned_run["out"], planned_run["log"]
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert "plan auto: spacing" in log and "from a plan made in" in log
    cached = list(planned_run["cache"].glob("*.json"))
    assert len(cached) == 1
    content = json.loads(cached[0].read_text())
    assert set(content["values"]) == set(PLANNED) and content["steps"]
    stored = yaml.safe_load((out / "configs" / "train.yaml").read_text())
    for key in PLANNED:
        assert stored[key] == content["values"][key], key
    assert stored["plan"] == "off"  # a run folder's keys are all decided: training from it plans nothing
    assert stored["spacing"] == [0.8, 0.8, 2.5]  # the data's median spacing
    assert stored["intensity"]["scheme"] == "ct_zscore" and stored["class_weights"][2] > stored["class_weights"][0]
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["planned_settings"] == {key: content["values"][key] for key in PLANNED}
    assert "`plan: auto` chose" in (out / "docs" / "README.md").read_text()


def test_the_one_command_trains_the_plan_prepare_plan_writes(planned_run: dict, dataset3d: Path, copy_dataset) -> None:
    """On CPU a plan rests on counted FLOPs, never on timings: `prepare plan` on the same data (another planning, on
    a machine as busy as it is now) writes the values the one command trained with."""
    dataset = copy_dataset(dataset3d)
    assert prepare.main(["plan", str(dataset), "--device", "cpu", "--set", f"num_folds={AUTO_3D['num_folds']}"]) == 0
    written = yaml.safe_load((dataset / "plan_3d.yaml").read_text())
    plans = [json.loads(path.read_text()) for path in planned_run["cache"].glob("*.json")]
    (trained,) = [plan["values"] for plan in plans if not plan["identity"]["fixed"]]
    assert {key: written[key] for key in PLANNED} == {key: trained[key] for key in PLANNED}


def test_keys_set_by_the_user_win_and_the_plan_is_cached(planned_run: dict, tmp_path: Path) -> None:
    """A command-line key and a later config file's key are kept, the plan fits the rest around them; the same
    start again reads the cached plan."""
    later = tmp_path / "later.yaml"
    later.write_text("spacing: [1.0, 1.0, 2.5]\n")
    configs = [str(REPO / TRAIN_3D), str(later)]
    keys = {**AUTO_3D, "dataset_dir": planned_run["dataset"], "max_epochs": 1, "plan_cache_dir": planned_run["cache"]}
    first = run_bundle(configs, {**keys, "output_dir": tmp_path / "a", "patch_size": "[32,32,16]"})
    log = first.stdout + first.stderr
    assert "from a plan made in" in log and "spacing, patch_size set otherwise (kept)" in log
    stored = yaml.safe_load((tmp_path / "a" / "configs" / "train.yaml").read_text())
    assert stored["spacing"] == [1.0, 1.0, 2.5] and stored["patch_size"] == [32, 32, 16]
    assert stored["batch_size"] >= 2
    again = run_bundle(configs, {**keys, "output_dir": tmp_path / "b", "patch_size": "[32,32,16]"})
    assert "from the cached plan" in again.stdout + again.stderr
    second = yaml.safe_load((tmp_path / "b" / "configs" / "train.yaml").read_text())
    assert {key: second[key] for key in PLANNED} == {key: stored[key] for key in PLANNED}


def test_a_resumed_run_is_not_planned_again(planned_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(planned_run["out"], out)
    before = yaml.safe_load((out / "configs" / "train.yaml").read_text())
    empty_cache = tmp_path / "no_plans_here"
    keys = {**AUTO_3D, "dataset_dir": planned_run["dataset"], "output_dir": out, "plan_cache_dir": empty_cache}
    result = run_bundle(TRAIN_3D, {**keys, "max_epochs": 2, "extend_training": True})
    assert "(resumed: not planned again)" in result.stdout + result.stderr
    assert not empty_cache.exists()
    after = yaml.safe_load((out / "configs" / "train.yaml").read_text())
    assert {key: after[key] for key in PLANNED} == {key: before[key] for key in PLANNED}
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_a_dataset_no_step_fits_stops_with_the_keys_to_set(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    keys = {**AUTO_3D, "dataset_dir": dataset3d, "output_dir": out, "plan_cache_dir": tmp_path / "cache"}
    result = run_bundle(TRAIN_3D, {**keys, "plan_cpu_step_gflop": 0.0001}, check=False)
    assert result.returncode != 0
    assert "plan auto cannot plan" in result.stderr and "plan_cpu_step_gflop" in result.stderr
    assert "patch_size and batch_size" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_an_unwritable_cache_folder_is_named_with_the_fix(dataset3d: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    keys = {**AUTO_3D, "dataset_dir": dataset3d, "output_dir": tmp_path / "run", "plan_cache_dir": blocked / "plans"}
    result = run_bundle(TRAIN_3D, keys, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"plan_cache_dir {blocked / 'plans'} cannot hold the plan" in result.stderr


def test_the_cache_name_follows_the_dataset_files(dataset3d: Path, copy_dataset) -> None:
    dataset = copy_dataset(dataset3d)
    before = auto_plan.cache_name({"dataset": auto_plan.dataset_identity(dataset)})
    assert before == auto_plan.cache_name({"dataset": auto_plan.dataset_identity(dataset)})
    label = next((dataset / "labelsTr").iterdir())
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    assert auto_plan.cache_name({"dataset": auto_plan.dataset_identity(dataset)}) != before


def test_plan_off_trains_the_bundles_defaults(run3d: Path) -> None:
    stored = yaml.safe_load((run3d / "configs" / "train.yaml").read_text())
    defaults = yaml.safe_load((REPO / TRAIN_3D).read_text())
    for key in ("batch_size", "class_weights", "intensity"):
        assert stored[key] == defaults[key], key
