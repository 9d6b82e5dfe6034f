"""The Optuna study of a sweep: its storage, the options it was started with, its sampler, and how many trials
it still wants (shared by every process working on it, on one machine or many)."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import sqlalchemy.orm
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, GridSampler, TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb.models import TrialModel
from optuna.trial import FrozenTrial, TrialState

from custom_components.bundle import changed_options
from custom_components.sweep.layout import STUDY_FILE
from custom_components.sweep.space import Space, SweepError

logger = logging.getLogger(__name__)

OPTIONS_ATTR = "options"  # study user attr: what the sweep was started with (data; compared, never run)
# A running trial's process writes a heartbeat this often; one silent for GRACE_S died with its machine or was killed:
# it is marked FAIL and queued once more with the same settings (a new trial number, so a new folder).
HEARTBEAT_S = 5
GRACE_S = 15
# A process killed between creating its trial and the first heartbeat leaves a RUNNING trial with no heartbeat, which
# Optuna never counts stale: it is failed (and queued once more) once a process has seen it so for UNBEATEN_S.
UNBEATEN_S = 2 * GRACE_S
WAIT_S = 2.0  # how often a process with nothing to start looks again at the trials others are running
SQLITE_TIMEOUT_S = 60  # how long a SQLite write waits for another process's
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --trials counts
# the options that define a study, as the message of a refused restart names them
IDENTITY = {
    "bundle": "--bundle",
    "dataset_dir": "--dataset_dir",
    "spaces": "--space",
    "set": "--set/--time_budget_min",
    "folds": "--folds",
    "seed": "--seed",
}


def storage_url(output: Path, storage: str | None) -> str:
    """``--storage``, or the SQLite file ``OUTPUT/study.db``."""
    return storage or f"sqlite:///{(output / STUDY_FILE).resolve()}"


def shown_url(url: str) -> str:
    """The storage URL without its password, for messages and reports."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


class SweepStorage(RDBStorage):
    """Optuna's RDB storage whose stale trials also include RUNNING trials that never wrote a heartbeat for
    :data:`UNBEATEN_S` of this process's watch (its own clock: the machines' clocks may differ)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unbeaten_since: dict[int, float] = {}  # trial id -> when this process first saw it without a heartbeat

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        with sqlalchemy.orm.Session(self.engine) as session:
            unbeaten = session.scalars(
                sqlalchemy.select(TrialModel.trial_id).where(
                    TrialModel.study_id == study_id,
                    TrialModel.state == TrialState.RUNNING,
                    ~TrialModel.heartbeats.any(),
                )
            ).all()
        now = time.monotonic()
        self._unbeaten_since = {trial: self._unbeaten_since.get(trial, now) for trial in unbeaten}
        silent = [trial for trial, since in self._unbeaten_since.items() if now - since >= UNBEATEN_S]
        return super()._get_stale_trial_ids(study_id) + silent


def open_storage(url: str, attempts: int = 3) -> RDBStorage:
    """The storage with Optuna's heartbeat on; retried, as processes starting together race to create its tables."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return SweepStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as err:
            if attempt == attempts:
                raise SweepError(f"--storage {shown_url(url)} cannot be used: {str(err).splitlines()[0]}") from None
            time.sleep(0.5 * attempt)
        except (sqlalchemy.exc.ArgumentError, ImportError) as err:
            raise SweepError(
                f"--storage cannot be used ({err}): give a database URL such as sqlite:///study.db or "
                "postgresql://user@host/db, with its driver installed (psycopg2 for PostgreSQL)"
            ) from None


def open_study(
    url: str, name: str, sampler: BaseSampler | None = None, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.Study:
    """The study ``name`` in ``url``, created if new (several processes may do so at once)."""
    return optuna.create_study(
        storage=open_storage(url),
        study_name=name,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def load_study(url: str, name: str) -> optuna.Study:
    """An existing study, or a message naming what to pass."""
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise SweepError(
            f"no study {name!r} in {shown_url(url)}: pass the --study and --storage of `sweep run`"
        ) from None


def _option(key: str, value: Any) -> str:
    if isinstance(value, Mapping) and key == "spaces":
        return " ".join(value.values()) or "(none)"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in value.items()) or "(none)"
    return "not given" if value is None else str(value)


def claim(study: optuna.Study, options: Mapping[str, Any], url: str) -> None:
    """Record the sweep's options in a new study; a study started with other options is refused, naming them."""
    options = json.loads(json.dumps(options))  # as the storage holds them
    previous = study.user_attrs.get(OPTIONS_ATTR)
    if previous is None:
        study.set_user_attr(OPTIONS_ATTR, options)
        return
    changed = changed_options(previous, options, IDENTITY, _option, lambda key: f"{IDENTITY[key]} ")
    if changed:
        raise SweepError(
            f"study {study.study_name!r} in {shown_url(url)} was started with other options: {'; '.join(changed)}. "
            "Pass the same options to resume it, or a new --study (or --output) for a new sweep"
        )


class PerTrialSeed(BaseSampler):
    """A sampler made afresh for each trial with seed ``seed + trial number``: processes sharing a study draw
    different settings (one seed each would repeat the same random start-up trials), and trial N always draws from
    the same seed."""

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._sampler = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler = self._make(self._seed + trial.number)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._sampler.after_trial(study, trial, state, values)


def grid_size(spaces: Sequence[Space]) -> int | None:
    """The number of settings of a grid (every space a choice), else None."""
    if not all(space.kind == "choice" for space in spaces):
        return None
    return math.prod(len(space.choices) for space in spaces)


def make_sampler(spaces: Sequence[Space], seed: int) -> BaseSampler:
    """A grid over the choices when every space is a choice, else TPE (seeded per trial)."""
    if grid_size(spaces) is not None:
        return GridSampler({space.key: space.options for space in spaces}, seed=seed)
    return PerTrialSeed(lambda trial_seed: TPESampler(seed=trial_seed), seed)


def fail_stale(study: optuna.Study) -> None:
    """Optuna's heartbeat check: trials whose process stopped beating are marked FAIL (and queued once more)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def room_for_trial(study: optuna.Study, wanted: int) -> bool:
    """Whether this process should start a trial: True while finished and running trials are fewer than
    ``wanted``; False once ``wanted`` trials are COMPLETE or PRUNED. In between (the rest is running elsewhere) it
    waits, as one of those may fail or its machine die, and then this process runs a trial in its place."""
    waiting = False
    while True:
        fail_stale(study)
        states = Counter(trial.state for trial in study.get_trials(deepcopy=False))
        finished = sum(states[state] for state in COUNTED)
        if finished >= wanted:
            return False
        if finished + states[TrialState.RUNNING] < wanted:
            return True
        if not waiting:
            logger.info(
                "%d of %d trials finished, the other %d running elsewhere: waiting for them",
                finished,
                wanted,
                states[TrialState.RUNNING],
            )
            waiting = True
        time.sleep(WAIT_S)


def surplus(study: optuna.Study, number: int, wanted: int) -> bool:
    """Whether trial ``number`` is one too many: processes that looked at the study at the same moment both
    started a trial, and the trials numbered before it already make ``wanted``."""
    states = (*COUNTED, TrialState.RUNNING)
    return sum(trial.number < number for trial in study.get_trials(deepcopy=False, states=states)) >= wanted
