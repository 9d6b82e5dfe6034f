"""Hyperparameter sweeps of a bundle with Optuna: each trial is the user's own training command (or a K-fold
cross-validation) in its own run folder, the study lives in a storage that several processes and machines share,
and ``sweep report`` ranks the trials and writes the best settings as a config overlay. See docs/sweep.md."""

from custom_components.sweep.report import write_report
from custom_components.sweep.runner import check_request, run_sweep
from custom_components.sweep.space import Space, SweepError, parse_space

__all__ = ["Space", "SweepError", "check_request", "parse_space", "run_sweep", "write_report"]
