"""A training plan from a dataset fingerprint, written as a config override file the bundles read.

Target spacing and intensity scheme follow nnU-Net's rules, and so do DynUNet's strides and kernels per axis
(``architecture: dynunet``) and the spacing of ``resolution: coarse`` (its ``3d_lowres``,
:mod:`custom_components.coarse_plan`); class weights come from the voxel share of each class.
Patch and batch size are chosen so that one training step (forward, loss, backward, optimiser step) of the
bundle's own network fits a memory budget (and, on CPU, a time budget): each candidate is measured, never only
estimated (:mod:`custom_components.step_measure`). ``prepare plan`` writes a plan file; a training run with ``plan:
auto`` fits one itself (:mod:`custom_components.auto_plan`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from monai.bundle import ConfigParser

from custom_components.coarse_plan import Layout, coarse_layout, coverage
from custom_components.data import check_datalist, first_image_dims, load_dataset_json
from custom_components.fingerprint import compute_fingerprint
from custom_components.paths import REPO_ROOT
from custom_components.plan_network import PlanError, cpu_unet, divisibility, dynunet_plan
from custom_components.run_files import atomic_write_bytes, atomic_write_json
from custom_components.step_choice import MIN_BATCH, StepChoice, choose_patch_and_batch, step_judge
from custom_components.step_measure import GIB, MeasureError, StepMemory, bundle_parser, gib

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: an axis is low-resolution when 3x coarser in spacing and 3x fewer voxels
ANISOTROPIC_PERCENTILE = 10  # nnU-Net: target spacing of that axis, so thin-slice cases keep their resolution
BATCH_DATASET_FRACTION = 0.05  # nnU-Net: one step sees at most 5% of the dataset's voxels
PATCH_SHRINK = 0.75  # each candidate cuts one axis of the previous one by a quarter
MACHINE_FRACTION = 0.8  # never run a candidate predicted above this share of the device's (free) memory
PLANNED_KEYS = (
    "dataset_dir", "spacing", "intensity", "class_weights", "patch_size", "batch_size", "iterations_per_epoch",
)  # fmt: skip
# An epoch of a small dataset lasts at least this many seconds of steps (at most nnU-Net's 250 iterations, and never
# less than one pass over the training cases): validation and the work at each epoch's end then stay a small share
# of the time, where a pass over a few cases would take a second
EPOCH_STEP_S = 5.0
# On CPU the step's seconds are its counted FLOPs at this rate (what a training step of the CPU network reaches on 2
# server cores; benchmarks/RESULTS.md), never a timing: a busy machine would plan shorter epochs, and the one
# command would train another plan than `prepare plan` made for the same data
CPU_STEP_GFLOP_PER_S = 150.0
MAX_ITERATIONS_PER_EPOCH = 250
ITERATIONS_ROUNDING = 10
DYNUNET_PLANNED_KEYS = ("strides", "kernel_sizes")  # the plan decides them too for architecture dynunet


def bundle_config(dim: int) -> Path:
    """The train.yaml of the 2D or 3D bundle, whose network, loss and optimiser the plan measures."""
    path = REPO_ROOT / f"bundles/unet{dim}d/configs/train.yaml"
    if not path.is_file():
        raise PlanError(f"{path} does not exist: plan with --dim 3, or add the {dim}D bundle first")
    return path


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing per axis, except for an anisotropic dataset (nnU-Net's rule).

    When the coarsest axis is over 3x coarser than the others and has over 3x fewer voxels, its target is the
    10th percentile of its spacings (but not finer than the other axes): resampling every case to the median
    slice thickness would throw away the resolution of the cases with thinner slices.
    """
    target = np.median(spacings, axis=0)
    sizes = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(len(target)) if axis != worst]
    if not others:
        return target
    if (
        target[worst] > ANISOTROPY_THRESHOLD * target[others].max()
        and sizes[worst] * ANISOTROPY_THRESHOLD < sizes[others].min()
    ):
        thin = float(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE))
        target[worst] = max(thin, float(target[others].max()))
    return target


