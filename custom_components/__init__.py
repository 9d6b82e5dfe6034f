"""Components the MONAI bundles need and MONAI lacks: dataset checks, reports, the run folder as a bundle,
inference that skips unreadable inputs, flip TTA, surface metrics in mm, intensity schemes, small-batch
normalisation and the U-Net with or without skip connections.

Packages here import nothing when they load: each submodule (and each name a package exports) is imported on first
use, so that importing one module never runs another's imports and no import cycle goes through a package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = [
    "augmentation",
    "bundle",
    "cascade",
    "data",
    "data_device",
    "evaluation",
    "handlers",
    "inference",
    "metrics",
    "networks",
    "norms",
    "run_bundle",
    "runlock",
    "settings",
    "settings_values",
    "transforms",
]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """A package's module ``__getattr__``: ``exports`` maps each name to the submodule that defines it (the name
    itself when it is the submodule), imported on first use (the configs' ``$custom_components.data.read_...``)."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        return module if exports[name] == name else getattr(module, name)

    return __getattr__


__getattr__ = lazy_exports(__name__, {name: name for name in __all__})
