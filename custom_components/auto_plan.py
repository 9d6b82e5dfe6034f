"""``plan: auto``: a training run fits the plan to its dataset and device itself, once per dataset.

When training starts, before any case is cached, :func:`custom_components.settings.check_workflow` asks
:func:`auto_plan` for the keys the plan decides (spacing, intensity, class weights, patch and batch size; DynUNet's
strides and kernels) that the user left at the bundle's defaults. The plan is made by the code of ``prepare plan``
(:func:`custom_components.planning.fit_plan`), for the training device: on CUDA a step within ``plan_memory_share``
of the GPU's memory; on CPU within that share of the free RAM and within ``plan_cpu_step_gflop`` GFLOP, because a
CPU has memory to spare and compute is what a larger step costs there (counted, so that the plan does not depend
on how busy the machine is while it plans). A key the user set is kept and the plan fits the
rest around it.

The plan and the fingerprint it rests on are cached as one JSON file in ``plan_cache_dir`` (by default the user's
cache folder, never the dataset folder, which may be read-only), named by a hash of everything the plan depends on:
the dataset's ``dataset.json`` and the names, sizes and modification times of its training files, the bundle's
``train.yaml``, the device and budgets, and the user's keys (``resolution: coarse`` among them: a coarse run never
gets a full-resolution plan, nor the reverse). A second run, every K-fold fold and sweep trial on the same data
then reads the plan instead of making it; processes planning at once (the ranks of a multi-GPU run, parallel folds)
take turns on a lock, so all use one plan. A run resumed in its own folder takes the values its
``configs/train.yaml`` stored and never plans again. The cache file is read as data (JSON), and its values are checked
with every other setting.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from custom_components.config_text import flow
from custom_components.plan_network import CPU_NETWORK_KEYS
from custom_components.planning import PlanError, cpu_network, fit_plan, machine_memory, planned_keys
from custom_components.run_files import atomic_write_json
from custom_components.settings_declarations import BundleConfigs

logger = logging.getLogger(__name__)

PLAN_MODE_KEY = "plan"  # auto or off
PLANNED_ID = "planned"  # the train config's id that holds what the plan chose (the run bundle writes it down)
# the keys a training step's memory and time depend on besides the planned ones: measured with the user's values
# (a cascade's `previous_stage` adds input channels, as many as its `stage_input` says)
STEP_KEYS = (
    "architecture", "channels", "strides", "kernel_sizes", "num_res_units", "norm", "skip_connections", "dropout",
    "deep_supervision", "num_samples", "loss", "optimizer", "amp", "channels_last", "num_folds", "slice_axis",
    "context_slices", "previous_stage", "stage_input",
)  # fmt: skip
# the keys that change what the plan chooses without being planned (`resolution: coarse`, a coarser spacing): passed
# to it with the step's keys, and so part of the cache's identity
CHOICE_KEYS = ("resolution",)
MEMORY_SHARE_KEY = "plan_memory_share"
CPU_STEP_KEY = "plan_cpu_step_gflop"
CACHE_KEY = "plan_cache_dir"
CACHE_FORMAT = 1  # bumped when the cache file's content changes meaning
NOT_PLANNED = ("dataset_dir",)  # planned by `prepare plan` for its file; a training run names its own dataset
CHECKPOINT = Path("models") / "checkpoint_last.pt"  # a run folder holding it is resumed
STORED_SETTINGS = Path("configs") / "train.yaml"


class AutoPlanError(ValueError):
    """The plan cannot be made or read; the message names the key or file and the fix."""


@dataclass
class AutoPlan:
    """The planned values for the keys the user left to the plan, and where they came from (for the log)."""

    values: dict[str, Any]
    source: str


def default_cache_dir() -> Path:
    """The user's cache folder for plans: ``$XDG_CACHE_HOME/unet-bundles/plans`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unet-bundles" / "plans"


def _file_state(path: Path) -> list[Any]:
    """What identifies a file's content cheaply: its size and modification time (None when it cannot be read)."""
    try:
        state = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), state.st_size, state.st_mtime_ns]


