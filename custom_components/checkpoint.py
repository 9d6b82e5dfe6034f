"""What a run keeps of its model on disk, and what loads it back: ``models/checkpoint_last.pt``, the whole training
state each epoch, and ``models/model.pt``, the weights evaluation and inference load.

MONAI's CheckpointSaver names interval checkpoints by epoch and forgets the best score on resume; the checkpoint here
has one fixed file name, written atomically (temporary file, then rename), and holds the report's history, so an
interrupted run resumes with its curve, its best score and its ``model.pt`` intact.
"""

from __future__ import annotations

import logging
import random
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.data.utils import set_rnd
from torch.optim.lr_scheduler import LRScheduler

from custom_components.distributed import process_rank
from custom_components.networks import unwrap
from custom_components.run_files import (
    CheckpointError,
    ModelError,
    atomic_torch_save,
    load_weights,
    read_checkpoint,
)

MODEL_FILE = Path("models") / "model.pt"  # the best weights in a run folder, where the model zoo keeps them


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch of one process: a function of the run's seed, the epoch and the rank alone."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


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
        seed = epoch_seed(self.seed, engine.state.epoch, process_rank())
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
