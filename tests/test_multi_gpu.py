"""Distributed data parallel training through torchrun (gloo on CPU here, NCCL on GPUs), and gradient accumulation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from tests.conftest import REPO, SMALL_3D, USER_CWD, bundle_args, read_metrics

TRAIN_3D = REPO / "bundles/unet3d/configs/train.yaml"


def test_two_processes_train_one_model(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    configs = ["bundles/unet3d/configs/train.yaml", "bundles/unet3d/configs/multi_gpu_train.yaml"]
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "max_epochs": 2, "val_interval": 1}
    bundle = bundle_args(configs, overrides)  # python -m monai.bundle run training ...
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *bundle[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(args, cwd=USER_CWD.name, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_metrics(out)["epochs"] == 2
    # the best weights are saved without the DDP wrapper: they load into the plain network
    parser = ConfigParser()
    parser.read_config(str(TRAIN_3D))
    parser.update({"dataset_dir": str(dataset3d), "channels": [16, 32, 64], "strides": [2, 2]})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(out / "models/model.pt"))
    # the run folder is a bundle: its training configs point at the run itself, so it resumes in place
    assert ConfigParser.load_config_file(out / "configs/multi_gpu_train.yaml")["output_dir"] == "$@bundle_root"
    # both processes validated their share and logged the same all-reduced Dice
    dice_lines = [
        line for line in result.stderr.splitlines() + result.stdout.splitlines() if "Epoch[2] Metrics" in line
    ]
    assert len(dice_lines) == 2 and dice_lines[0].split("--")[1] == dice_lines[1].split("--")[1]


def test_every_process_trains_iterations_per_epoch_batches(dataset3d: Path, tmp_path: Path) -> None:
    # each process draws its own share of every epoch (custom_components.sampling.EpochSeededSampler with its rank): as
    # many batches in each, or the gradients' all-reduce would wait for the process that stopped early
    out = tmp_path / "run"
    configs = ["bundles/unet3d/configs/train.yaml", "bundles/unet3d/configs/multi_gpu_train.yaml"]
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "max_epochs": 2, "val_interval": 2}
    bundle = bundle_args(configs, {**overrides, "iterations_per_epoch": 2})
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *bundle[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(args, cwd=USER_CWD.name, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = read_metrics(out)
    assert (metrics["epochs"], metrics["iterations"]) == (2, 4)  # rank 0's: 2 epochs of 2 batches


def test_gradient_accumulation_reaches_the_trainer(dataset3d: Path, tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(TRAIN_3D))
    parser.update({"dataset_dir": str(dataset3d), "gradient_accumulation_steps": 4, "cache_rate": 0.0})
    parser["output_dir"] = str(tmp_path / "run")
    parser["bundle_root"] = str(TRAIN_3D.parents[1])  # a parser built by hand names its bundle
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.accumulation_steps == 4
