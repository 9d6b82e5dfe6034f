"""What MONAI's ``--tracking mlflow`` leaves out: the run's settings as MLflow parameters, and Dice per class.

``python -m monai.bundle run ... --tracking mlflow`` appends an ``MLFlowHandler`` to the handlers of the trainer
(``train#handlers``), the validator (``validate#handlers``) and the evaluator (``handlers``). That handler logs two
engine attributes as parameters and every entry of ``engine.state.metrics`` as a metric, which fails on a vector
metric such as ``val_dice_per_class`` (MLflow takes scalars only). :class:`MLflowTracking`, listed among the same
handlers, completes each ``MLFlowHandler`` attached to its engine through the handler's own options: its epoch
logger logs the vector as one metric per class name, and the run gets every key of the config as a parameter.
Without ``--tracking`` there is no ``MLFlowHandler`` and it does nothing; this module imports mlflow only to log.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from custom_components.config_text import flow, plain

PER_CLASS_SUFFIX = "_per_class"  # a vector metric named <name>_per_class is logged as <name>_<class name>

logger = logging.getLogger(__name__)


def attached_mlflow_handlers(engine: Engine) -> list[Any]:
    """The ``MLFlowHandler`` objects attached to ``engine``.

    Ignite has no public list of an engine's handlers: this reads its registry of ``Events.STARTED`` callbacks
    (``Engine._event_handlers``), where ``MLFlowHandler.attach`` registers its bound ``start`` method. Should ignite
    rename it, this stops with a message rather than leaving the parameters unlogged (docs/architecture.md lists
    each such use, and tests/test_tracking.py fails the day it breaks).
    """
    from monai.handlers import MLFlowHandler

    registry = getattr(engine, "_event_handlers", None)
    if not isinstance(registry, Mapping):
        raise RuntimeError(
            "custom_components.tracking: this ignite version keeps no Engine._event_handlers registry, so the "
            "MLFlowHandler of --tracking mlflow cannot be found; use the pytorch-ignite version of constraints.txt"
        )
    callbacks = registry.get(Events.STARTED, ())
    owners = (getattr(callback, "__self__", None) for callback, *_ in callbacks)
    return [owner for owner in owners if isinstance(owner, MLFlowHandler)]


def scalar_metrics(metrics: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, float]:
    """``metrics`` as scalars: a one-value entry as it is, a vector ``<name>_per_class`` with one value per class as
    ``<name>_<class name>`` (``val_dice_per_class`` -> ``val_dice_organ``, ...), any other vector as ``<key>_<index>``.
    """
    scalars = {}
    for key, value in metrics.items():
        values = torch.as_tensor(value, dtype=torch.float64).flatten().tolist()
        if len(values) == 1:
            scalars[key] = values[0]
        elif key.endswith(PER_CLASS_SUFFIX) and len(values) == len(class_names):
            stem = key.removesuffix(PER_CLASS_SUFFIX)
            scalars.update({f"{stem}_{name}": v for name, v in zip(class_names, values, strict=True)})
        else:
            scalars.update({f"{key}_{index}": v for index, v in enumerate(values)})
    return scalars


def param_text(value: Any) -> str:
    """A parameter's value as the run folder's configs write it (YAML flow style); other objects as ``str``."""
    try:
        return flow(plain(value))
    except TypeError:  # e.g. a torch.device
        return str(value)


class MLflowTracking:
    """Complete the ``MLFlowHandler`` that ``--tracking mlflow`` attaches to the same engine (see module docstring).

    When the engine's first epoch starts (its ``MLFlowHandler`` has created or picked the MLflow run at
    ``Events.STARTED``), for each ``MLFlowHandler`` on the engine, once:

    - ``params`` (one mapping, or several merged in order; ``paths`` among them made absolute) are logged as the
      run's parameters, each value in YAML flow style; a key the run already has (a resumed run) keeps its first
      value, as MLflow parameters cannot change, with a warning when the value differs;
    - its epoch logger, unless one was configured, becomes one that logs :func:`scalar_metrics` of the engine's
      metrics (and the handler's ``state_attributes``) at the handler's epoch.
    """

    def __init__(
        self,
        params: Mapping[str, Any] | Sequence[Mapping[str, Any]] = (),
        paths: Sequence[str] = (),
        class_names: Sequence[str] = (),
    ) -> None:
        merged: dict[str, Any] = {}
        for mapping in [params] if isinstance(params, Mapping) else params:
            merged.update(mapping)
        for key in paths:
            if isinstance(merged.get(key), str):
                merged[key] = os.path.abspath(merged[key])
        self.params = {key: param_text(value) for key, value in merged.items()}
        self.class_names = [str(name) for name in class_names]
        self._completed: weakref.WeakSet = weakref.WeakSet()  # MLFlowHandlers already completed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _epoch_started(self, engine: Engine) -> None:
        for handler in attached_mlflow_handlers(engine):
            if handler in self._completed or handler.cur_run is None:
                continue
            self._completed.add(handler)
            self.log_params(handler)
            if handler.epoch_logger is None:
                handler.epoch_logger = lambda engine, handler=handler: self.log_epoch(handler, engine)

    def log_params(self, handler: Any) -> None:
        """``params`` that the handler's run lacks, as its parameters."""
        from mlflow.entities import Param

        run_id = handler.cur_run.info.run_id
        logged = handler.client.get_run(run_id).data.params
        changed = sorted(key for key, value in self.params.items() if key in logged and logged[key] != value)
        if changed:
            logger.warning(f"MLflow run {run_id} keeps its first value of {', '.join(changed)} (parameters are fixed)")
        new = [Param(key, value) for key, value in self.params.items() if key not in logged]
        if new:
            handler.client.log_batch(run_id=run_id, params=new)

    def log_epoch(self, handler: Any, engine: Engine) -> None:
        """The epoch logger: the engine's metrics as scalars, at the handler's (global) epoch."""
        from mlflow.entities import Metric

        values = scalar_metrics(engine.state.metrics, self.class_names)
        if handler.state_attributes:
            attributes = {name: getattr(engine.state, name, None) for name in handler.state_attributes}
            values.update(scalar_metrics({k: v for k, v in attributes.items() if v is not None}, ()))
        if not values or handler.cur_run is None:
            return
        step, timestamp = handler.global_epoch_transform(engine.state.epoch), int(time.time() * 1000)
        metrics = [Metric(key, value, timestamp, step) for key, value in values.items()]
        handler.client.log_batch(run_id=handler.cur_run.info.run_id, metrics=metrics)
