"""What a run writes into its folder: files that follow the umask, writes that fail without harm, a folder checked
before the dataset cache is filled, and `num_folds: 1` (every case trained, no validation, the last weights kept)."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from custom_components import run_files, runlock, training_report
from custom_components.data import DatasetError, load_dataset_json, split_datalist
from custom_components.evaluation import evaluation_cases
from custom_components.output_dir import OutputDirError, check_output_dir, checkpoint_space
from custom_components.run_files import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temporaries,
)
from custom_components.synthetic import write_dataset
from custom_components.training_report import TrainingReport
from tests.conftest import SMALL_3D, read_metrics, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if run_files.TEMPORARY_NAME.match(p.name))


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=oct)
def test_written_files_follow_the_umask(tmp_path: Path, mask: int, expected: int) -> None:
    with umask(mask):
        atomic_write_json({"a": 1}, tmp_path / "metrics.json")
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "models" / "model.pt")
        atomic_write_bytes(tmp_path / "metrics.json", b"{}\n")  # a replaced file too
    assert mode(tmp_path / "metrics.json") == expected
    assert mode(tmp_path / "models" / "model.pt") == expected


def test_a_failed_write_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up halfway through a checkpoint: the previous one stays byte for byte, no temporary is left."""
    path = tmp_path / "models" / "checkpoint_last.pt"
    atomic_torch_save({"network": {"w": torch.arange(1000.0)}, "epoch": 3}, path)
    good = path.read_bytes()
    real_fdopen = os.fdopen
    seen = {}

    class FullDisk:  # the file object atomic_write_bytes writes through: half the bytes land, then ENOSPC
        def __init__(self, fd: int, *args, **kwargs) -> None:
            self.handle = real_fdopen(fd, *args, **kwargs)
            seen["temporary"] = Path(os.readlink(f"/proc/self/fd/{fd}"))

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def fileno(self) -> int:
            return self.handle.fileno()

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            seen["partial"] = seen["temporary"].stat().st_size
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_files.os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left on device .*previous content is kept") as raised:
        atomic_torch_save({"network": {"w": torch.arange(2000.0)}, "epoch": 4}, path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert seen["partial"] > 0 and seen["temporary"].parent == path.parent  # it did fail midway, next to the file
    assert path.read_bytes() == good
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert leftovers(path.parent) == []


def test_a_write_the_kernel_refuses_keeps_the_last_file(tmp_path: Path) -> None:
    """The same without a patch: the kernel stops the write at a file size limit (RLIMIT_FSIZE), as on a full disk.
    In a forked child, so that the limit binds nothing else."""
    path = tmp_path / "metrics.json"
    path.write_bytes(b"good\n")
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the write failed as it should
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            atomic_write_bytes(path, b"x" * 100_000)
        except OSError as err:
            code = 0 if err.errno == errno.EFBIG and err.filename == str(path) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_bytes() == b"good\n" and leftovers(tmp_path) == []


def test_stale_temporaries_are_recognised(tmp_path: Path) -> None:
    stale = [tmp_path / ".metrics.json.a1b2c3d4", tmp_path / "models" / ".checkpoint_last.pt.k_9zz0q1"]
    kept = [tmp_path / ".gitignore", tmp_path / ".bash_history.a1b2c3d4", tmp_path / "models" / "model.pt"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(path.is_file() for path in kept) and not any(path.exists() for path in stale)


DiskUsage = namedtuple("DiskUsage", "total used free")  # what shutil.disk_usage returns


def _usage(free: int) -> DiskUsage:
    return DiskUsage(2**40, 2**40 - free, free)


def test_room_for_the_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network = torch.nn.Linear(1000, 1000)  # 4 MB of weights: a 12 MB checkpoint with two Adam moments
    weights = 4 * (1000 * 1000 + 1000)
    assert checkpoint_space(network) >= weights + 2 * 3 * weights  # model.pt, the checkpoint and its replacement
    run = tmp_path / "run"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(2**20))
    with pytest.raises(OutputDirError, match=f"output_dir {run} has 1 MiB free but the checkpoints need about 97 MiB"):
        check_output_dir(run, network)
    assert run.is_dir() and leftovers(run) == []  # created and tried, nothing left behind
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(2**30))
    check_output_dir(run, network)
    blocked = tmp_path / "a_file"  # a folder below a file cannot be made, even by root
    blocked.write_text("not a folder")
    with pytest.raises(OutputDirError, match=f"output_dir {blocked / 'run'} cannot be written .*: pass --output_dir"):
        check_output_dir(blocked / "run", network)


