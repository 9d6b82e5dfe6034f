"""Run folders that cannot be confused or hijacked: the lock of a running training, a restart refused unless it
continues the stored run, and checkpoints read as tensors and plain values (a planted payload never runs).

The learning curves of a resumed and an extended run against an uninterrupted one are in test_bundle_unet3d.py."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from custom_components import data, runlock
from custom_components.run_bundle import resume_problem
from custom_components.run_files import CheckpointError, read_checkpoint
from tests.conftest import REPO, SMALL_3D, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"
RUNLOCK = REPO / "custom_components" / "runlock.py"
# another process holding a run folder's lock: runlock.py alone (no torch import), until its stdin closes
HOLDER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("runlock", {str(RUNLOCK)!r})
runlock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runlock)
runlock.lock_run_folder(sys.argv[1])
import os, time
ready, started = os.pipe()
child = os.fork()  # a data-loading worker, forked after the lock: it must not keep the lock after its parent
if child == 0:
    os.write(started, b"1")  # running its own code: the fork hooks (which close the lock) have run
    time.sleep(60)
    os._exit(0)
os.read(ready, 1)
print("locked", child, flush=True)
sys.stdin.read()
"""


def _hold(folder: Path) -> subprocess.Popen:
    """A process holding ``folder``'s lock, with a forked child (``.child``: its PID)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    word, child = holder.stdout.readline().split()
    assert word == "locked"
    holder.child = int(child)
    return holder


def _kill(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait()
    with contextlib.suppress(ProcessLookupError):
        os.kill(holder.child, signal.SIGKILL)


def test_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = _hold(folder)
    with pytest.raises(runlock.RunLockError, match=rf"in use by process {holder.pid} \(.+, since .+\): wait for it"):
        runlock.RunLock(folder).acquire()
    holder.kill()  # a killed run: the operating system releases its lock, nothing stale is left
    holder.wait()
    os.kill(holder.child, 0)  # even while the child it forked lives on
    lock = runlock.RunLock(folder).acquire()
    _kill(holder)
    assert json.loads((folder / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert runlock.lock_run_folder(folder, enabled=False) is None  # ranks other than 0 of a distributed run


def test_second_training_on_a_folder_in_use_stops_at_once(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = _hold(out)  # a training running in this folder
    try:
        started = time.monotonic()
        result = run_bundle(TRAIN_3D, {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out}, check=False)
        seconds = time.monotonic() - started
    finally:
        _kill(holder)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{out} is in use by process {holder.pid}" in result.stderr
    assert "wait for it or pass another --output_dir" in result.stderr
    assert [path.name for path in out.iterdir()] == [runlock.LOCK_FILE], "it wrote into the folder in use"
    assert seconds < 60, seconds  # before any case was read or cached


def _parser(run: Path, **overrides: object) -> ConfigParser:
    """The 3D bundle's train config as the command line `--key value` pairs of the run's own start build it."""
    parser = ConfigParser()
    parser.read_config(str(REPO / TRAIN_3D))
    values = {key: yaml.safe_load(value) for key, value in SMALL_3D.items()}
    parser.update({**values, "max_epochs": 2, "val_interval": 1, **overrides})
    parser["output_dir"] = str(run)
    parser["bundle_root"] = str(REPO / "bundles" / "unet3d")
    return parser


def _problem(run: Path, dataset: Path, extend: bool = False, **overrides: object) -> str | None:
    """Why a start with run3d's values and ``overrides`` may not resume ``run`` (a copy of ``run3d``)."""
    parser = _parser(run, dataset_dir=str(dataset), **overrides)
    return resume_problem(run, REPO / "bundles" / "unet3d", extend_training=extend, parser=parser)


