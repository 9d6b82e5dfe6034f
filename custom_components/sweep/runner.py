"""``sweep run``: the request checked at once, then Optuna's optimisation loop over trials until the study holds
``--trials`` finished ones, together with any other process working on the same study."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from custom_components import settings
from custom_components.bundle import KeyValueError, parse_key_values
from custom_components.data import DatasetError, load_dataset_json
from custom_components.kfold.bundle import RUN_KEYS
from custom_components.sweep.report import write_report
from custom_components.sweep.space import Space, SweepError, parse_space
from custom_components.sweep.study import (
    claim,
    grid_size,
    make_sampler,
    open_study,
    room_for_trial,
    shown_url,
    storage_url,
    surplus,
)
from custom_components.sweep.trial import Sweep, TrialFailed, run_trial, shown

logger = logging.getLogger(__name__)

FAILURES_IN_A_ROW = 3  # a process stops after this many failed trials in a row (a broken dataset, a full disk)
SWEEP_KEYS = {"dataset_dir": "--dataset_dir", "output_dir": "--output", "time_budget_min": "--time_budget_min"}


class Surplus(RuntimeError):
    """A trial started when the study already had enough (two processes asked at the same moment): not run."""


def _top(key: str) -> str:
    return key.replace("::", "#").split("#")[0]


def _setting_problems(
    bundle: Path, fixed: Mapping[str, Any], spaces: Sequence[Space], arguments: Mapping[str, str]
) -> list[str]:
    """Every problem the bundle's settings check finds in the fixed keys and in each space's bounds or choices,
    each prefixed with the argument that gave it."""
    first = {**fixed, **{space.key: space.candidates()[0] for space in spaces}}
    problems = settings.check(first, bundle, "train")
    reported = {problem.key for problem in problems}
    for space in spaces:
        if _top(space.key) in reported:
            continue
        for candidate in space.candidates()[1:]:
            problems += [
                p for p in settings.check({**first, space.key: candidate}, bundle, "train") if p.key == _top(space.key)
            ]
    unique = dict.fromkeys(f"{arguments.get(problem.key, '--set/--space')}: {problem}" for problem in problems)
    return list(unique)


def check_request(
    bundle: str | Path,
    dataset_dir: str | Path,
    output: str | Path,
    trials: int,
    space_arguments: Sequence[str],
    set_arguments: Sequence[str] | None = None,
    folds: int | None = None,
    time_budget_min: float | None = None,
) -> Sweep:
    """The sweep's options checked before any trial starts: every problem at once (bad ``--space`` syntax, keys
    the sweep sets itself, keys or values the bundle refuses), as one :class:`SweepError` naming each argument."""
    errors: list[str] = []
    fixes = {key: "`kfold run` sets it for each fold itself" for key in (RUN_KEYS if folds else {})}
    fixes |= {key: f"the sweep sets it for every trial; use {option}" for key, option in SWEEP_KEYS.items()}
    fixed: dict[str, Any] = {}
    arguments: dict[str, str] = {}  # top-level key -> the argument that gave it
    for pair in set_arguments or []:
        try:
            values = parse_key_values([pair], fixes)
        except KeyValueError as err:
            errors.append(str(err))
            continue
        fixed |= values
        arguments |= {_top(key): f"--set {pair}" for key in values}
    spaces: list[Space] = []
    for argument in space_arguments:
        try:
            space = parse_space(argument)
        except SweepError as err:
            errors.append(str(err))
            continue
        if _top(space.key) in fixes:
            errors.append(f"--space {argument}: {fixes[_top(space.key)]}")
        elif _top(space.key) in arguments:
            errors.append(f"--space {argument}: {space.key} is given by {arguments[_top(space.key)]} too; give it once")
        else:
            spaces.append(space)
            arguments[_top(space.key)] = f"--space {argument}"
    if not space_arguments:
        errors.append("no --space given: search at least one key, e.g. --space learning_rate=loguniform:1e-4:1e-2")
    if time_budget_min is not None:
        if time_budget_min <= 0:
            errors.append(f"--time_budget_min {time_budget_min}: give minutes > 0")
        fixed["time_budget_min"] = time_budget_min
        arguments["time_budget_min"] = f"--time_budget_min {time_budget_min}"
    if trials < 1:
        errors.append(f"--trials {trials}: give the number of finished trials wanted, at least 1")
    if folds is not None and folds < 2:
        errors.append(f"--folds {folds}: give at least 2 folds")
    try:
        load_dataset_json(dataset_dir)
    except DatasetError as err:
        errors.append(str(err))
    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "train.yaml").is_file():
        errors.append(f"--bundle {bundle}: it has no configs/train.yaml; pass a bundle folder such as bundles/unet3d")
    else:
        errors += _setting_problems(bundle, fixed, spaces, arguments)
    if errors:
        count = f"{len(errors)} problem{'s' if len(errors) > 1 else ''}"
        raise SweepError(f"{count} with the sweep's options; no trial was started:\n  " + "\n  ".join(errors))
    folder = Path(output).resolve()
    return Sweep(bundle, Path(dataset_dir).resolve(), folder, tuple(spaces), fixed, folds, trials)


class Progress:
    """Optuna's callback after each trial of this process: logs how it ended, and stops the loop once the study
    has the trials it wants, or after :data:`FAILURES_IN_A_ROW` failures here."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.failures = 0

    @property
    def gave_up(self) -> bool:
        return self.failures >= FAILURES_IN_A_ROW

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        attrs = trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            best = study.best_trial
            logger.info(
                "trial %d: finished, Dice %.4f (best: %.4f, trial %d)",
                trial.number,
                trial.value,
                best.value,
                best.number,
            )
        elif trial.state == TrialState.PRUNED:
            pruned = attrs.get("pruned_at", {})
            logger.info(
                "trial %d: pruned at epoch %s (Dice %s, below the median)",
                trial.number,
                pruned.get("epoch"),
                pruned.get("val_mean_dice"),
            )
        elif "surplus" in attrs:
            logger.info("trial %d: %s", trial.number, attrs["error"])
        else:
            logger.error("trial %d: failed: %s", trial.number, attrs.get("error", "see its log"))
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL and "surplus" not in attrs else 0
        if self.gave_up:
            logger.error("%d trials in a row failed here: stopping (see their logs)", self.failures)
        if self.gave_up or not room_for_trial(study, self.wanted):
            study.stop()