def dataset_identity(dataset_dir: Path) -> list[Any]:
    """``dataset.json``'s bytes (as a hash) and the name, size and modification time of every file it lists for
    training: a plan made for one state of the dataset is not used for another."""
    description_file = dataset_dir / "dataset.json"
    text = description_file.read_bytes()
    try:
        training = json.loads(text).get("training", [])
    except (ValueError, AttributeError):
        training = []
    files = []
    for item in training if isinstance(training, list) else []:
        for value in item.values() if isinstance(item, Mapping) else []:
            names = value if isinstance(value, list) else [value]
            files += [_file_state(dataset_dir / name) for name in names if isinstance(name, str)]
    return [str(dataset_dir), hashlib.sha256(text).hexdigest(), files]


def cache_name(identity: Mapping[str, Any]) -> str:
    """The cache file's name: a hash of everything the plan depends on."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32] + ".json"


def _read_cached(path: Path, keys: Sequence[str]) -> dict[str, Any] | None:
    """The cached plan's values among ``keys`` (read as JSON data), or None when the file is missing or unreadable
    (then the plan is made again and the file replaced)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    values = content.get("values") if isinstance(content, dict) else None
    if content.get("format") != CACHE_FORMAT or not isinstance(values, dict):
        return None
    return {key: values[key] for key in keys if key in values}


def stored_values(output_dir: Any, keys: Sequence[str]) -> dict[str, Any] | None:
    """The values of ``keys`` a run folder's ``configs/train.yaml`` stores, when ``output_dir`` is a run folder
    to resume (it holds a checkpoint); None otherwise. Read as data; ``check_resume`` compares every value after."""
    if not isinstance(output_dir, str) or output_dir.startswith(("$", "@", "%")):
        return None
    run = Path(output_dir)
    if not (run / CHECKPOINT).is_file():
        return None
    try:
        stored = yaml.safe_load((run / STORED_SETTINGS).read_text())
    except (OSError, yaml.YAMLError):
        return None  # check_resume names the unreadable file
    if not isinstance(stored, dict):
        return None
    return {key: stored[key] for key in keys if key in stored}


def plan_keys(config_file: Path, values: Mapping[str, Any], device: str) -> tuple[str, ...]:
    """The keys ``plan: auto`` may decide for a run with ``values`` on ``device`` (on CPU the network's too)."""
    keys = [key for key in planned_keys(config_file, values) if key not in NOT_PLANNED]
    if cpu_network(device, {}):
        keys += [key for key in CPU_NETWORK_KEYS if key not in keys]
    return tuple(keys)


def _budgets(values: Mapping[str, Any], device: str) -> tuple[float, float, str]:
    """Bytes and GFLOP a step may take on ``device``, and the fix when even the smallest step does not fit."""
    share = float(values[MEMORY_SHARE_KEY])
    memory = share * machine_memory(device)
    gflop = math.inf if device.startswith("cuda") else float(values[CPU_STEP_KEY])
    fix = (
        f"raise {MEMORY_SHARE_KEY} (now {share})"
        + ("" if device.startswith("cuda") else f" or {CPU_STEP_KEY} (now {gflop:g})")
        + ", set patch_size and batch_size yourself, or plan off"
    )
    return memory, gflop, fix


def planned_values(
    values: Mapping[str, Any], bundle: Path, device: Callable[[], Any], chosen: Collection[str] = ()
) -> dict[str, Any]:
    """With ``plan: auto``, the plan's values for the planned keys still at the bundle's defaults in ``values`` (the
    settings after the plan file and the user's keys) of the bundle folder ``bundle``, training on ``device()``;
    logs which keys came from the plan and which the user set. ``chosen`` keys count as set even at a default value
    (those a plan file gives). Raises ``AutoPlanError`` (or the dataset's ``DatasetError``) with the reason and the
    key to set when no plan can be made."""
    if values.get(PLAN_MODE_KEY) != "auto":
        return {}
    configs = BundleConfigs.read(bundle)
    config_file = configs.folder / "train.yaml"

    def own(key: str) -> bool:
        return key not in chosen and (key not in values or any(values[key] == value for value in configs.own(key)))

    where = str(device())
    keys = plan_keys(config_file, values, where)
    left = [key for key in keys if own(key)]
    fixed = {key: values[key] for key in keys if not own(key)}
    if not left:
        logger.info("%s auto: every planned key is set (%s): nothing to plan", PLAN_MODE_KEY, ", ".join(fixed))
        return {}
    user = {key: values[key] for key in STEP_KEYS + CHOICE_KEYS if not own(key) and key not in fixed}
    plan = auto_plan(values, left, fixed, user, config_file, where)
    logger.info(
        "%s auto: %s from %s%s",
        PLAN_MODE_KEY,
        ", ".join(f"{key} {flow(value)}" for key, value in plan.values.items()),
        plan.source,
        f"; {', '.join(fixed)} set otherwise (kept)" if fixed else "",
    )
    return plan.values


