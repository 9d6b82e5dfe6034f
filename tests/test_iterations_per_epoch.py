"""`iterations_per_epoch`: epochs of a fixed number of batches (nnU-Net's 250) instead of one pass over the training
volumes, drawn from each epoch's seed alone, shared out between the processes of a distributed run, and resumed
exactly."""

from __future__ import annotations

import collections
import csv
import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.data import Dataset
from monai.transforms import Compose, Randomizable

from custom_components import settings
from custom_components.run_bundle import resume_problem
from custom_components.run_files import read_checkpoint
from custom_components.sampling import EpochSeededDataset, EpochSeededSampler
from tests.conftest import REPO, SMALL_3D, USER_CWD, bundle_args, read_metrics, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"


class _Draw(Randomizable):
    """A random transform whose output is its draw: what a patch position or an augmentation would be."""

    def __call__(self, _item: int) -> float:
        return float(self.R.random())


def _cases(count: int) -> EpochSeededDataset:
    return EpochSeededDataset(Dataset(list(range(count)), transform=Compose([_Draw()])))


def _drawn(sampler: EpochSeededSampler, epoch: int) -> list[int]:
    """The cases ``sampler`` trains on in ``epoch``, in order."""
    return [draw % len(sampler.dataset) for _, draw in sampler.epoch_draws(epoch)]


def test_an_epoch_is_n_batches_with_every_case_drawn_as_often() -> None:
    sampler = EpochSeededSampler(_cases(5), seed=0, iterations_per_epoch=4, batch_size=3)
    assert len(sampler) == 12  # 4 batches of 3 volumes, from 5 cases
    for epoch in (1, 2, 7):
        counts = collections.Counter(_drawn(sampler, epoch))
        assert sorted(counts) == list(range(5)) and max(counts.values()) - min(counts.values()) <= 1, counts
    # each epoch its own order, a function of (seed, epoch) alone: the same in another sampler, and the same
    # whether the sampler started at the first epoch or at this one (a resumed run)
    assert _drawn(sampler, 1) != _drawn(sampler, 2)
    again = EpochSeededSampler(_cases(5), seed=0, iterations_per_epoch=4, batch_size=3)
    assert [sampler.epoch_draws(k) for k in (1, 2, 3)] == [again.epoch_draws(k) for k in (1, 2, 3)]
    assert _drawn(EpochSeededSampler(_cases(5), seed=1, iterations_per_epoch=4, batch_size=3), 1) != _drawn(sampler, 1)
    from_start = list(itertools.islice(sampler, 3 * 12))
    resumed = _cases(5)
    resumed.set_epoch(3)  # what ResumableCheckpoint does at every epoch start
    assert list(itertools.islice(EpochSeededSampler(resumed, 0, 4, 3), 12)) == from_start[24:]


def test_a_case_drawn_twice_in_an_epoch_gets_other_patches() -> None:
    dataset = _cases(2)
    draws = EpochSeededSampler(dataset, seed=0, iterations_per_epoch=3, batch_size=2).epoch_draws(1)
    values = [dataset[pair] for pair in draws]
    assert sorted(_drawn(EpochSeededSampler(dataset, 0, 3, 2), 1)) == [0, 0, 0, 1, 1, 1]
    assert len(set(values)) == 6  # every draw its own patch and augmentation
    assert values == [_cases(2)[pair] for pair in draws]  # and the same in any process that loads it


def test_without_it_an_epoch_is_one_pass_in_whole_batches() -> None:
    one_pass = EpochSeededSampler(_cases(6), seed=0, batch_size=2)
    assert len(one_pass) == 6 and sorted(_drawn(one_pass, 1)) == list(range(6))
    # 5 cases in batches of 2: the last batch is completed from a second pass of the same epoch, so an epoch never
    # takes the next one's draws
    odd = EpochSeededSampler(_cases(5), seed=0, batch_size=2)
    assert len(odd) == 6 and sorted(_drawn(odd, 1)[:5]) == list(range(5))


