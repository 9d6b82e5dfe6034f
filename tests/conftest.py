"""Shared fixtures: small synthetic datasets and the user's bundle command run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from custom_components.paths import REPO_ROOT
from custom_components.synthetic import write_dataset

REPO = REPO_ROOT

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
}
# The 2D bundle on the same volumes: 32x32 slices, in-plane spacing as the data, the slice spacing kept.
SMALL_2D = {**SMALL_3D, "patch_size": "[32,32]", "spacing": "[0.8,0.8,-1]"}


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


def run_bundle(
    config_file: str | list[str], overrides: dict[str, str], run_id: str = "training", check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <run_id> --config_file ...`` from the repository root, as a user does."""
    config = config_file if isinstance(config_file, str) else json.dumps(config_file).replace('"', "'")
    args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(
            f"bundle run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())
