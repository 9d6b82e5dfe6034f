"""Hyperparameter sweeps of a bundle with Optuna: each trial is the user's own training command (or a K-fold
cross-validation) in its own run folder, the study lives in a storage that several processes and machines share,
and ``sweep report`` ranks the trials and writes the best settings as a plan file. See docs/sweep.md."""

from custom_components import lazy_exports

__all__ = ["Space", "SweepError", "check_request", "parse_space", "run_sweep", "write_report"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Space": "space",
        "SweepError": "space",
        "check_request": "runner",
        "parse_space": "space",
        "run_sweep": "runner",
        "write_report": "report",
    },
)
