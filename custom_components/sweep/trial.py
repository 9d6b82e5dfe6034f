"""One trial of a sweep: the user's own training command (or a K-fold cross-validation) in a subprocess, its
validation Dice reported to Optuna while it runs, stopped early when the pruner says so, scored when it ends."""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from custom_components.bundle import bundle_command, command_line_value
from custom_components.sweep.space import Space

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often a running trial's learning_curve.csv is read
STOP_GRACE_S = 10.0  # a pruned training gets this long to end after SIGTERM before it is killed
TRIAL_DEFAULTS = {"progress_bar": False}  # a trial's output goes to a log file: no progress-bar redraws (--set wins)
TRIAL_LOG = "trial.log"  # in the trial folder: the command and everything it printed
CURVE_FILE, CURVE_METRIC = "learning_curve.csv", "val_mean_dice"  # one row per epoch; empty without validation


class TrialFailed(RuntimeError):
    """A trial's run did not give a score: it exited with an error, or wrote no Dice."""


@dataclass(frozen=True)
class Sweep:
    """What every trial of one ``sweep run`` gets: the options of this command line, checked."""

    bundle: Path
    dataset_dir: Path
    output: Path
    spaces: tuple[Space, ...]
    fixed: Mapping[str, Any]  # --set keys (and time_budget_min), values as parse_key_values reads them
    folds: int | None  # K-fold cross-validation of each trial (kfold run) instead of one training
    trials: int

    @property
    def train_config(self) -> Path:
        return self.bundle / "configs" / "train.yaml"


def trial_folder(output: Path, number: int) -> Path:
    """The run folder of trial ``number``: named by Optuna's trial number, so no two processes share one."""
    return output / f"trial_{number:03d}"


def shown(settings: Mapping[str, Any]) -> str:
    """Settings as ``key=value`` pairs (JSON values) for the console and the report."""
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())


def trial_command(sweep: Sweep, settings: Mapping[str, Any], folder: Path) -> list[str]:
    """The trial's command: ``monai.bundle run training`` of the bundle's train.yaml into ``folder``, or with
    ``--folds`` ``custom_components.kfold run`` with ``--output folder``; every value written so that the bundle
    receives exactly that value."""
    keys = {**sweep.fixed, **settings}
    if sweep.folds:
        pairs = [f"{key}={json.dumps(value)}" for key, value in keys.items()]  # JSON is YAML, as --set reads it
        return [
            *(sys.executable, "-m", "custom_components.kfold", "run", "--bundle", str(sweep.bundle)),
            *("--dataset_dir", str(sweep.dataset_dir), "--folds", str(sweep.folds), "--output", str(folder)),
            *("--set", *pairs),
        ]
    overrides = {key: command_line_value(value) for key, value in {**TRIAL_DEFAULTS, **keys}.items()}
    overrides |= {"dataset_dir": command_line_value(sweep.dataset_dir), "output_dir": command_line_value(folder)}
    return bundle_command("training", [sweep.train_config], overrides)


def validations(curve: Path) -> list[tuple[int, float]]:
    """``(epoch, val_mean_dice)`` of every validated epoch in a learning_curve.csv so far (none if unreadable)."""
    try:
        with open(curve, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [(int(row["epoch"]), float(row[CURVE_METRIC])) for row in rows if row.get(CURVE_METRIC)]
    except (OSError, KeyError, ValueError, csv.Error):
        return []


def stop(process: subprocess.Popen) -> None:
    """End a running trial's process: SIGTERM, then SIGKILL after a grace period."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def watch(process: subprocess.Popen, trial: optuna.Trial, curve: Path | None) -> tuple[int, float] | None:
    """Wait for ``process``, reporting each new validation Dice of ``curve`` to Optuna (step: the epoch); the
    process is stopped as soon as the pruner says so, and the ``(epoch, Dice)`` it was pruned at returned."""
    last_epoch = 0
    while True:
        running = process.poll() is None
        new = [(epoch, dice) for epoch, dice in (validations(curve) if curve else []) if epoch > last_epoch]
        for epoch, dice in new:
            trial.report(dice, step=epoch)
            last_epoch = epoch
        if new and running and trial.should_prune():
            stop(process)
            return new[-1]
        if not running:
            return None
        time.sleep(POLL_S)


def score(sweep: Sweep, folder: Path, log: Path) -> float:
    """The trial's value: ``best_mean_dice`` of its metrics.json, or with ``--folds`` the mean out-of-fold Dice
    (``summary.oof_mean_dice.mean`` of report.json); files read as JSON data only."""
    if sweep.folds:
        path, what = folder / "report.json", "summary.oof_mean_dice.mean"
    else:
        path, what = folder / "metrics.json", "best_mean_dice"
    try:
        value: Any = json.loads(path.read_text())
        for part in what.split("."):
            value = value[part]
    except (OSError, ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise TrialFailed(f"{path} holds no {what} (did the run validate? val_interval <= max_epochs); see {log}")
    return float(value)


def fail(trial: optuna.Trial, message: str) -> TrialFailed:
    """The error of a failed trial, recorded in the trial (user attr ``error``) for the log and the report."""
    trial.set_user_attr("error", message)
    return TrialFailed(message)


def run_trial(sweep: Sweep, trial: optuna.Trial, storage: str) -> float:
    """Run one trial in ``OUTPUT/trial_NNN`` and return its score; raises ``optuna.TrialPruned`` when pruned and
    :class:`TrialFailed` when its run fails. The process is stopped whatever ends the wait (an interrupt too).

    A trial's settings are drawn from ``--space``; one the study's ``storage`` holds for it (a queued trial) must be
    a value of its space, as Optuna checks: anything else is data the sweep did not draw, never run."""
    try:
        settings = {space.key: space.suggest(trial) for space in sweep.spaces}
    except ValueError as err:  # Optuna's refusal of a stored value outside the space
        raise fail(
            trial,
            f"{storage} holds settings for it that are not values of --space ({err}): not run, the sweep goes on with "
            "trials it draws; give this sweep a --study (or --storage) of its own if others write to that one",
        ) from None
    folder = trial_folder(sweep.output, trial.number)
    log = folder / TRIAL_LOG
    for key, value in {"settings": settings, "folder": folder.name, "log": str(log)}.items():
        trial.set_user_attr(key, value)
    if folder.exists() and any(folder.iterdir()):
        raise fail(trial, f"{folder} already holds files (another study's trial?): give each study its own --output")
    folder.mkdir(parents=True, exist_ok=True)
    command = trial_command(sweep, settings, folder)
    logger.info("trial %d: started, %s (log: %s)", trial.number, shown(settings), log)
    with open(log, "w") as handle:
        handle.write(f"=== {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=folder, stdout=handle, stderr=subprocess.STDOUT)
        try:
            pruned = watch(process, trial, None if sweep.folds else folder / CURVE_FILE)
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted (Ctrl-C or SIGTERM): its training was stopped")
            raise
        finally:
            stop(process)
    if pruned:
        trial.set_user_attr("pruned_at", {"epoch": pruned[0], CURVE_METRIC: pruned[1]})
        raise optuna.TrialPruned(f"at epoch {pruned[0]} ({CURVE_METRIC} {pruned[1]:.4f}, below the median)")
    if process.returncode != 0:
        raise fail(trial, f"exited with status {process.returncode}; see {log}")
    try:
        return score(sweep, folder, log)
    except TrialFailed as err:
        raise fail(trial, str(err)) from None