def test_without_validation_model_pt_is_the_last_epoch(tmp_path: Path) -> None:
    network = torch.nn.Linear(2, 2)

    def step(engine: Engine, batch: int) -> dict[str, float]:
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(1.0)
        return {"loss": 0.5}

    trainer, evaluator = Engine(step), Engine(lambda engine, batch: None)
    TrainingReport(tmp_path, evaluator, network, ["organ"], validate=False).attach(trainer)
    saved = []

    def compare(engine: Engine) -> None:  # after the report's epoch end: model.pt holds this epoch's weights
        state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
        saved.append(all(torch.equal(state[key], value) for key, value in network.state_dict().items()))

    trainer.add_event_handler(Events.STARTED, lambda engine: engine.add_event_handler(Events.EPOCH_COMPLETED, compare))
    trainer.run([0, 1], max_epochs=3)
    assert saved == [True, True, True]
    metrics = read_metrics(tmp_path)
    assert metrics["epochs"] == 3 and metrics["best_mean_dice"] is None and metrics["best_epoch"] is None
    assert metrics["validation"] == training_report.NO_VALIDATION and metrics["model_weights"] == "last epoch"
    assert (tmp_path / "learning_curve.png").is_file()


def test_learning_curve_png_drawn_at_most_every_plot_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validated every epoch, a fast run draws its PNG after the first epoch, once the interval has passed, and at
    the end; the CSV and metrics.json still follow every epoch."""
    network = torch.nn.Linear(2, 2)
    now = [0.0]
    monkeypatch.setattr(training_report.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(training_report, "PLOT_INTERVAL_S", 12.0)
    trainer = Engine(lambda engine, batch: {"loss": 0.5})
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: now.__setitem__(0, now[0] + 5.0))  # 5 s epochs
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: engine.state.metrics.update(val_mean_dice=0.5))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run([0], max_epochs=engine.state.epoch))
    report = TrainingReport(tmp_path, evaluator, network, ["organ"])
    drawn = []
    monkeypatch.setattr(report, "_plot", lambda: drawn.append(len(report.history)))
    report.attach(trainer)
    trainer.run([0, 1], max_epochs=8)
    assert drawn == [1, 4, 7, 8]  # 15 s apart, the first 12 s after a drawing; the last epoch is always drawn
    assert read_metrics(tmp_path)["epochs"] == 8 and len(report.history) == 8
    assert sum(1 for row in report.history if "val_mean_dice" in row) == 8


def test_a_step_is_timed_until_its_loss_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a step's kernels still run when its process function returns, and reading its loss waits for them: the
    step's time includes that read (a loss that takes 3 s of a fake clock to read), so ``overhead_share`` is only
    what lies outside the steps."""
    now = [0.0]
    monkeypatch.setattr(training_report.time, "perf_counter", lambda: now[0])

    class QueuedLoss:
        def __float__(self) -> float:
            now[0] += 3.0
            return 0.5

    def step(engine: Engine, batch: int) -> dict[str, QueuedLoss]:
        now[0] += 1.0
        return {"loss": QueuedLoss()}

    trainer = Engine(step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: now.__setitem__(0, now[0] + 2.0))
    report = TrainingReport(tmp_path, Engine(lambda engine, batch: None), torch.nn.Linear(2, 2), ["organ"])
    monkeypatch.setattr(report, "_plot", lambda: None)
    report.attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    metrics = read_metrics(tmp_path)
    # 4 steps of 4 s and 2 s after each of the 2 epochs: 16 of 20 s in the steps
    assert metrics["training_time_s"] == pytest.approx(20.0)
    assert metrics["overhead_share"] == pytest.approx(0.2)


def test_num_folds_1_split_and_evaluation(dataset3d: Path, tmp_path: Path) -> None:
    """Every case trains, none validates: on its own dataset evaluation is refused, on another it scores them all."""
    description = load_dataset_json(dataset3d)
    cases = [{"image": item["image"]} for item in description["training"]]
    assert split_datalist(cases, 0, 1) == (cases, [])
    args = (["organ", "lesion"], 3, "auto", dataset3d, 0, 1, 0, None)  # classes, dims, cases, its dataset, split
    with pytest.raises(DatasetError, match="this run trained on every case of .*--dataset_dir"):
        evaluation_cases(description, dataset3d, *args)
    other = write_dataset(tmp_path / "other", cases=2, seed=7, shape=(24, 24, 8))
    assert len(evaluation_cases(load_dataset_json(other), other, *args)) == 2


