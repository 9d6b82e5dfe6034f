"""Which patch and batch size a training step can afford: each candidate's step measured against a memory budget
(and, on CPU, a GFLOP budget), the measurements pruned by a line through two of them. The plan
(:mod:`custom_components.planning`) and the coarse stage's spacing search (:mod:`custom_components.coarse_plan`) judge
steps this one way."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from custom_components.plan_network import PlanError
from custom_components.step_measure import gib

MIN_BATCH = 2
PREDICTION_SLACK = 1.25  # candidates predicted above this multiple of the budget are not measured


@dataclass(frozen=True)
class StepChoice:
    """The patch and batch size chosen, and the measured memory of their training step."""

    patch_size: tuple[int, ...]
    batch_size: int
    step_bytes: int


def _line(low: float, high: float | None, x_low: float, x_high: float) -> tuple[float, float]:
    """Intercept and slope (never negative) of the line through two measurements of a step, per patch voxel."""
    slope = 0.0 if high is None or x_high == x_low else max(0.0, (high - low) / (x_high - x_low))
    return low - slope * x_low, slope


def step_judge(
    candidates: Sequence[tuple[int, ...]],
    budget: float,
    measure: Callable[[tuple[int, ...], int], int | None],
    first_batch: int,
    machine_limit: float = math.inf,
    *,
    step_gflop: Callable[[tuple[int, ...], int], float] | None = None,
    gflop_budget: float = math.inf,
    fix: str = "raise --memory-gb",
) -> tuple[Callable[[tuple[int, ...], int], bool], float]:
    """Whether the step of a candidate (largest first) at a batch fits ``budget`` bytes (and ``gflop_budget`` GFLOP,
    counted by ``step_gflop``), and the bytes a patch voxel adds to a step at ``first_batch`` (the line's slope).

    A line through two measured steps (the smallest candidate and one near the geometric middle, neither
    depending on the budget) predicts each candidate's memory and FLOPs, so that only candidates predicted within
    25% of the budgets, and within ``machine_limit``, are measured. Raises ``PlanError`` (naming ``fix``) when the
    smallest candidate does not fit at ``first_batch``.
    """
    smallest = candidates[-1]
    low = measure(smallest, first_batch)
    if low is None or low > budget:
        needed = "more memory than the machine has" if low is None else gib(low)
        raise PlanError(
            f"the smallest patch {list(smallest)} at batch {first_batch} needs {needed}, over the {gib(budget)} "
            f"budget: {fix}, or make the network smaller (e.g. channels [16,32,64,128])"
        )
    counted = step_gflop is not None and math.isfinite(gflop_budget)
    low_f = step_gflop(smallest, first_batch) if counted else 0.0
    if low_f > gflop_budget:
        raise PlanError(
            f"the smallest patch {list(smallest)} at batch {first_batch} takes {low_f:.1f} GFLOP a step, over the "
            f"{gflop_budget:g} GFLOP budget: {fix}, or make the network smaller (e.g. channels [16,32,64,128])"
        )
    voxels = {patch: float(np.prod(patch)) for patch in candidates}
    middle = math.sqrt(voxels[smallest] * voxels[candidates[0]])
    # an upper bound (memory grows at most in proportion to the patch) keeps the second measurement safe
    safe = [p for p in candidates if low * voxels[p] / voxels[smallest] <= machine_limit] or [smallest]
    reference = min(safe, key=lambda patch: abs(math.log(voxels[patch] / middle)))
    high = measure(reference, first_batch) if reference != smallest else None
    fixed, slope = _line(low, high, voxels[smallest], voxels[reference])
    high_f = step_gflop(reference, first_batch) if counted and high is not None else None
    fixed_f, slope_f = _line(low_f, high_f, voxels[smallest], voxels[reference])

    def fits(patch: tuple[int, ...], batch: int) -> bool:
        scale = voxels[patch] * batch / first_batch
        if fixed + slope * scale > min(PREDICTION_SLACK * budget, machine_limit):
            return False
        if fixed_f + slope_f * scale > PREDICTION_SLACK * gflop_budget:
            return False
        size = measure(patch, batch)
        if size is None or size > budget:
            return False
        return not counted or step_gflop(patch, batch) <= gflop_budget

    return fits, slope


def choose_patch_and_batch(
    candidates: Sequence[tuple[int, ...]],
    budget: float,
    measure: Callable[[tuple[int, ...], int], int | None],
    max_batch: int,
    machine_limit: float = math.inf,
    *,
    step_gflop: Callable[[tuple[int, ...], int], float] | None = None,
    gflop_budget: float = math.inf,
    batch_size: int | None = None,
    fix: str = "raise --memory-gb",
) -> StepChoice:
    """The largest patch (candidates run largest first) whose step fits ``budget`` bytes (and ``gflop_budget``
    GFLOP, counted by ``step_gflop``) at batch 2, then the largest batch up to ``max_batch`` that still fits; all
    measured, as :func:`step_judge` judges them (a larger budget never gives a smaller patch). A ``batch_size``
    given is kept: the patch is chosen at it, and no batch is searched.
    """
    first_batch = MIN_BATCH if batch_size is None else batch_size
    fits, slope = step_judge(
        candidates,
        budget,
        measure,
        first_batch,
        machine_limit,
        step_gflop=step_gflop,
        gflop_budget=gflop_budget,
        fix=fix,
    )
    patch = next((p for p in candidates if fits(p, first_batch)), candidates[-1])  # the smallest fits: measured
    fitting, failing = first_batch, (first_batch + 1 if batch_size is not None else max_batch + 1)
    per_volume = slope * float(np.prod(patch)) / first_batch
    guess = first_batch + int((budget - measure(patch, first_batch)) // per_volume) if per_volume > 0 else max_batch
    batch = min(max(guess, first_batch + 1), max_batch)
    while fitting + 1 < failing:
        if fits(patch, batch):
            fitting = batch
        else:
            failing = batch
        batch = (fitting + failing) // 2
    step_bytes = measure(patch, fitting)
    assert step_bytes is not None  # fitting batches were measured
    return StepChoice(patch, fitting, step_bytes)
