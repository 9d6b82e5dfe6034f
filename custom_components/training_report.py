"""What a user opens after training, written every epoch: the learning curve (CSV and PNG), ``metrics.json`` and
the best weights ``models/model.pt``.

Every file is written whole (temporary file, then rename), and the history is kept in the resumable checkpoint, so an
interrupted run resumes with its curve and its best score.
"""

from __future__ import annotations

import csv
import io
import math
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from custom_components.checkpoint import MODEL_FILE
from custom_components.figures import png_bytes, pyplot
from custom_components.networks import unwrap
from custom_components.run_files import atomic_torch_save, atomic_write_bytes, atomic_write_json

NO_VALIDATION = "none: trained on every case (num_folds 1)"  # metrics.json's `validation` of such a run
# learning_curve.png is drawn after the first epoch, at the end, and in between at most this often: a drawing costs
# a large share of a small network's step, and validations can come every few seconds (benchmarks/RESULTS.md)
PLOT_INTERVAL_S = 30.0


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
        # seconds in the evaluator's runs (validation), likewise None when a resumed checkpoint did not record it
        self.validation_time: float | None = 0.0
        self._validation_start = 0.0
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
            "validation_time": self.validation_time,
            "stopped": self.stopped,
            "training_time": self.training_time,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.wall_time = float(state["wall_time"])
        self.iterations = int(state["iterations"])
        self.iteration_time = state.get("iteration_time")
        self.validation_time = state.get("validation_time")
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
        self.evaluator.add_event_handler(Events.STARTED, self._validation_started)
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

    def _validation_started(self, evaluator: Engine) -> None:
        self._validation_start = time.perf_counter()

    def _validated(self, evaluator: Engine) -> None:
        self._last_val_epoch = evaluator.state.epoch  # the evaluator's epoch mirrors the trainer's
        if self.validation_time is not None:
            self.validation_time += time.perf_counter() - self._validation_start

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

    def _validation_share(self) -> float | None:
        """Time in validations / training time; None before training or when a resumed checkpoint lacked it."""
        if self.validation_time is None or not self.training_time:
            return None
        return round(self.validation_time / self.training_time, 4)

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
            # the part of it that validation took (the evaluator's runs; validated every val_interval epochs)
            "validation_share": self._validation_share(),
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
