"""Shared fixtures: small synthetic datasets, a trained run folder, and the user's bundle command run in a
subprocess from a working directory outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from custom_components.paths import REPO_ROOT
from custom_components.synthetic import write_dataset

REPO = REPO_ROOT
# N xdist workers share the cores: each test process, and every command it starts, gets cores / N threads, so that
# the workers do not oversubscribe them (OpenMP threads spinning on busy cores made two K-fold selections running
# side by side 3x slower than one alone)
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, _threads)
# Where the user's commands run: a folder outside the repository, so that nothing relies on the working directory
USER_CWD = tempfile.TemporaryDirectory(prefix="user-cwd-")

# Small but real: a few CT-like volumes, a 3-level U-Net and 32x32x16 patches train in seconds on two cores.
SMALL_3D = {
    "spacing": "[0.8,0.8,2.5]",
    "patch_size": "[32,32,16]",
    "channels": "[16,32,64]",
    "strides": "[2,2]",
    "num_workers": "0",
    "num_folds": "4",
    "warmup_epochs": "2",
    "learning_rate": "0.003",
    "progress_bar": "False",
    "log_every_iteration": "False",
    "report": "False",  # the end-of-training evaluation and report.html: on in the shared `run3d` only
    "plan": "off",  # the bundle's fixed defaults and the keys above: tests/test_auto_plan.py tests `plan: auto`
}
# The 2D bundle on the same volumes: 32x32 slices, in-plane spacing as the data, the slice spacing kept.
SMALL_2D = {**SMALL_3D, "patch_size": "[32,32]", "spacing": "[0.8,0.8,-1]"}


# The slowest files first: `make test` runs them with `--dist loadfile --no-loadscope-reorder`, each worker taking the
# next file in this order when it is free, so the long ones start at once instead of running alone at the end.
SLOW_FILES = (
    "test_select.py",
    "test_select_slabs.py",
    "test_kfold.py",
    "test_sweep.py",
    "test_time_budget.py",
    "test_cascade.py",
    "test_auto_plan.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the tests: the files of ``SLOW_FILES`` first, in that order, the rest as collected."""
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def dataset3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small synthetic CT volumes (48x48x20 voxels of 0.8x0.8x2.5 mm, sizes vary per case)."""
    return write_dataset(tmp_path_factory.mktemp("data") / "synthetic3d", cases=8, seed=1, shape=(48, 48, 20))


@pytest.fixture
def copy_dataset(tmp_path: Path) -> Callable[[Path], Path]:
    """A private copy of a dataset folder, for tests that break it on purpose."""

    def _copy(source: Path) -> Path:
        import shutil

        return Path(shutil.copytree(source, tmp_path / source.name))

    return _copy


def bundle_args(
    config_file: str | Path | list[str | Path], overrides: dict[str, object], run_id: str = "training"
) -> list[str]:
    """``python -m monai.bundle run <run_id> --config_file ...`` with ``--key value`` overrides; configs of the
    repository (``bundles/...``) are named by absolute path, as a user names a bundle from elsewhere."""
    configs = [config_file] if isinstance(config_file, str | Path) else config_file
    absolute = [str(REPO / path if (REPO / path).is_file() else path) for path in configs]
    config = absolute[0] if len(absolute) == 1 else json.dumps(absolute).replace('"', "'")
    args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def run_bundle(
    config_file: str | Path | list[str | Path],
    overrides: dict[str, object],
    run_id: str = "training",
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run the user's bundle command from a working directory outside the repository (``cwd`` or ``USER_CWD``)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = bundle_args(config_file, overrides, run_id)
    result = subprocess.run(args, cwd=cwd or USER_CWD.name, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(
            f"bundle run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def run3d(dataset3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of the 3D bundle trained for 2 epochs on ``dataset3d``: a bundle of its own, with its
    end-of-training evaluation (evaluation/) and report.html (do not modify)."""
    out = tmp_path_factory.mktemp("runs") / "run3d"
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "max_epochs": 2, "val_interval": 1}
    run_bundle("bundles/unet3d/configs/train.yaml", {**overrides, "report": True})
    return out
