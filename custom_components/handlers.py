"""Ignite handlers for what a user opens after training: the report files, the best model and a resumable state.

MONAI's CheckpointSaver names interval checkpoints by epoch and forgets the best score on resume; these handlers
write fixed file names atomically (temporary file, then rename) and keep their history in the checkpoint, so an
interrupted run resumes with its curve, its best score and its ``model.pt`` intact.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import random
import resource
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.handlers
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.data.utils import set_rnd
from torch.optim.lr_scheduler import LRScheduler

from custom_components.figures import png_bytes, pyplot
from custom_components.networks import unwrap
from custom_components.run_files import (
    CheckpointError,
    ModelError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    load_weights,
    read_checkpoint,
)

MODEL_FILE = Path("models") / "model.pt"  # the best weights in a run folder, where the model zoo keeps them
NO_VALIDATION = "none: trained on every case (num_folds 1)"  # metrics.json's `validation` of such a run
# learning_curve.png is drawn after the first epoch, at the end, and in between at most this often: a drawing costs
# a large share of a small network's step, and validations can come every few seconds (benchmarks/RESULTS.md)
PLOT_INTERVAL_S = 30.0
BUDGET_EPOCHS = 1_000_000  # the trainer's epoch limit under `time_budget_min`: the budget ends the run


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch of one process: a function of the run's seed, the epoch and the rank alone."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class ResumableCheckpoint:
    """Keep the last epoch's full state in one file, and resume from it when a run starts again.

    At the end of an epoch the state of the engine it is attached to and of every object in ``objects``
    (network, optimiser, schedule, report) is written atomically to ``path``: after the run's last epoch, when it
    stops early, and otherwise once ``interval_min`` minutes have passed since the last write (0: every epoch), so a
    small dataset's short epochs do not each pay for writing the optimiser's state; when the engine starts and
    ``path`` exists, all of it is loaded back as tensors and plain values (``weights_only``: nothing in the file is
    executed), so training continues at the next epoch. It replaces MONAI's CheckpointLoader + CheckpointSaver pair
    because those cannot hold the trainer that owns them (a config cycle) and name each epoch's file differently.

    A larger ``max_epochs`` than the checkpoint's extends the run (the settings check of the run folder lets it grow
    only with ``extend_training``): the learning-rate schedules in ``objects`` are then not loaded but laid out
    again over the new length, stepped to the resumed epoch as a run of that length would have been.

    With ``seed``, every epoch starts from random generators seeded by (seed, epoch, rank): torch's, numpy's,
    Python's and the random transforms of ``dataset`` (MONAI's ``set_rnd``; an ``EpochSeededDataset`` seeds each item
    from it and its index, in whichever worker loads it). An epoch then draws the same patches, augmentations and
    order whether the run was interrupted before it or not, so a resumed run repeats the uninterrupted one.
    """

    def __init__(
        self,
        path: str | Path,
        objects: Mapping[str, Any],
        enabled: bool = True,
        save: bool = True,
        seed: int | None = None,
        dataset: Any = None,
        interval_min: float = 0.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.objects = {name: unwrap(obj) for name, obj in objects.items()}
        self.enabled = enabled
        self.save_enabled = save  # False in all but one process of a distributed run: all resume, one writes
        self.seed = seed
        self.dataset = dataset
        self.interval_s = float(interval_min) * 60
        self.clock = clock
        self._saved_at = clock()

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.seed is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, self.reseed)

    def reseed(self, engine: Engine) -> None:
        """Seed every random generator of this epoch from (seed, epoch, rank), before its first batch is drawn."""
        seed = epoch_seed(self.seed, engine.state.epoch, _rank())
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        if self.dataset is not None:
            set_rnd(self.dataset, seed)
            if hasattr(self.dataset, "set_epoch"):  # an EpochSeededDataset: where its sampler starts
                self.dataset.set_epoch(engine.state.epoch)

    def _save_last(self, engine: Engine) -> None:
        """Register the save when the run starts, after every handler was attached: it then runs last at each
        epoch end, once validation, the report and the schedule step are done, so the file is a whole epoch."""
        if self.save_enabled and not engine.has_event_handler(self.save_due, Events.EPOCH_COMPLETED):
            self._saved_at = self.clock()
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_due)
            engine.add_event_handler(Events.TERMINATE, self.save)  # a run stopped early: with why it stopped

    def _with_engine(self, engine: Engine) -> dict[str, Any]:
        return {**self.objects, "engine": engine}

    def save_due(self, engine: Engine) -> None:
        """Save after the last epoch, or once the interval has passed; a stopping run saves on ``TERMINATE``."""
        if engine.should_terminate:
            return
        if engine.state.epoch >= engine.state.max_epochs or self.clock() - self._saved_at >= self.interval_s:
            self.save(engine)

    def save(self, engine: Engine) -> None:
        atomic_torch_save({name: obj.state_dict() for name, obj in self._with_engine(engine).items()}, self.path)
        self._saved_at = self.clock()

    def load(self, engine: Engine) -> None:
        self._save_last(engine)
        if not self.path.is_file():
            return
        max_epochs = engine.state.max_epochs
        try:
            checkpoint = read_checkpoint(self.path, getattr(engine.state, "device", None) or "cpu")
        except CheckpointError as err:
            logging.getLogger(__name__).error("%s", err)
            sys.exit(f"error: {err}")
        stored_epochs = int(checkpoint["engine"]["max_epochs"])
        schedules = {}
        if max_epochs > stored_epochs:  # an extension: the schedules are laid out again over the new length
            schedules = {name: obj for name, obj in self.objects.items() if isinstance(obj, LRScheduler)}
        fresh_lr = {name: [group["lr"] for group in obj.optimizer.param_groups] for name, obj in schedules.items()}
        to_load = {name: obj for name, obj in self._with_engine(engine).items() if name not in schedules}
        missing = sorted(name for name in to_load if name not in checkpoint)
        if missing:  # a checkpoint of a version without them: they start fresh
            engine.logger.warning(f"{self.path} holds no {', '.join(missing)}: they start anew")
        Checkpoint.load_objects(to_load={k: v for k, v in to_load.items() if k in checkpoint}, checkpoint=checkpoint)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        report = self.objects.get("report")
        if getattr(report, "stopped", None) and not schedules:  # it ended (time budget, early stopping): stays so
            engine.logger.info(f"{self.path}: this run already ended ({report.stopped}); nothing to train")
            engine.state.max_epochs = engine.state.epoch
        elif report is not None and schedules:
            report.stopped = None  # an extension trains on
        for name, schedule in schedules.items():
            # from the rate a new run of this length starts with, stepped once per finished epoch (as
            # LrScheduleHandler steps it), so recursive schedules (cosine, step, poly) land where that run would
            for group, lr in zip(schedule.optimizer.param_groups, fresh_lr[name], strict=True):
                group["lr"] = lr
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "step() before optimizer.step()": this is a replay
                for _ in range(engine.state.epoch):
                    schedule.step()
        engine.logger.info(f"resumed from {self.path} at epoch {engine.state.epoch} of {engine.state.max_epochs}")
        if schedules:
            engine.logger.info(
                f"extended from {stored_epochs} to {engine.state.max_epochs} epochs: {', '.join(schedules)} laid out "
                f"again over {engine.state.max_epochs} epochs"
            )


class TrainingReport:
    """Learning curve (CSV and PNG), ``metrics.json`` and the best weights ``models/model.pt``, written every epoch
    (the PNG after the first epoch, at the end and at most every ``PLOT_INTERVAL_S`` seconds in between).

    Its epoch-end step is registered when the run starts, after every handler was attached, so it reads this
    epoch's validation whatever its place in the handler list. Its ``state_dict`` holds the history, so it
    belongs in the resumable checkpoint. With ``validate`` false (``num_folds: 1``: every case trains, none is held
    out) ``models/model.pt`` holds the last epoch's weights, rewritten every epoch, and ``metrics.json`` says there
    was no validation.
    """

    def __init__(
        self,
        output_dir: str | Path,
        evaluator: Engine,
        network: torch.nn.Module,
        class_names: Sequence[str],
        key_metric: str = "val_mean_dice",
        per_class_metric: str = "val_dice_per_class",
        enabled: bool = True,
        validate: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.network = unwrap(network)
        self.class_names = list(class_names)
        self.key_metric = key_metric
        self.per_class_metric = per_class_metric
        self.enabled = enabled
        self.validate = bool(validate)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.wall_time = 0.0
        self.iterations = 0
        # seconds inside the trainer's iterations, the rest of training being overhead (None: resumed from a checkpoint
        # that did not record it)
        self.iteration_time: float | None = 0.0
        self._iteration_start = 0.0
        self._loss_sum = 0.0
        self._loss_count = 0
        self._epoch_start = 0.0
        self._last_val_epoch = -1
        self._plotted_at = -math.inf
        self._learning_rate: float | None = None
        self.stopped: str | None = None  # why the run ended before max_epochs (time budget, early stopping)
        self.training_time = 0.0  # wall-clock seconds since the trainer started, earlier processes of the run included
        self._run_start: float | None = None
        self._time_before = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "best": self.best,
            "wall_time": self.wall_time,
            "iterations": self.iterations,
            "iteration_time": self.iteration_time,
            "stopped": self.stopped,
            "training_time": self.training_time,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.wall_time = float(state["wall_time"])
        self.iterations = int(state["iterations"])
        self.iteration_time = state.get("iteration_time")
        self.stopped = state.get("stopped")
        self._time_before = self.training_time = float(state.get("training_time", state["wall_time"]))

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.TERMINATE, self._terminated)
        self.evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def _started(self, engine: Engine) -> None:
        self._run_start = time.perf_counter()
        if not engine.has_event_handler(self._epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._loss_sum, self._loss_count = 0.0, 0
        self._epoch_start = time.perf_counter()
        self._learning_rate = engine.optimizer.param_groups[0]["lr"] if hasattr(engine, "optimizer") else None

    def _iteration_started(self, engine: Engine) -> None:
        self._iteration_start = time.perf_counter()  # the batch is loaded: the step starts

    def _iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for item in items:
            self._loss_sum += float(item["loss"])
            self._loss_count += 1
        self.iterations += 1
        # the step ends once its loss is read: on CUDA the read waits for the kernels the step queued
        if self.iteration_time is not None:
            self.iteration_time += time.perf_counter() - self._iteration_start

    def _validated(self, evaluator: Engine) -> None:
        self._last_val_epoch = evaluator.state.epoch  # the evaluator's epoch mirrors the trainer's

    def _epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        self.wall_time += time.perf_counter() - self._epoch_start
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": self._loss_sum / max(self._loss_count, 1),
            "learning_rate": self._learning_rate,  # the rate this epoch trained with
            "wall_time_s": round(self.wall_time, 3),
        }
        if self._last_val_epoch == epoch:
            metrics = self.evaluator.state.metrics
            row[self.key_metric] = float(metrics[self.key_metric])
            per_class = torch.as_tensor(metrics.get(self.per_class_metric, [])).flatten().tolist()
            for name, value in zip(self.class_names, per_class, strict=False):
                row[f"dice_{name}"] = float(value)
            if not self.best or row[self.key_metric] > self.best[self.key_metric]:
                self.best = dict(row)
                atomic_torch_save(self.network.state_dict(), self.output_dir / MODEL_FILE)
        if not self.validate:  # nothing selects a model: keep the last weights
            atomic_torch_save(self.network.state_dict(), self.output_dir / MODEL_FILE)
        self.history.append(row)
        due = time.perf_counter() - self._plotted_at >= PLOT_INTERVAL_S
        self.write(engine, plot=due or epoch >= engine.state.max_epochs)

    def _terminated(self, engine: Engine) -> None:
        """The run stopped before max_epochs: say why in metrics.json (the handler that stopped it set the reason)."""
        self.stopped = getattr(engine.state, "stop_reason", None) or "terminated before max_epochs"
        self.write(engine)

    def _overhead_share(self) -> float | None:
        """1 - time in iterations / training time; None before training or when a resumed checkpoint lacked it."""
        if self.iteration_time is None or not self.training_time:
            return None
        return round(1 - self.iteration_time / self.training_time, 4)

    def _dice_per_class(self, row: Mapping[str, Any]) -> dict[str, float]:
        return {name: row[f"dice_{name}"] for name in self.class_names if f"dice_{name}" in row}

    def write(self, engine: Engine, plot: bool = True) -> None:
        """Write ``learning_curve.csv``, ``metrics.json`` and (``plot``) ``learning_curve.png`` into ``output_dir``."""
        if self._run_start is not None:
            self.training_time = self._time_before + time.perf_counter() - self._run_start
        validated = [row for row in self.history if self.key_metric in row]
        last = validated[-1] if validated else {}
        device = getattr(engine.state, "device", None) or next(self.network.parameters()).device
        if torch.device(device).type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:  # ru_maxrss is in KiB on Linux: the process's resident peak, data loading included
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        metrics = {
            "best_mean_dice": self.best.get(self.key_metric),
            "best_epoch": self.best.get("epoch"),
            "best_dice_per_class": self._dice_per_class(self.best),
            "last_mean_dice": last.get(self.key_metric),
            "last_dice_per_class": self._dice_per_class(last),
            "epochs": self.history[-1]["epoch"] if self.history else 0,
            "iterations": self.iterations,  # batches trained, in all epochs (iterations_per_epoch each when set)
            "stopped": self.stopped,  # null: it trained max_epochs (or is still training)
            "final_learning_rate": engine.optimizer.param_groups[0]["lr"] if hasattr(engine, "optimizer") else None,
            "wall_time_s": round(self.wall_time, 3),
            "training_time_s": round(self.training_time, 3),  # since the trainer started: what time_budget_min limits
            "seconds_per_iteration": round(self.wall_time / max(self.iterations, 1), 4),
            # the share of training_time_s outside the iterations' steps (forward, loss, backward, optimiser step):
            # waits for data, validation, checkpoints, epoch ends
            "overhead_share": self._overhead_share(),
            "peak_memory_mb": round(peak_mb, 1),
            "memory_kind": "cuda_allocated" if torch.device(device).type == "cuda" else "process_rss",
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "device": str(device),
            "validation": "held-out cases, every val_interval epochs" if self.validate else NO_VALIDATION,
            "model_weights": "best validation mean Dice" if self.validate else "last epoch",
        }
        atomic_write_json(metrics, self.output_dir / "metrics.json")
        fields = list(dict.fromkeys(key for row in self.history for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_bytes(self.output_dir / "learning_curve.csv", text.getvalue().encode())
        if plot:
            self._plot()
            self._plotted_at = time.perf_counter()

    def _plot(self) -> None:
        fig, (loss_ax, dice_ax) = pyplot().subplots(1, 2, figsize=(10, 4))
        epochs = [row["epoch"] for row in self.history]
        loss_ax.plot(epochs, [row["train_loss"] for row in self.history], marker=".")
        loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
        validated = [row for row in self.history if self.key_metric in row]
        val_epochs = [row["epoch"] for row in validated]
        dice_ax.plot(val_epochs, [row[self.key_metric] for row in validated], marker="o", label="mean")
        for name in self.class_names:
            values = [row.get(f"dice_{name}") for row in validated]
            if any(v is not None for v in values):
                dice_ax.plot(val_epochs, values, marker=".", linestyle="--", label=name)
        if not self.validate:
            note = f"no validation:\n{NO_VALIDATION.removeprefix('none: ')}"
            dice_ax.text(0.5, 0.5, note, ha="center", va="center", transform=dice_ax.transAxes)
        dice_ax.set(title="validation Dice", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
        dice_ax.legend(loc="lower right")
        # fixed margins: tight_layout would take half again the drawing time to fit the same labels
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
        atomic_write_bytes(self.output_dir / "learning_curve.png", png_bytes(fig))


class TimeBudget:
    """``time_budget_min``: train for a wall-clock budget instead of ``max_epochs``, the schedule laid out over it.

    After every epoch (validation included) the speed so far gives the epochs that still fit; the run stops when the
    next one would not (rounded to the nearest epoch, so it ends within half an epoch of the budget). The learning
    rate follows the ``schedule_epochs``-long schedule stretched over the planned epochs: after epoch ``k`` of ``E``
    planned, the schedule stands at step ``round(schedule_epochs * k / E)``, so warm-up and annealing take the same
    share of the budget and the last epoch ends at the schedule's end (its minimum). The last epoch is validated
    (``validator``) when its ``val_interval`` would have skipped it, so the annealed model is scored and a run shorter
    than ``val_interval`` still has its model. The time already trained is in the checkpoint: a resumed run has the
    rest of the budget. It replaces ``LrScheduleHandler`` while active.
    """

    def __init__(
        self,
        minutes: float | None,
        lr_scheduler: LRScheduler,
        schedule_epochs: int,
        validator: Engine | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.budget_s = None if minutes is None else float(minutes) * 60
        self.validator = validator
        self.lr_scheduler = lr_scheduler
        self.schedule_epochs = int(schedule_epochs)
        self.clock = clock
        self.before_s = 0.0  # trained in earlier processes of this run (from the checkpoint)
        self.planned: int | None = None
        self._start: float | None = None
        self._initial_schedule = copy.deepcopy(lr_scheduler.state_dict())
        self._initial_lrs = [group["lr"] for group in lr_scheduler.optimizer.param_groups]

    def elapsed(self) -> float:
        """Seconds of training in this run so far, earlier processes included."""
        return self.before_s + (0.0 if self._start is None else self.clock() - self._start)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.before_s = float(state["elapsed_s"])

    def attach(self, engine: Engine) -> None:
        if self.budget_s is not None:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, _engine: Engine) -> None:
        self._start = self.clock()

    def _epoch_completed(self, engine: Engine) -> None:
        budget, done, elapsed = self.budget_s or 0.0, engine.state.epoch, self.elapsed()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every process decides alike
            slowest = torch.tensor([elapsed], device=getattr(engine.state, "device", None) or "cpu")
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
            elapsed = float(slowest.item())
        self.planned = done + max(0, round((budget - elapsed) / (elapsed / done)))
        self.schedule_to(round(self.schedule_epochs * done / self.planned))
        if self.planned <= done:
            engine.state.stop_reason = (
                f"time budget of {budget / 60:g} min reached: {done} epochs in {elapsed:.1f} s of training"
            )
            if self.validator is not None and self.validator.state.epoch != done:  # the last epoch, unvalidated
                self.validator.run(done)
            engine.terminate()

    def schedule_to(self, step: int) -> None:
        """Put the schedule (and the optimiser's rate) where ``step`` epochs of it lead from its start."""
        self.lr_scheduler.load_state_dict(copy.deepcopy(self._initial_schedule))
        for group, lr in zip(self.lr_scheduler.optimizer.param_groups, self._initial_lrs, strict=True):
            group["lr"] = lr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() before optimizer.step()": a replay
            for _ in range(step):
                self.lr_scheduler.step()


class EarlyStopping:
    """``early_stop_patience``: ignite's ``EarlyStopping`` on the validator, stopping the trainer this is attached to
    after ``patience`` validations without a better ``key_metric``; the reason goes into metrics.json. Its counter
    and best score are in the checkpoint, so a resumed run stops where an uninterrupted one would."""

    def __init__(self, patience: int | None, evaluator: Engine, key_metric: str = "val_mean_dice") -> None:
        self.patience = patience
        self.evaluator = evaluator
        self.key_metric = key_metric
        self.stopper: ignite.handlers.EarlyStopping | None = None  # made when attached: it needs the trainer

    def attach(self, trainer: Engine) -> None:
        if self.patience is None:
            return
        self.stopper = ignite.handlers.EarlyStopping(
            self.patience, lambda validator: validator.state.metrics[self.key_metric], trainer
        )
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.stopper)  # after each validation
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._reason, trainer)  # after the stopper's check

    def _reason(self, _evaluator: Engine, trainer: Engine) -> None:
        if trainer.should_terminate and not getattr(trainer.state, "stop_reason", None) and self.stopper:
            trainer.state.stop_reason = (
                f"early stopping: no better {self.key_metric} in {self.patience} validations "
                f"(best {self.stopper.best_score:.4f})"
            )

    def state_dict(self) -> dict[str, Any]:
        return dict(self.stopper.state_dict()) if self.stopper is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.stopper is not None and state:
            self.stopper.load_state_dict(state)


class ModelLoader:
    """The weights of ``path`` loaded into ``network`` when the handler is built, before any case is read.

    MONAI's ``CheckpointLoader`` loads when the engine starts, after the dataset was built, and a wrong file ends in
    a traceback of every parameter; this one stops the run at once with the file and the keys that differ.
    """

    def __init__(self, path: str | Path, network: torch.nn.Module, device: Any = "cpu") -> None:
        try:
            load_weights(network, path, device)
        except ModelError as err:
            logging.getLogger(__name__).error("%s", err)
            sys.exit(f"error: {err}")
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.logger.info(f"weights loaded from {self.path}")


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` in every process of a distributed run (e.g. one timestamped output folder for all)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
