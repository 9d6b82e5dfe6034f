"""Components the MONAI bundles need and MONAI lacks: dataset checks, reports, the run folder as a bundle,
inference that skips unreadable inputs, intensity schemes, small-batch normalisation and the U-Net with or
without skip connections."""

from custom_components import bundle, data, evaluation, handlers, inference, networks, norms, run_bundle, transforms

__all__ = ["bundle", "data", "evaluation", "handlers", "inference", "networks", "norms", "run_bundle", "transforms"]
