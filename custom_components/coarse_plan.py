"""``resolution: coarse``: the target spacing of nnU-Net's ``3d_lowres``, at which one training patch holds a whole
median volume; the first stage of a cascade whose second stage (``previous_stage``) trains at full resolution.

nnU-Net (``ExperimentPlanner.plan_experiment``) starts from the full-resolution spacing and multiplies it by 1.03 a
step, the axes over twice finer than the coarsest alone while there are any (a thick-slice axis is not made thicker
until the others have caught up), then every axis, until the patch it can afford holds a quarter of the median
volume. The plan (:func:`custom_components.planning.fit_plan`) walks the same spacings, with the network it plans
at each, and takes the first at which the whole median volume, rounded down to the network's divisor, is a training
step within its budgets as :func:`custom_components.step_choice.step_judge` judges it. A judgement measures steps,
seconds each, so :func:`first_fitting` bisects the spacings instead of trying each in turn: a coarser spacing never
has a larger median volume, so the spacings that fit are the coarse end of the list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from custom_components.plan_network import PlanError

SPACING_STEP = 1.03  # nnU-Net's spacing_increase_factor
FINE_RATIO = 2.0  # nnU-Net: the axes more than this much finer than the coarsest are coarsened alone


@dataclass(frozen=True)
class Layout:
    """The plan at one target spacing: the cases' median size resampled to it (the axes the network sees), their
    voxels in all, the network keys planned for it and the patch candidates of the median size, largest first."""

    spacing: np.ndarray
    median: np.ndarray
    voxels: float
    network: dict[str, Any]
    candidates: list[tuple[int, ...]]


def coarser(spacing: np.ndarray) -> np.ndarray:
    """One step of nnU-Net's search: the axes more than ``FINE_RATIO`` times finer than the coarsest times
    ``SPACING_STEP`` while there are any, else every axis."""
    fine = spacing.max() / spacing > FINE_RATIO
    return spacing * np.where(fine | ~fine.any(), SPACING_STEP, 1.0)


def coarse_steps(full: Layout, layout: Callable[[np.ndarray], Layout]) -> list[Layout]:
    """``full`` and the layouts one step coarser each (:func:`coarser`, their spacings rounded as a plan writes
    them), up to the first whose median volume is the smallest patch the network takes (a coarser spacing gains
    nothing) or the last the network can still be planned for (``layout`` raises ``PlanError`` when a volume leaves
    it no pooling)."""
    steps = [full]
    spacing = np.asarray(full.spacing, dtype=float)
    while len(steps[-1].candidates) > 1:
        spacing = coarser(spacing)
        try:
            steps.append(layout(np.round(spacing, 4)))
        except PlanError:
            break
    return steps


def first_fitting(steps: Sequence[Layout], fits: Callable[[Layout], bool]) -> Layout:
    """The first of ``steps`` (finest first; the first known not to fit) that ``fits``, by bisection: a coarser
    step's median volume is no larger, so once one fits the coarser ones do (up to the network's rounding, which can
    move the answer by a step). The last step, whose median volume is the smallest patch, is taken to fit unmeasured:
    when it does not, no step does, and the plan stops on it naming the budgets."""
    low, high = 0, len(steps) - 1
    while high - low > 1:
        middle = (low + high) // 2
        if fits(steps[middle]):
            high = middle
        else:
            low = middle
    return steps[high]


def coverage(patch: Sequence[int], median: Sequence[float]) -> str:
    """How much of the median volume one patch holds, in words for the plan's log."""
    held = int(np.prod(np.minimum(patch, median)))
    whole = int(np.prod(median))
    shape = [round(float(n), 1) for n in median]
    return (
        f"the patch {list(patch)} holds {held} of the {whole} voxels of the median volume {shape} ({held / whole:.0%})"
    )


def coarse_layout(
    full: Layout, layout: Callable[[np.ndarray], Layout], fits: Callable[[Layout], bool], log: Callable[[str], None]
) -> Layout:
    """The layout of the first spacing from ``full``'s on (:func:`coarse_steps`) whose median volume ``fits`` one
    training step; ``full`` itself when its median volume fits already, logged: a coarse stage gains nothing."""
    if fits(full):
        log(
            f"resolution coarse: the median volume is one patch at full resolution ({list(full.candidates[0])} at "
            f"{np.round(full.spacing, 4).tolist()} mm), so a coarse stage gains nothing on this data: spacing kept"
        )
        return full
    log(f"resolution coarse: coarsening the spacing from {np.round(full.spacing, 4).tolist()} mm by x{SPACING_STEP}")
    return first_fitting(coarse_steps(full, layout), fits)