@pytest.mark.parametrize(("iterations", "length"), [(3, 6), (None, 4)])
def test_processes_share_out_every_epochs_draws(iterations: int | None, length: int) -> None:
    # 2 processes, batches of 2 volumes from 7 cases: 3 batches each, or one pass shared out (4 volumes each)
    ranks = [EpochSeededSampler(_cases(7), 0, iterations, batch_size=2, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(sampler) for sampler in ranks] == [length, length]
    first, second = (sampler.epoch_draws(1) for sampler in ranks)
    assert set(first).isdisjoint(second)  # no draw trained twice; a case twice only from another pass
    # together, the draws one process would take in an epoch twice as long, dealt out in turn
    alone = EpochSeededSampler(_cases(7), 0, 2 * length, batch_size=1).epoch_draws(1)
    assert [draw for pair in zip(first, second, strict=True) for draw in pair] == alone


@pytest.mark.parametrize("value", [0, -3, "abc", 2.5, True])
def test_a_bad_value_is_refused_naming_the_key(value: object) -> None:
    problems = settings.check({"iterations_per_epoch": value}, REPO / "bundles/unet3d")
    assert [str(problem).split(" = ")[0] for problem in problems] == ["iterations_per_epoch"]
    assert "give an integer >= 1, or null" in str(problems[0])
    assert settings.check({"iterations_per_epoch": None}, REPO / "bundles/unet2d") == []


# 3 epochs of 2 batches of 2 volumes (one pass over the fold's 6 training cases would be 3 batches), with workers
# that live across epochs and a checkpoint every epoch, so that a copy of the run folder taken during the run resumes
FIXED = {
    "iterations_per_epoch": 2,
    "num_workers": 2,
    "checkpoint_interval_min": 0,
    "max_epochs": 3,
    "val_interval": 2,
}


def _curve(output_dir: Path) -> list[tuple[float, float, float]]:
    with open(output_dir / "learning_curve.csv") as handle:
        rows = csv.DictReader(handle)
        return [(float(row["epoch"]), float(row["train_loss"]), float(row["learning_rate"])) for row in rows]


def test_training_runs_epochs_of_n_iterations_and_resumes_exactly(dataset3d: Path, tmp_path: Path) -> None:
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    overrides = {**SMALL_3D, **FIXED, "dataset_dir": dataset3d}
    process = subprocess.Popen(
        bundle_args(TRAIN_3D, {**overrides, "output_dir": reference}),
        cwd=USER_CWD.name,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # the run folder as a run killed after an epoch leaves it: its settings and its last checkpoint, copied while
    # the run goes on (each file is replaced whole, never written in place)
    checkpoint = reference / "models/checkpoint_last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if checkpoint.exists():
        shutil.copytree(reference / "configs", out / "configs")
        (out / "models").mkdir()
        shutil.copy(checkpoint, out / "models")
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors[-3000:]
    metrics = read_metrics(reference)
    assert (metrics["epochs"], metrics["iterations"]) == (3, 6)  # epochs of 2 iterations, not 3
    stored = yaml.safe_load((reference / "configs/train.yaml").read_text())
    assert stored["iterations_per_epoch"] == 2  # the run folder records it, and resumes with it
    copied = out / "models/checkpoint_last.pt"
    assert copied.is_file() and read_checkpoint(copied)["engine"]["iteration"] < 6, "not copied before the last epoch"

    # another epoch length would train another run: refused before any data is read
    parser = ConfigParser()
    parser.read_config(str(REPO / TRAIN_3D))
    parser.update({key: yaml.safe_load(str(value)) for key, value in overrides.items()})
    parser.update({"iterations_per_epoch": 5, "dataset_dir": str(dataset3d), "output_dir": str(out)})
    parser["bundle_root"] = str(REPO / "bundles/unet3d")
    assert "iterations_per_epoch: 2 -> 5" in resume_problem(out, REPO / "bundles/unet3d", parser=parser)

    result = run_bundle(TRAIN_3D, {**overrides, "output_dir": out})
    assert "resumed from" in result.stdout + result.stderr
    assert (read_metrics(out)["epochs"], read_metrics(out)["iterations"]) == (3, 6)
    # every epoch drew the uninterrupted run's batches: the same losses, rates and final weights
    for row, want in zip(_curve(out), _curve(reference), strict=True):
        assert row == pytest.approx(want, abs=1e-6), (row, want)
    weights, expected = (read_checkpoint(run / "models/checkpoint_last.pt")["network"] for run in (out, reference))
    assert all(torch.allclose(weights[key], expected[key], atol=1e-6) for key in expected)
