"""Reading, checking and splitting an MSD-layout dataset, and sizing the dataset cache.

Every check stops the run before training with one message that names the file and the fix: a bundle config
calls the ``read_*`` wrappers, which turn a :class:`DatasetError` into a clean exit instead of a traceback
from deep inside MONAI.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
import psutil
from monai.data import CacheDataset, Dataset, PersistentDataset

logger = logging.getLogger(__name__)
T = TypeVar("T")

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message names the file and what to do."""


def load_dataset_json(dataset_dir: str | Path) -> dict[str, Any]:
    """Read ``dataset_dir/dataset.json`` and check the fields the bundles use (labels, modality, training)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset_dir {root} does not exist: pass --dataset_dir with a folder holding dataset.json")
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing: write an MSD dataset.json (labels, modality, training) or create one with "
            "`python -m custom_components.synthetic --out DIR`"
        )
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): fix the syntax") from err
    if not isinstance(description, dict):
        raise DatasetError(f"{path} must hold a JSON object with 'labels', 'modality' and 'training'")
    for key, kind in (("labels", dict), ("modality", dict), ("training", list)):
        if not isinstance(description.get(key), kind):
            raise DatasetError(f"{path} needs a '{key}' {kind.__name__} as in the Medical Segmentation Decathlon")
    if not description["training"]:
        raise DatasetError(f"{path} lists no training cases: add {{'image': ..., 'label': ...}} entries")
    for index, item in enumerate(description["training"]):
        if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("label"), str)):
            raise DatasetError(f"{path}: training[{index}] must be an object with 'image' and 'label' paths")
    return description


def _resolve(dataset_dir: Path, relative: str) -> Path:
    """A dataset.json path (``./imagesTr/x.nii.gz`` or absolute) as an absolute path."""
    path = Path(relative)
    return path if path.is_absolute() else (dataset_dir / path).resolve()


def _spatial_shape(header: Any, path: Path, spatial_dims: int) -> tuple[int, ...]:
    """Spatial shape of an image; a 4th axis (several modalities in one file) is the channel axis."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) < spatial_dims:
        raise DatasetError(f"{path} has shape {shape}, fewer than {spatial_dims} spatial axes: check the file")
    return shape[:spatial_dims] if len(shape) > spatial_dims else shape


def check_datalist(
    description: dict[str, Any], dataset_dir: str | Path, num_classes: int, spatial_dims: int = 3
) -> list[dict[str, str]]:
    """Check every training case and return the datalist with absolute paths.

    Checks: the files exist and are NIfTI, image and label share the spatial shape, and label values lie in
    ``0..num_classes-1``. The first problem found stops the run with the file named.
    """
    root = Path(dataset_dir)
    datalist = []
    for item in description["training"]:
        image, label = _resolve(root, item["image"]), _resolve(root, item["label"])
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(f"{path} is listed in {root / 'dataset.json'} but does not exist: fix the entry")
            if not path.name.endswith(NIFTI_SUFFIXES):
                raise DatasetError(
                    f"{path} is not NIfTI: convert it with `python -m custom_components.prepare convert`"
                )
        try:
            image_nii, label_nii = nib.load(image), nib.load(label)
        except Exception as err:  # nibabel raises several types for corrupt files
            raise DatasetError(f"{image} or {label} cannot be read as NIfTI ({err}): re-export the file") from err
        image_shape = _spatial_shape(image_nii.header, image, spatial_dims)
        label_shape = _spatial_shape(label_nii.header, label, spatial_dims)
        if image_shape != label_shape:
            raise DatasetError(
                f"{label} has shape {label_shape} but its image {image} has {image_shape}: "
                "image and label must be on the same grid (resample the label onto the image)"
            )
        values = np.unique(np.asarray(label_nii.dataobj))
        bad = values[(values < 0) | (values > num_classes - 1) | (values != np.round(values))]
        if bad.size:
            raise DatasetError(
                f"{label} has label values {bad.tolist()[:5]} outside 0..{num_classes - 1}: "
                f"fix the label map or declare the classes in {root / 'dataset.json'} 'labels'"
            )
        datalist.append({**item, "image": str(image), "label": str(label)})
    return datalist