def test_num_folds_1_trains_on_every_case_and_keeps_the_last_weights(dataset3d: Path, tmp_path: Path) -> None:
    """The final model, trained through the user's command in a folder a killed run left temporary files in, under
    a umask of 027; then scored on another dataset."""
    run = tmp_path / "final"
    planted = [
        run / ".metrics.json.q1w2e3r4",
        run / "models" / ".checkpoint_last.pt.zz_00aa1",
        run / "configs" / ".train.yaml.abcdefgh",
        run / "docs" / ".README.md.0a1b2c3d",
    ]
    kept = run / ".keep.me"
    for path in [*planted, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": run, "num_folds": 1, "max_epochs": 2}
    with umask(0o027):
        result = run_bundle(TRAIN_3D, {**overrides, "val_interval": 1})
    log = result.stdout + result.stderr
    assert "val_mean_dice" not in log and "SupervisedEvaluator" not in log  # no validation ran
    assert not any(path.exists() for path in planted) and kept.is_file()
    for name in (
        "models/model.pt",
        "models/checkpoint_last.pt",
        "metrics.json",
        "configs/train.yaml",
        "docs/README.md",
    ):
        assert mode(run / name) == 0o640, name
    metrics = read_metrics(run)
    assert metrics["epochs"] == 2 and metrics["best_mean_dice"] is None
    assert metrics["validation"] == training_report.NO_VALIDATION and metrics["model_weights"] == "last epoch"
    readme = (run / "docs" / "README.md").read_text()
    assert "split: every case (num_folds 1), 8 training and 0 validation cases" in readme
    assert "`models/model.pt` holds the last epoch's weights" in readme
    metadata = json.loads((run / "configs" / "metadata.json").read_text())
    assert "trained on every case (8, num_folds 1), no validation" in metadata["data_source"]

    other = write_dataset(tmp_path / "other", cases=2, seed=7, shape=(40, 40, 16))
    out = tmp_path / "evaluation"
    run_bundle(run / "configs" / "evaluate.yaml", {"dataset_dir": other, "output_dir": out}, run_id="evaluating")
    assert sorted(json.loads((out / "evaluation.json").read_text())["cases"]) == ["case_000", "case_001"]


def _stopped_before_caching(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Loading dataset" not in result.stderr  # CacheDataset's progress: the cache was never filled


def test_an_unwritable_output_dir_stops_before_caching(dataset3d: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "a_file"  # a folder below a regular file cannot be created, whoever runs it
    blocked.write_text("not a folder")
    run = blocked / "run"
    result = run_bundle(TRAIN_3D, {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": run}, check=False)
    _stopped_before_caching(result, "error: ")
    # whichever check meets it first (the run-folder lock or the output_dir check) names the folder and the fix
    assert str(run) in result.stderr and "cannot be" in result.stderr and "--output_dir" in result.stderr


def test_an_output_dir_naming_a_file_stops_before_caching(dataset3d: Path, tmp_path: Path) -> None:
    run = tmp_path / "a_file"
    run.write_text("not a folder")
    result = run_bundle(TRAIN_3D, {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": run}, check=False)
    _stopped_before_caching(result, f"error: output_dir {run} is a file, but output_dir must be a folder: pass")
    assert run.read_text() == "not a folder"


def test_a_run_stopped_before_training_leaves_the_folders_as_it_found_them(dataset3d: Path, tmp_path: Path) -> None:
    """Bad data or settings found after the run folder was locked: no folder the run created, no lock file left."""
    new = tmp_path / "new" / "run"
    overrides = {**SMALL_3D, "dataset_dir": tmp_path / "missing", "output_dir": new}
    result = run_bundle(TRAIN_3D, overrides, check=False)
    assert result.returncode != 0 and f"dataset_dir {tmp_path / 'missing'} does not exist" in result.stderr
    assert not (tmp_path / "new").exists()
    found = tmp_path / "found"
    found.mkdir()
    (found / "notes.txt").write_text("the user's")
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": found, "fold": 9, "num_folds": 4}
    result = run_bundle(TRAIN_3D, overrides, check=False)
    assert result.returncode != 0 and "fold=9 num_folds=4" in result.stderr and "Traceback" not in result.stderr
    assert [path.name for path in found.iterdir()] == ["notes.txt"]


def test_a_run_folder_written_into_keeps_its_lock_file(tmp_path: Path) -> None:
    """Once anything was written into the locked folder, nothing is removed there when the run ends."""
    lock = runlock.RunLock(tmp_path / "new" / "run").acquire()
    (lock.folder / "metrics.json").write_text("{}")
    lock.discard_if_unused()
    assert sorted(path.name for path in lock.folder.iterdir()) == [runlock.LOCK_FILE, "metrics.json"]
    lock.release()
    unused = runlock.RunLock(tmp_path / "other" / "run").acquire()
    unused.discard_if_unused()
    assert not unused.held and not (tmp_path / "other").exists()


def test_a_full_output_dir_stops_before_caching(
    dataset3d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"  # the training process finds 1 MiB free on every disk
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import collections, shutil\n"
        "usage = collections.namedtuple('usage', 'total used free')\n"
        "shutil.disk_usage = lambda path: usage(2**40, 2**40 - 2**20, 2**20)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    run = tmp_path / "run"
    result = run_bundle(TRAIN_3D, {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": run}, check=False)
    _stopped_before_caching(result, f"error: output_dir {run} has 1 MiB free but the checkpoints need about")