def test_resume_is_faithful_or_refused(
    run3d: Path, dataset3d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Path(shutil.copytree(run3d, tmp_path / "run"))
    assert _problem(run, dataset3d) is None  # the stored values: resumed
    assert (
        _problem(run, dataset3d, progress_bar=True, cache_rate=0.5) is None
    )  # how a session shows and holds data only
    fresh = tmp_path / "new"
    (fresh / "configs").mkdir(parents=True)
    shutil.copy(run / "configs/train.yaml", fresh / "configs/train.yaml")
    assert (
        _problem(fresh, dataset3d, learning_rate=0.01) is None
    )  # no checkpoint: nothing to resume, a new run in the folder

    # a literal key that differs is refused before the dataset is even opened
    def opened(*_args: object) -> None:
        raise AssertionError("the dataset was read")

    with monkeypatch.context() as patch:
        patch.setattr(data, "read_description", opened)
        problem = _problem(run, dataset3d, learning_rate=0.01, norm="batch")
    assert "learning_rate: 0.003 -> 0.01" in problem and "norm: instance -> batch" in problem
    assert "Start a new output_dir, or resume with the stored values" in problem

    # extension: max_epochs may grow, with extend_training only, and nothing else may change with it
    assert "max_epochs: 2 -> 6" in _problem(run, dataset3d, max_epochs=6)
    assert _problem(run, dataset3d, extend=True, max_epochs=6) is None
    assert "learning_rate: 0.003 -> 0.01" in _problem(run, dataset3d, extend=True, max_epochs=6, learning_rate=0.01)
    assert "lets max_epochs grow only" in _problem(run, dataset3d, extend=True, max_epochs=1)

    # a key the bundle gained after the run was stored counts as its default, which the run trained with
    stored = (run / "configs/train.yaml").read_text()
    (run / "configs/train.yaml").write_text(stored.replace("\niterations_per_epoch: null", "\n"))
    assert _problem(run, dataset3d) is None
    assert "iterations_per_epoch: null -> 4" in _problem(run, dataset3d, iterations_per_epoch=4)
    # also when the bundle computes that default (an aug_ key from the `augmentation` preset)
    (run / "configs/train.yaml").write_text(stored.replace("\naug_blur_prob: 0.0", "\n"))
    assert _problem(run, dataset3d) is None
    assert "aug_blur_prob: (not set) -> 0.5" in _problem(run, dataset3d, aug_blur_prob=0.5)

    # what training derives from dataset.json is compared once resolved (still before any case is read)
    (run / "configs/train.yaml").write_text(stored.replace("\nnum_classes: 3", "\nnum_classes: 4"))
    assert "num_classes: 4 -> 3" in _problem(run, dataset3d)

    # a checkpoint without the settings it trained with is not resumed blindly
    (run / "configs/train.yaml").unlink()
    assert "configs/train.yaml, the settings it trained with, is missing" in _problem(run, dataset3d)


class Payload:
    """What a planted checkpoint could hold: unpickling it runs a command (here: create a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


UNSAFE_ADVICE = "`weights_only` set to `False`"  # PyTorch's advice on a refused pickle: it would run the payload
ORIGIN = "weights and checkpoints come from a training run (its models/model.pt and models/checkpoint_last.pt)"


def refusal(path: Path, holds: str = "it calls posix.system") -> str:
    """The start of the message for a planted file: what it is not, that it may execute code, where files come from."""
    return (
        f"{path} is not a weights or checkpoint file of tensors and plain values ({holds}): it may execute code, so "
        f"it was not loaded; {ORIGIN}: "
    )


def test_checkpoints_are_read_as_tensors_and_plain_values(run3d: Path, tmp_path: Path) -> None:
    state = read_checkpoint(run3d / "models/checkpoint_last.pt")  # what a run writes loads with weights_only
    assert set(state) == {"network", "optimizer", "lr_scheduler", "report", "time_budget", "early_stop", "engine"}
    marker = tmp_path / "executed"
    planted = tmp_path / "planted.pt"
    torch.save({"engine": Payload(marker)}, planted)
    torch.load(planted, weights_only=False)  # the payload is live: loading it the old way runs it
    assert marker.exists()
    marker.unlink()
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(Payload(marker)))  # the pre-zip format too
    expected = {planted: refusal(planted), legacy: refusal(legacy, "it holds pickled objects that are not tensors")}
    for path, start in expected.items():
        with pytest.raises(CheckpointError) as refused:
            read_checkpoint(path)
        message = str(refused.value)
        assert message == start + "delete it or start a new output_dir", message
        assert UNSAFE_ADVICE not in message and "Re-running" not in message
        assert refused.value.__cause__ is None and refused.value.__context__ is None  # no PyTorch text behind it
    assert not marker.exists()


def test_planted_checkpoint_is_refused_not_executed(run3d: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(run3d, tmp_path / "run"))  # a shared or downloaded run folder
    marker = tmp_path / "executed"
    checkpoint = run / "models/checkpoint_last.pt"
    torch.save({"engine": Payload(marker)}, checkpoint)
    result = run_bundle(run / "configs/train.yaml", {}, check=False)  # resumed from its own config
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert not marker.exists(), "the planted checkpoint was executed"
    assert refusal(checkpoint) + "delete it or start a new output_dir" in result.stderr
    assert UNSAFE_ADVICE not in result.stderr


def test_planted_model_is_refused_not_executed_by_inference_and_evaluation(
    run3d: Path, dataset3d: Path, tmp_path: Path
) -> None:
    """models/model.pt, which a run folder's inference.yaml and evaluate.yaml load (handlers.ModelLoader), is read
    as tensors only: a planted one stops the run, named, before any case is read, and its payload never runs."""
    run = Path(shutil.copytree(run3d, tmp_path / "run"))
    marker = tmp_path / "executed"
    model = run / "models/model.pt"
    torch.save({"model.0.conv.weight": Payload(marker)}, model)
    inputs = tmp_path / "scans"
    inputs.mkdir()
    shutil.copy(dataset3d / "imagesTr" / "case_001.nii.gz", inputs)
    runs = {
        "inference": ("inference.yaml", {"input_dir": inputs, "output_dir": tmp_path / "predictions"}),
        "evaluating": ("evaluate.yaml", {"output_dir": tmp_path / "evaluation"}),
    }
    for run_id, (config, overrides) in runs.items():
        result = run_bundle(run / "configs" / config, overrides, run_id=run_id, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (run_id, result.stderr[-3000:])
        assert not marker.exists(), f"{run_id} executed the planted model.pt"
        assert refusal(model) + "use a models/model.pt that a training run wrote" in result.stderr, run_id
        assert UNSAFE_ADVICE not in result.stderr
        assert not list(overrides["output_dir"].rglob("*_seg.nii.gz")), f"{run_id} went on to the cases"