def intensity_plan(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The ``intensity`` key: CT (one channel) is clipped to the foreground 0.5-99.5 percentiles and z-scored with
    the foreground mean and std (HU keep one meaning across cases); MR and any other modality get a per-image
    z-score, because their intensities have no absolute scale."""
    channels = fingerprint["intensity"]
    if len(channels) == 1 and str(channels["0"]["modality"]).upper() == "CT":
        stats = channels["0"]
        return {
            "scheme": "ct_zscore",
            "window": [round(stats["percentile_00_5"], 2), round(stats["percentile_99_5"], 2)],
            "mean": round(stats["mean"], 4),
            "std": round(stats["std"], 4),
        }
    return {"scheme": "zscore", "window": None, "mean": None, "std": None}


def class_weights(fractions: Sequence[float]) -> list[float]:
    """Loss weight per class, background first: the inverse square root of its voxel share, scaled to mean 1.

    Rare classes weigh more, without plain inverse frequency's extremes (a class of 0.1% of the voxels would weigh
    1000x the background). A class present in no case gets the largest weight of the others.
    """
    share = np.asarray(fractions, dtype=float)
    weights = np.zeros_like(share)
    present = share > 0
    weights[present] = 1.0 / np.sqrt(share[present])
    weights[~present] = weights.max()
    return [round(float(w), 4) for w in weights / weights.mean()]


def patch_candidates(
    median_size: Sequence[float], divisor: Sequence[int], largest_size: Sequence[float] | None = None
) -> list[tuple[int, ...]]:
    """Patch sizes from the median image size down to two divisors per axis, largest first.

    Every size is a multiple of the divisor, and at least twice it, so the lowest resolution of the network keeps
    two voxels per axis (instance norm needs more than one), but never over ``largest_size`` (the largest case)
    rounded up to the divisor: an axis the network divides by more than the data holds is padded by less than
    one divisor. The first is the median size rounded down; each next one cuts by a quarter the axis that is
    largest relative to the median (nnU-Net's order), so the patch keeps the shape of a typical image.
    """
    median = np.asarray(median_size, dtype=float)
    step = np.asarray(divisor, dtype=int)
    largest = median if largest_size is None else np.asarray(largest_size, dtype=float)
    ceiling = np.maximum(step, np.ceil(largest / step).astype(int) * step)
    smallest = np.minimum(2 * step, ceiling)
    patch = np.minimum(ceiling, np.maximum(smallest, (median // step).astype(int) * step))
    candidates = [tuple(int(n) for n in patch)]
    while np.any(patch > smallest):
        reducible = np.flatnonzero(patch > smallest)
        axis = reducible[np.argmax(patch[reducible] / median[reducible])]
        shrunk = int(patch[axis] * PATCH_SHRINK) // step[axis] * step[axis]
        patch[axis] = min(patch[axis] - step[axis], max(smallest[axis], shrunk))
        candidates.append(tuple(int(n) for n in patch))
    return candidates


def epoch_length(step_s: float, train_cases: int, batch_size: int) -> int:
    """Iterations per epoch: ``EPOCH_STEP_S`` seconds of steps of ``step_s``, rounded, at most
    ``MAX_ITERATIONS_PER_EPOCH``, and at least one pass over ``train_cases`` in batches of ``batch_size``."""
    one_pass = math.ceil(train_cases / batch_size)
    timed = round(EPOCH_STEP_S / max(step_s, 1e-6) / ITERATIONS_ROUNDING) * ITERATIONS_ROUNDING
    return max(one_pass, min(MAX_ITERATIONS_PER_EPOCH, timed))


def machine_memory(device: str) -> float:
    """The memory a device offers a training step: the GPU's total, or the RAM free now on CPU."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return float(psutil.virtual_memory().available)


def cpu_network(device: str, named: Mapping[str, Any]) -> bool:
    """Whether the plan chooses the network (:func:`cpu_unet`): on CPU, for a ``unet`` whose channels and strides
    nobody named."""
    unnamed = not {"channels", "strides"} & set(named)
    return not device.startswith("cuda") and unnamed and named.get("architecture", "unet") == "unet"


def planned_keys(config_file: str | Path, overrides: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys a plan decides (refused in ``--set``): DynUNet's strides and kernels too when the plan's
    architecture, the bundle's with ``overrides`` on top, is dynunet."""
    architecture = overrides.get("architecture", ConfigParser.load_config_file(str(config_file)).get("architecture"))
    return PLANNED_KEYS + (DYNUNET_PLANNED_KEYS if architecture == "dynunet" else ())


@dataclass
class FittedPlan:
    """A plan fitted to a dataset and a device: the values of the keys it decided, the fingerprint they rest on,
    the step chosen and every step measured (memory, FLOPs, seconds)."""

    values: dict[str, Any]
    fingerprint: dict[str, Any]
    choice: StepChoice
    measure: StepMemory
    budget: str  # the budget the step was fitted to, in words

    def steps_text(self) -> str:
        """Every step measured, one a line: patch, batch, memory, FLOPs and seconds."""
        lines = []
        for (patch, batch), size in sorted(self.measure.measured.items(), key=lambda i: (-np.prod(i[0][0]), i[0][1])):
            key = patch, batch
            cost = f"{gib(size)}, {self.measure.flops[key] / 1e9:.1f} GFLOP, {self.measure.seconds[key]:.2f} s"
            cost = "out of memory" if size is None else cost
            lines.append(f"patch {list(patch)} batch {batch}: {cost}")
        return "\n".join(lines)


def fit_plan(
    dataset_dir: str | Path,
    config_file: str | Path,
    dim: int,
    device: str,
    memory: float,
    *,
    gflop: float = math.inf,
    user: Mapping[str, Any] | None = None,
    fixed: Mapping[str, Any] | None = None,
    fix: str = "raise --memory-gb",
    log: Callable[[str], None] = print,
) -> FittedPlan:
    """Check the dataset at ``dataset_dir``, fingerprint it and fit the planned keys to it and to ``device``: a
    training step of ``config_file``'s network within ``memory`` bytes (and ``gflop`` GFLOP). Nothing is written.

    ``user`` are bundle keys (e.g. a smaller ``channels``) applied when measuring, so the patch and batch size hold
    for the network they name. ``fixed`` are planned keys already decided (a user's ``patch_size``): kept, and the
    rest fitted around them. For ``architecture`` dynunet the plan also decides the network's strides, kernel sizes
    and channels (``dynunet_plan``). The patch never exceeds the largest case by a divisor of the network or more
    along any axis. ``fix`` tells how to raise the budget when even the smallest step does not fit. With the bundle
    key ``resolution: coarse`` the spacing is the first one coarser than full resolution at which the median volume
    is one step within the budgets (:mod:`custom_components.coarse_plan`), unless ``spacing`` is fixed.
    """
    root = Path(dataset_dir).resolve()
    user, fixed = dict(user or {}), dict(fixed or {})
    description = load_dataset_json(root)
    image_dims = first_image_dims(description, root)
    if dim == 3 and image_dims == 2:
        raise PlanError(f"{root} holds 2D images: plan for the 2D bundle (bundles/unet2d)")
    num_classes = len(description["labels"])
    datalist = check_datalist(description, root, num_classes, image_dims)
    log(f"fingerprinting {len(datalist)} cases")
    fingerprint = {"dataset_dir": str(root), **compute_fingerprint(description, datalist, image_dims)}

    weights = class_weights([fingerprint["classes"][str(c)]["fraction"] for c in range(num_classes)])
    planned: dict[str, Any] = {"class_weights": weights, "intensity": intensity_plan(fingerprint)}
    known = {"num_classes": num_classes, "in_channels": len(description["modality"])}
    parser = bundle_parser(config_file, {**user, **known, **planned, **fixed})
    architecture, num_samples = parser.get_parsed_content("architecture"), parser.get_parsed_content("num_samples")
    resolution = parser.get_parsed_content("resolution", default="full")  # the 3D bundle's alone
    num_folds = parser.get_parsed_content("num_folds")
    slice_axis = parser.get_parsed_content("slice_axis") if dim == 2 and image_dims == 3 else None

    shapes = np.asarray([case["shape"] for case in fingerprint["cases"]], dtype=float)
    spacings = np.asarray([case["spacing"] for case in fingerprint["cases"]], dtype=float)
    if "spacing" in fixed:
        target = np.asarray(fixed["spacing"], dtype=float)
    else:
        target = target_spacing(spacings, shapes)
        if slice_axis is not None:
            target[slice_axis] = -1.0  # the 2D bundle keeps the native spacing across the slices
    axes = [axis for axis in range(image_dims) if axis != slice_axis]
    plans_dynunet = architecture == "dynunet" and not set(DYNUNET_PLANNED_KEYS) & set(fixed)
    plans_cpu_unet = not plans_dynunet and cpu_network(device, {**user, **fixed})

    def layout(spacing: np.ndarray) -> Layout:
        resampled = shapes * spacings / np.where(spacing > 0, spacing, spacings)
        median, largest = np.median(resampled, axis=0)[axes], resampled.max(axis=0)[axes]
        network: dict[str, Any] = {}
        if plans_dynunet:  # its topology from spacing and median size
            channels = parser.get_parsed_content("channels")
            network = {"architecture": architecture, **dynunet_plan(spacing[axes], median, channels)}
        elif plans_cpu_unet:
            network = cpu_unet(spacing[axes], median)
        divisor = divisibility(network.get("strides", parser.get_parsed_content("strides")), dim)
        candidates = patch_candidates(median, divisor, largest)
        return Layout(spacing, median, float(resampled.prod(axis=1).sum()), network, candidates)

    measures: dict[str, StepMemory] = {}
    base = {**user, **known, **planned}

    def measure_of(network: dict[str, Any]) -> StepMemory:
        """The steps of ``network``, each measured once (a step does not depend on the spacing)."""
        key = json.dumps(network, sort_keys=True)
        if key not in measures:
            measures[key] = StepMemory(Path(config_file), {**base, **network, **fixed}, device, log)
        return measures[key]

    machine_limit = MACHINE_FRACTION * machine_memory(device)
    words = gib(memory) + (f" and {gflop:g} GFLOP" if math.isfinite(gflop) else "")
    log(f"measuring training steps on {device} against {words} a step (network of {config_file})")
    if memory > machine_limit:
        share = f"{MACHINE_FRACTION:.0%} of the device's memory"
        log(f"  the budget is over {share}: steps predicted over {gib(machine_limit)} are not run")
    train_cases = len(datalist) - len(datalist) // max(num_folds, 1)

    def fit(at: Layout) -> StepChoice:
        """The largest patch at ``at`` whose step fits the budgets, then the largest batch."""
        candidates = [tuple(int(n) for n in fixed["patch_size"])] if "patch_size" in fixed else at.candidates
        affordable = BATCH_DATASET_FRACTION * at.voxels / (float(np.prod(candidates[0])) * num_samples)
        measure = measure_of(at.network)
        return choose_patch_and_batch(
            candidates, memory, measure, max(MIN_BATCH, min(train_cases, int(affordable))), machine_limit,
            step_gflop=measure.step_gflop, gflop_budget=gflop, batch_size=fixed.get("batch_size"), fix=fix,
        )  # fmt: skip

    def one_patch(at: Layout) -> bool:
        """Whether the step of the median volume at ``at`` fits the budgets as :func:`choose_patch_and_batch` judges
        it, at the first batch it tries (with a user's patch_size: whether the median volume is no larger)."""
        if "patch_size" in fixed:
            return all(n <= p for n, p in zip(at.candidates[0], fixed["patch_size"], strict=True))
        measure, batch = measure_of(at.network), int(fixed.get("batch_size", MIN_BATCH))
        fits, _ = step_judge(
            at.candidates,
            memory,
            measure,
            batch,
            machine_limit,
            step_gflop=measure.step_gflop,
            gflop_budget=gflop,
            fix=fix,
        )
        return fits(at.candidates[0], batch)

    full = chosen = layout(target)
    try:
        if resolution == "coarse" and "spacing" in fixed:
            log(f"resolution coarse had no effect on spacing: spacing {fixed['spacing']} is set (kept)")
        elif resolution == "coarse":
            chosen = coarse_layout(full, layout, one_patch, log)
        planned["spacing"] = [round(float(s), 4) for s in chosen.spacing]
        planned.update(chosen.network)
        choice = fit(chosen)
    except MeasureError as err:
        raise PlanError(str(err)) from err
    measure = measure_of(chosen.network)
    if chosen is not full:
        log(f"resolution coarse: spacing {planned['spacing']} mm: {coverage(choice.patch_size, chosen.median)}")
    planned.update(patch_size=list(choice.patch_size), batch_size=choice.batch_size)
    if "iterations_per_epoch" not in fixed:
        step_s = (
            measure.step_gflop(choice.patch_size, choice.batch_size) / CPU_STEP_GFLOP_PER_S
            if math.isfinite(gflop)
            else measure.step_seconds(choice.patch_size, choice.batch_size)
        )
        planned["iterations_per_epoch"] = epoch_length(step_s, train_cases, choice.batch_size)
    values = {key: value for key, value in planned.items() if key not in fixed}
    return FittedPlan(values, fingerprint, choice, measure, words)


def make_plan(
    dataset_dir: str | Path,
    memory_gb: float = 8.0,
    dim: int = 3,
    device: str = "cpu",
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    gflop: float | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``prepare plan``: fit a plan (:func:`fit_plan`) to the bundle ``bundles/unet{dim}d`` and a step of
    ``memory_gb`` (on CPU also of ``gflop``, by default the bundle's ``plan_cpu_step_gflop``: the plan a training
    run would make), write ``fingerprint.json`` and ``plan_{dim}d.yaml`` into the dataset; return the plan's path
    and keys. ``overrides`` are measured with and written into the plan (the plan decides every planned key;
    ``resolution: coarse`` makes it choose a coarse spacing)."""
    root = Path(dataset_dir).resolve()
    config_file = bundle_config(dim)
    user = dict(overrides or {})
    planned = sorted(set(user) & set(planned_keys(config_file, user)))
    if planned:
        raise PlanError(f"--set {', '.join(planned)}: the plan decides these; change them in the plan file instead")
    if device.startswith("cuda"):
        budget = math.inf
    else:
        budget = gflop or float(ConfigParser.load_config_file(str(config_file))["plan_cpu_step_gflop"])
    fitted = fit_plan(root, config_file, dim, device, memory_gb * GIB, gflop=budget, user=user, log=log)
    atomic_write_json(fitted.fingerprint, root / "fingerprint.json")
    network = {key: value for key, value in fitted.values.items() if key not in PLANNED_KEYS}
    plan = {"dataset_dir": str(root), **{k: fitted.values[k] for k in PLANNED_KEYS if k in fitted.values}, **user}
    plan.update(network)
    path = root / f"plan_{dim}d.yaml"
    atomic_write_bytes(path, _plan_text(plan, path, dim, device, fitted).encode())
    log(f"wrote {root / 'fingerprint.json'} and {path}")
    return path, plan


def _plan_text(plan: dict[str, Any], path: Path, dim: int, device: str, fitted: FittedPlan) -> str:
    """The plan as YAML, headed by how to use it and the measurements it rests on."""
    choice = fitted.choice
    steps = "\n".join(f"#   {line}" for line in fitted.steps_text().splitlines())
    header = (
        f"# Training plan written by `python -m custom_components.prepare plan` (see docs/prepare.md), read as data:\n"
        f"# its values replace the bundle's defaults, keys set on the command line win:\n"
        f"#   python -m monai.bundle run training --config_file bundles/unet{dim}d/configs/train.yaml "
        f"--plan_file {path}\n"
        f"# A training step at patch {list(choice.patch_size)} and batch {choice.batch_size} took "
        f"{gib(choice.step_bytes)} of the {fitted.budget} budget on {device}. Steps measured:\n{steps}\n"
    )
    return header + yaml.safe_dump(plan, sort_keys=False, default_flow_style=None)