def split_datalist(
    datalist: Sequence[dict[str, Any]],
    fold: int,
    num_folds: int,
    seed: int = 0,
    splits_file: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation cases of fold ``fold``.

    With ``splits_file`` (nnU-Net's ``splits_final.json`` form: a list of ``{"train": [...], "val": [...]}``
    holding case ids, i.e. file names without extension, or paths) that fold is used as is; otherwise the cases
    are shuffled with ``seed`` and cut into ``num_folds`` interleaved folds.
    """
    if splits_file:
        path = Path(splits_file)
        if not path.is_file():
            raise DatasetError(f"splits_file {path} does not exist: pass an existing file or splits_file=null")
        splits = json.loads(path.read_text())
        if not isinstance(splits, list) or not 0 <= fold < len(splits):
            raise DatasetError(f"{path} has no fold {fold}: it must be a list of {{'train','val'}} with that index")
        by_id = {case_id(item["image"]): item for item in datalist}
        chosen = splits[fold]
        missing = [c for c in chosen["train"] + chosen["val"] if case_id(c) not in by_id]
        if missing:
            raise DatasetError(f"{path} fold {fold} names cases not in dataset.json: {missing[:5]}")
        return [by_id[case_id(c)] for c in chosen["train"]], [by_id[case_id(c)] for c in chosen["val"]]
    if num_folds < 2 or not 0 <= fold < num_folds:
        raise DatasetError(f"fold={fold} num_folds={num_folds}: need num_folds >= 2 and 0 <= fold < num_folds")
    if len(datalist) < num_folds:
        raise DatasetError(f"{len(datalist)} cases cannot make {num_folds} folds: lower num_folds")
    order = np.random.default_rng(seed).permutation(len(datalist))
    val_index = set(order[fold::num_folds].tolist())
    train = [item for i, item in enumerate(datalist) if i not in val_index]
    val = [item for i, item in enumerate(datalist) if i in val_index]
    return train, val


def case_id(path: str) -> str:
    """Case identifier of an image path: its file name without the NIfTI suffix."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _exit_on_dataset_error(func: Callable[..., T]) -> Callable[..., T]:
    """For the bundle configs: a DatasetError ends the program with its message, not a traceback through MONAI."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return func(*args, **kwargs)
        except DatasetError as err:
            logger.error("%s", err)
            sys.exit(f"error: {err}")

    return wrapper


read_description = _exit_on_dataset_error(load_dataset_json)
read_datalist = _exit_on_dataset_error(check_datalist)
read_split = _exit_on_dataset_error(split_datalist)


def estimate_cache_bytes(
    datalist: Sequence[dict[str, Any]], spacing: Sequence[float] | None, keys: Sequence[str] = ("image", "label")
) -> int:
    """Bytes a full in-memory cache of the preprocessed cases would take (float32 after resampling to ``spacing``).

    Read from the NIfTI headers only, so it costs milliseconds per case, before any cache is filled.
    """
    total = 0
    for item in datalist:
        for key in keys:
            header = nib.load(item[key]).header
            shape = np.asarray(header.get_data_shape(), dtype=float)
            zooms = np.asarray(header.get_zooms(), dtype=float)
            dims = len(spacing) if spacing is not None else min(3, len(shape))
            voxels = np.prod(shape[:dims] * (zooms[:dims] / np.asarray(spacing) if spacing is not None else 1.0))
            channels = np.prod(shape[dims:]) if len(shape) > dims else 1
            total += int(voxels * channels * 4)
    return total


def make_dataset(
    data: Sequence[dict[str, Any]],
    transform: Callable,
    cache_rate: float,
    cache_dir: str | Path,
    spacing: Sequence[float] | None = None,
    num_workers: int = 0,
    memory_fraction: float = 0.5,
) -> Dataset:
    """A cached dataset that fits: RAM (``CacheDataset``) when the estimate fits, else a disk cache.

    MONAI's CacheDataset fills memory until the OS kills the process (``exit code -9``). Here the cache size is
    estimated from the headers first; if ``cache_rate`` of it exceeds ``memory_fraction`` of the available
    memory, a ``PersistentDataset`` in ``cache_dir`` is used instead and a warning says so.
    """
    if cache_rate <= 0:
        return Dataset(data=data, transform=transform)
    needed = estimate_cache_bytes(data, spacing) * cache_rate
    available = psutil.virtual_memory().available * memory_fraction
    if needed > available:
        warnings.warn(
            f"caching {cache_rate:.0%} of {len(data)} cases needs about {needed / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB may be used: caching to disk in {cache_dir} instead "
            "(lower cache_rate or free memory to cache in RAM)",
            stacklevel=2,
        )
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data=data, transform=transform, cache_dir=cache_dir)
    return CacheDataset(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers or None)
