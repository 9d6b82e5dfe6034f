"""Components the MONAI bundles need and MONAI lacks: dataset checks, reports, intensity schemes, synthetic data."""

from custom_components import data, handlers, transforms

__all__ = ["data", "handlers", "transforms"]
