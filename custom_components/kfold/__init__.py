"""K-fold cross-validation of a bundle: stratified/grouped splits, folds run and resumed, a report, an ensemble.

Command line (from any folder; ``--bundle`` is any bundle folder, a copied one too)::

    python -m custom_components.kfold run --bundle bundles/unet3d --dataset_dir DIR --folds 5 --output runs/cv3d
    python -m custom_components.kfold report runs/cv3d
    python -m custom_components.kfold predict runs/cv3d --images DIR_OR_FILES --out DIR

Python: :func:`run_cv`, :func:`write_report`, :func:`predict`, :func:`make_splits`. See docs/kfold.md.
"""

from custom_components import lazy_exports

__all__ = ["KFoldError", "make_splits", "predict", "run_cv", "write_report"]
__getattr__ = lazy_exports(
    __name__,
    {
        "KFoldError": "splits",
        "make_splits": "splits",
        "predict": "ensemble",
        "run_cv": "runner",
        "write_report": "report",
    },
)
