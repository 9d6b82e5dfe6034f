"""Dataset fingerprint: what `prepare plan` decides from, written to ``DATASET_DIR/fingerprint.json``.

Sizes and spacings are given along the RAS axes, the order the bundles see after ``Orientationd(axcodes="RAS")``,
so a plan's ``spacing`` and ``patch_size`` apply to the axes they were measured on. Intensities are sampled
inside the foreground (label > 0) as nnU-Net does: the statistics a CT normalisation needs describe the
structures to segment, not the air around the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nibabel as nib
import numpy as np

from custom_components.dataset_check import CHECK_THREADS, DatasetError, case_id, voxel_sizes
from custom_components.imageio import read_image

FOREGROUND_SAMPLES = 10_000_000  # foreground voxels kept for the intensity statistics, over the whole dataset
PERCENTILES = (0.5, 50.0, 99.5)  # nnU-Net's CT clipping window is the 0.5 and 99.5 foreground percentiles


def ras_order(affine: np.ndarray, dims: int) -> np.ndarray:
    """For each RAS axis, the voxel axis along it: the permutation ``Orientationd(axcodes="RAS")`` applies."""
    axes = nib.orientations.io_orientation(affine)[:dims, 0]
    return np.argsort(axes)


def _case_fingerprint(
    item: dict[str, str], num_classes: int, image_dims: int, samples: int, seed: int
) -> dict[str, Any]:
    """Shape, spacing (RAS order), voxels per class and a seeded sample of foreground intensities of one case."""
    (image, affine), (label, _) = read_image(item["image"]), read_image(item["label"])
    label = label.reshape(image.shape[:image_dims]).astype(np.int64)
    order = ras_order(affine, image_dims)
    foreground = image.reshape(label.size, -1)[label.ravel() > 0]
    if len(foreground) > samples:
        foreground = foreground[np.random.default_rng(seed).choice(len(foreground), samples, replace=False)]
    return {
        "case": case_id(item["image"]),
        "shape": [int(n) for n in np.asarray(image.shape[:image_dims])[order]],
        "spacing": [round(float(s), 6) for s in voxel_sizes(affine, image_dims)[order]],
        "voxels": np.bincount(label.ravel(), minlength=num_classes)[:num_classes],
        "foreground": foreground.astype(np.float64),
    }


def _intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, extremes and percentiles of one channel's foreground sample."""
    low, median, high = np.percentile(values, PERCENTILES)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "percentile_00_5": float(low),
        "median": float(median),
        "percentile_99_5": float(high),
        "voxels_sampled": int(values.size),
    }


def compute_fingerprint(
    description: dict[str, Any], datalist: Sequence[dict[str, str]], image_dims: int, seed: int = 0
) -> dict[str, Any]:
    """Fingerprint of a checked dataset (``datalist`` with absolute paths, as ``check_datalist`` returns it).

    Per case: shape and spacing (RAS order). Per class: voxels, share of all voxels, cases that contain it. Per
    channel: statistics of up to ``FOREGROUND_SAMPLES`` foreground intensities (evenly shared by the cases).
    """
    labels = {int(value): name for value, name in description["labels"].items()}
    samples = max(1, FOREGROUND_SAMPLES // len(datalist))
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        cases = list(
            pool.map(
                lambda indexed: _case_fingerprint(indexed[1], len(labels), image_dims, samples, seed + indexed[0]),
                enumerate(datalist),
            )
        )
    foreground = np.concatenate([case.pop("foreground") for case in cases])
    if not len(foreground):
        raise DatasetError("no case has a foreground voxel (label > 0): there is nothing to segment, check the labels")
    voxels = np.stack([case.pop("voxels") for case in cases])
    total = voxels.sum()
    return {
        "num_cases": len(cases),
        "image_dims": image_dims,
        "axes": "RAS"[:image_dims],
        "modality": description["modality"],
        "median_shape": np.median([case["shape"] for case in cases], axis=0).tolist(),
        "median_spacing": np.median([case["spacing"] for case in cases], axis=0).tolist(),
        "intensity": {
            channel: {"modality": modality, **_intensity_statistics(foreground[:, int(channel)])}
            for channel, modality in description["modality"].items()
        },
        "classes": {
            str(value): {
                "name": labels[value],
                "voxels": int(voxels[:, value].sum()),
                "fraction": float(voxels[:, value].sum() / total),
                "cases": int(np.count_nonzero(voxels[:, value])),
            }
            for value in sorted(labels)
        },
        "cases": cases,
    }