def auto_plan(
    values: Mapping[str, Any],
    left: Sequence[str],
    fixed: Mapping[str, Any],
    user: Mapping[str, Any],
    config_file: Path,
    device: str,
) -> AutoPlan:
    """The plan's values of the keys in ``left`` (those the user left to it) for a run with ``values`` on
    ``device``: the stored ones of a resumed run, else the cached plan, else a plan made now and cached.

    ``fixed``: the planned keys the user set (kept; the plan fits around them); ``user``: the other keys the user
    set, which the step is measured with (a smaller ``channels``, another ``loss``) or the plan made for
    (``resolution``).
    """
    stored = stored_values(values.get("output_dir"), left)
    if stored is not None and set(left) <= set(stored):
        return AutoPlan(stored, f"the run folder {values['output_dir']} (resumed: not planned again)")
    dataset_dir = Path(str(values["dataset_dir"])).resolve()
    cache_dir = Path(values[CACHE_KEY]) if values.get(CACHE_KEY) else default_cache_dir()
    memory, gflop, fix = _budgets(values, device)
    identity = {
        "format": CACHE_FORMAT,
        "dataset": dataset_identity(dataset_dir),
        "bundle": hashlib.sha256(config_file.read_bytes()).hexdigest(),
        "device": device,
        "memory_share": values[MEMORY_SHARE_KEY],  # not the bytes: free RAM drifts from run to run
        "gflop": gflop,
        "fixed": fixed,
        "user": user,
    }
    path = cache_dir / cache_name(identity)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 (held while planning, closed below)
    except OSError as err:
        raise AutoPlanError(
            f"{CACHE_KEY} {cache_dir} cannot hold the plan ({err.strerror or err}): pass --{CACHE_KEY} with a folder "
            f"you can write, or set the planned keys yourself ({', '.join(left)}) with --{PLAN_MODE_KEY} off"
        ) from err
    with lock:  # one process plans, the others wait and then read its plan
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_cached(path, left)
        if cached is not None:
            return AutoPlan(cached, f"the cached plan {path}")
        budgets = (memory, gflop, fix)
        return _plan_and_cache(path, identity, left, dataset_dir, config_file, device, budgets, values, user, fixed)


def _plan_and_cache(
    path: Path,
    identity: Mapping[str, Any],
    left: Sequence[str],
    dataset_dir: Path,
    config_file: Path,
    device: str,
    budgets: tuple[float, float, str],
    values: Mapping[str, Any],
    user: Mapping[str, Any],
    fixed: Mapping[str, Any],
) -> AutoPlan:
    """Fit the plan now within ``budgets`` (bytes, GFLOP, the fix when none fits) and cache it (with its
    fingerprint and every step measured) at ``path``."""
    memory, gflop, fix = budgets
    started = time.perf_counter()
    try:
        fitted = fit_plan(
            dataset_dir, config_file, int(values["spatial_dims"]), device, memory,
            gflop=gflop, user=user, fixed=fixed, fix=fix, log=logger.info,
        )  # fmt: skip
    except PlanError as err:
        raise AutoPlanError(f"{PLAN_MODE_KEY} auto cannot plan for {dataset_dir}: {err}") from err
    took = time.perf_counter() - started
    content = {
        "format": CACHE_FORMAT,
        "values": fitted.values,
        "dataset_dir": str(dataset_dir),
        "device": device,
        "budget": fitted.budget,
        "steps": fitted.steps_text().splitlines(),
        "planning_s": round(took, 1),
        "identity": identity,
        "fingerprint": fitted.fingerprint,
    }
    atomic_write_json(content, path)
    chosen = {key: fitted.values[key] for key in left if key in fitted.values}
    return AutoPlan(chosen, f"a plan made in {took:.1f} s, cached as {path}")
