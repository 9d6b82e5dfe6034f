"""K-fold cross-validation of a bundle: stratified/grouped splits, folds run and resumed, a report, an ensemble.

Command line (from any folder; ``--bundle`` is any bundle folder, a copied one too)::

    python -m custom_components.kfold run --bundle bundles/unet3d --dataset_dir DIR --folds 5 --output runs/cv3d
    python -m custom_components.kfold report runs/cv3d
    python -m custom_components.kfold predict runs/cv3d --images DIR_OR_FILES --out DIR

Python: :func:`run_cv`, :func:`write_report`, :func:`predict`, :func:`make_splits`. See docs/kfold.md.
"""

from custom_components.kfold.ensemble import predict
from custom_components.kfold.report import write_report
from custom_components.kfold.runner import run_cv
from custom_components.kfold.splits import KFoldError, make_splits

__all__ = ["KFoldError", "make_splits", "predict", "run_cv", "write_report"]
