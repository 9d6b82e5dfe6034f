"""Components the MONAI bundles need and MONAI lacks: dataset checks, reports, intensity schemes, synthetic data,
small-batch normalisation and the U-Net with or without skip connections."""

from custom_components import data, handlers, networks, norms, transforms

__all__ = ["data", "handlers", "networks", "norms", "transforms"]
