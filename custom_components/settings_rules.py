"""The settings check's rules across keys, each a list of :class:`Problem` (key, value, what is wrong, the fix):
the network keys one ``architecture`` builds alone, ``resolution: coarse`` without a plan to choose its spacing, and a
cascade's ``previous_stage`` that cannot serve as its first stage or a ``stage_input`` set without one.
custom_components.settings runs them with the checks of each key."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from custom_components.bundle import expression_ids
from custom_components.norms import resolve_norm
from custom_components.settings_declarations import BundleConfigs
from custom_components.settings_types import show

# keys one `architecture` builds alone: that architecture, and the value that leaves the key out of the other one
ARCHITECTURE_ONLY = {
    "skip_connections": ("unet", True),
    "kernel_sizes": ("dynunet", None),
    "deep_supervision": ("dynunet", False),
}
DYNUNET_MIN_LEVELS = 3  # MONAI's DynUNet builds at least three resolution levels


@dataclass(frozen=True)
class Problem:
    """One setting that cannot be used: the key, the value given, what is wrong and how to fix it."""

    key: str
    value: Any
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key} = {show(self.value)}: {self.problem}; {self.fix}"


def architecture_problems(resolved: Mapping[str, Any], applies: Callable[..., bool]) -> list[Problem]:
    """The network keys that do not fit the ``architecture``: a key of the other architecture set, or what MONAI's
    DynUNet cannot build (fewer than three levels, weight-standardised convolutions, even kernels)."""
    architecture = resolved.get("architecture")
    if architecture is None:
        return []
    problems = []
    for key, (owner, neutral) in ARCHITECTURE_ONLY.items():
        if architecture != owner and resolved.get(key, neutral) != neutral and applies(key, "architecture"):
            problems.append(
                Problem(
                    key,
                    resolved[key],
                    f"is built by architecture {owner} only, and the architecture is {architecture}",
                    f"set {key} to {show(neutral)}, or architecture to {owner}",
                )
            )
    if architecture != "dynunet":
        return problems
    channels, norm, kernels = resolved.get("channels"), resolved.get("norm"), resolved.get("kernel_sizes")
    if isinstance(channels, list) and len(channels) < DYNUNET_MIN_LEVELS and applies("channels", "architecture"):
        fix = f"give at least {DYNUNET_MIN_LEVELS} channels (and strides one fewer), or architecture unet"
        problems.append(Problem("channels", channels, "has fewer levels than dynunet builds", fix))
    if isinstance(norm, str) and resolve_norm(norm)[1] and applies("norm", "architecture"):
        fix = "give group_auto (the same GroupNorm without it), or architecture unet"
        problems.append(Problem("norm", norm, "weight-standardised convolutions are built for unet only", fix))
    if isinstance(kernels, list) and applies("kernel_sizes", "architecture"):
        even = [i for i, k in enumerate(kernels) if any(n % 2 == 0 for n in (k if isinstance(k, list) else [k]))]
        if even:
            where = f"entry {even[0]} is" if len(even) == 1 else f"entries {', '.join(map(str, even))} are"
            fix = "give odd kernels (3, or 1 along a coarse axis)"
            problems.append(Problem("kernel_sizes", kernels, f"{where} even: the sizes would shift", fix))
    return problems


def resolution_problems(
    resolved: Mapping[str, Any], configs: BundleConfigs, excluded: Collection[str]
) -> list[Problem]:
    """``resolution: coarse`` with ``plan: off``: the coarse spacing is the plan's to choose, so nothing would choose
    it and the run would train the bundle's spacing and patch, unless ``spacing`` and ``patch_size`` are both set (by
    hand, or ``excluded``: decided by the plan ``prepare plan`` writes). The two as the bundle's own configs write
    them are kept: a run folder of a coarse run writes its planned values down with plan off."""

    def own(key: str) -> bool:
        return key in resolved and any(resolved[key] == value for value in configs.own(key))

    if resolved.get("resolution") != "coarse" or resolved.get("plan") != "off" or (own("resolution") and own("plan")):
        return []
    if not any(own(key) and key not in excluded for key in ("spacing", "patch_size")):
        return []
    fix = "set plan: auto, or set spacing and patch_size yourself"
    return [Problem("resolution", "coarse", "the plan chooses the coarse spacing, and plan is off", fix)]


def stage_input_problems(
    resolved: Mapping[str, Any], configs: BundleConfigs, applies: Callable[..., bool]
) -> list[Problem]:
    """A ``stage_input`` other than the bundle's own with ``previous_stage`` null: it would change nothing, there
    being no first stage. The bundle's own value in a one-stage run is inert, and a run folder's expression naming
    its copy of stage 1 is not resolved here (so not null)."""
    value = resolved.get("stage_input")
    if value is None or "previous_stage" not in resolved or resolved["previous_stage"] is not None:
        return []
    if not applies("stage_input") or any(value == own for own in configs.own("stage_input")):
        return []
    fix = "set previous_stage to a first stage's `kfold run` folder, or leave stage_input out"
    return [
        Problem(
            "stage_input", value, "says how a cascade's second stage sees its first, and previous_stage is null", fix
        )
    ]


def stage_problems(values: Mapping[str, Any], config: str) -> list[Problem]:
    """A training's ``previous_stage`` that cannot be a cascade's first stage (custom_components.cascade), found with
    the other problems, before the plan or any case is read."""
    stage = values.get("previous_stage")
    if config != "train" or not isinstance(stage, str) or expression_ids(stage, "previous_stage"):
        return []
    from custom_components.cascade import stage_problem

    problem = stage_problem(stage)
    return [] if problem is None else [Problem("previous_stage", stage, *problem)]