def run_sweep(sweep: Sweep, seed: int = 0, study_name: str = "sweep", storage: str | None = None) -> dict[str, Any]:
    """Run trials of ``sweep`` in the study ``study_name`` of ``storage`` (default: SQLite ``OUTPUT/study.db``)
    until it holds ``sweep.trials`` COMPLETE or PRUNED trials, then write the report; returns it, with
    ``gave_up`` true when this process stopped after failures. Resumes a study started with the same options."""
    sweep.output.mkdir(parents=True, exist_ok=True)
    url = storage_url(sweep.output, storage)
    study = open_study(url, study_name, make_sampler(sweep.spaces, seed), optuna.pruners.MedianPruner())
    options = {
        "bundle": str(sweep.bundle),
        "dataset_dir": str(sweep.dataset_dir),
        "spaces": {space.key: space.text for space in sweep.spaces},
        "set": dict(sweep.fixed),
        "folds": sweep.folds,
        "seed": seed,
    }
    claim(study, options, url)
    logger.info(
        "study %r in %s: %d trials wanted; searching %s; fixed: %s",
        study_name,
        shown_url(url),
        sweep.trials,
        " ".join(space.text for space in sweep.spaces),
        shown(sweep.fixed) or "none",
    )
    wanted = sweep.trials
    grid = grid_size(sweep.spaces)
    if grid is not None and grid < wanted:
        logger.info("--trials %d: the grid has %d settings, so the sweep runs %d trials", wanted, grid, grid)
        wanted = grid

    def objective(trial: optuna.Trial) -> float:
        if surplus(study, trial.number, wanted):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("error", f"not run: the study had its {wanted} trials already")
            raise Surplus(f"trial {trial.number}: the study had {wanted} trials already")
        return run_trial(sweep, trial, shown_url(url))

    progress = Progress(wanted)
    if room_for_trial(study, wanted):
        study.optimize(objective, catch=(TrialFailed, Surplus), callbacks=[progress])
    else:
        logger.info("study %r has its %d trials", study_name, wanted)
    report = write_report(sweep.output, storage, study_name)
    return {**report, "gave_up": progress.gave_up}
