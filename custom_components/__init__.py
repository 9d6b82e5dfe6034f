"""Components the MONAI bundles need and MONAI lacks: dataset checks, reports, the run folder as a bundle,
inference that skips unreadable inputs, flip TTA, surface metrics in mm, intensity schemes, small-batch
normalisation and the U-Net with or without skip connections."""

from custom_components import (
    bundle,
    data,
    evaluation,
    handlers,
    inference,
    metrics,
    networks,
    norms,
    run_bundle,
    runlock,
    transforms,
)

__all__ = [
    "bundle",
    "data",
    "evaluation",
    "handlers",
    "inference",
    "metrics",
    "networks",
    "norms",
    "run_bundle",
    "runlock",
    "settings",
    "transforms",
]


def __getattr__(name: str) -> object:
    """``custom_components.settings`` (the configs call ``custom_components.settings.check_workflow``) imported on
    first use, so that ``python -m custom_components.settings`` does not find it imported already."""
    if name == "settings":
        import importlib

        return importlib.import_module("custom_components.settings")
    raise AttributeError(f"module 'custom_components' has no attribute {name!r}")
