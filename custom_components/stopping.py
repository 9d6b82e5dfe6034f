"""When training stops before ``max_epochs``: at a wall-clock budget (``time_budget_min``) or when validation stops
improving (``early_stop_patience``).

Each writes why it stopped into ``engine.state.stop_reason`` (``metrics.json``'s ``stopped``) and keeps its state in
the resumable checkpoint, so a resumed run stops where an uninterrupted one would.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from typing import Any

import ignite.handlers
import torch
from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import LRScheduler

from custom_components.distributed import is_distributed

BUDGET_EPOCHS = 1_000_000  # the trainer's epoch limit under `time_budget_min`: the budget ends the run


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
        if is_distributed():  # every process decides alike
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
