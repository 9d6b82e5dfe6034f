"""Reading, checking and splitting an MSD-layout dataset, and sizing the dataset cache.

The checks stop the run before training with one message that names every problem, its file and the fix: a
bundle config calls the ``read_*`` wrappers, which turn a :class:`DatasetError` into a clean exit instead of a
traceback from deep inside MONAI. ``python -m custom_components.prepare check`` runs the same per-case check.
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

import numpy as np
import psutil
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset

from custom_components.bundle import expression_ids
from custom_components.dataset_check import DatasetError, case_id, check_datalist, resolve_path, voxel_sizes
from custom_components.imageio import IMAGE_SUFFIXES, PLANAR_SUFFIXES, ImageReadError, read_header
from custom_components.imageio import NIFTI_SUFFIXES as NIFTI_SUFFIXES  # re-exported for `from ..data import`

# named by the configs of run folders written before they moved to their own modules
from custom_components.output_dir import prepare_output_dir as prepare_output_dir
from custom_components.sampling import EpochSeededDataset as EpochSeededDataset
from custom_components.sampling import EpochSeededSampler as EpochSeededSampler

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
    problems = name_problems(description)
    if problems:
        raise DatasetError(f"{path} holds names that cannot be used:\n" + "\n".join(problems))
    return description


def name_problems(description: dict[str, Any]) -> list[str]:
    """Every name of ``dataset.json`` that a run would carry into its configs, metadata and reports (the dataset's
    name, label and modality names, case file names) and that MONAI's config parser would evaluate, read as a
    reference or expand as a macro (``$``, ``@``, ``%`` first), or that is not text: names are data, never code."""
    named = [("name", description.get("name", ""))]
    named += [(f"labels {key!r}", name) for key, name in description["labels"].items()]
    named += [(f"modality {key!r}", name) for key, name in description["modality"].items()]
    for part in ("training", "test"):
        for index, item in enumerate(description.get(part) or []):
            files = item if isinstance(item, dict) else {"image": item}  # MSD lists test images as plain paths
            named += [
                (f"{part}[{index}] {key}", Path(file).name if isinstance(file, str) else file)
                for key, file in files.items()
                if key in ("image", "label")
            ]
    problems = []
    for where, name in named:
        if not isinstance(name, str):
            problems.append(f"{where}: {name!r} is not a name; write it as text")
        elif expression_ids(name):
            problems.append(
                f"{where}: {name!r} starts with {name[0]!r}, which MONAI's config parser would run as code (an "
                f"expression, reference or macro) in the run's configs; rename it without {name[0]!r} at its start"
            )
    return problems


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
    are shuffled with ``seed`` and cut into ``num_folds`` interleaved folds. ``num_folds`` 1 (nnU-Net's fold
    ``all``: the final model, once cross-validation has chosen the settings) trains on every case and validates on
    none.
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
    if num_folds < 1 or not 0 <= fold < num_folds:
        raise DatasetError(
            f"fold={fold} num_folds={num_folds}: need num_folds >= 1 and 0 <= fold < num_folds "
            "(num_folds 1 with fold 0 trains on every case without validation)"
        )
    if num_folds == 1:
        return list(datalist), []
    if len(datalist) < num_folds:
        raise DatasetError(f"{len(datalist)} cases cannot make {num_folds} folds: lower num_folds")
    order = np.random.default_rng(seed).permutation(len(datalist))
    val_index = set(order[fold::num_folds].tolist())
    train = [item for i, item in enumerate(datalist) if i not in val_index]
    val = [item for i, item in enumerate(datalist) if i in val_index]
    return train, val


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

    Read from the image headers only (``imageio.read_header``), so it costs milliseconds per case, before any
    cache is filled.
    """
    total = 0
    for item in datalist:
        for key in keys:
            header = read_header(item[key])
            shape = np.asarray(header.shape, dtype=float)
            dims = min(3, len(shape))  # a 4th axis holds modalities
            zooms = voxel_sizes(header.affine, dims)
            target = np.asarray(spacing[:dims] if spacing is not None else zooms, dtype=float)
            target = np.where(target > 0, target, zooms)  # non-positive: keep the native spacing, as Spacingd
            voxels = np.prod(shape[:dims] * zooms / target)
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
    cache_device: torch.device | None = None,
) -> Dataset:
    """A cached dataset that fits: RAM (``CacheDataset``) when the estimate fits, else a disk cache.

    MONAI's CacheDataset fills memory until the OS kills the process (``exit code -9``). Here the cache size is
    estimated from the headers first; if ``cache_rate`` of it exceeds ``memory_fraction`` of the available
    memory, a ``PersistentDataset`` in ``cache_dir`` is used instead and a warning says so. With ``cache_device``
    (``data_device``'s device path, whose ``transform`` moves the cases there) the cache is a ``CacheDataset`` on that
    device, whose room ``data_device.read_data_device`` checked.
    """
    if cache_rate <= 0:
        return Dataset(data=data, transform=transform)
    if cache_device is not None:
        return CacheDataset(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers or None)
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


def in_memory_workers(dataset: Dataset, num_workers: int) -> int:
    """Loader workers for a dataset read again and again (validation): none when a ``CacheDataset`` holds every
    item in memory, where workers would only add their start and the transfer of each item to this process, else
    ``num_workers``."""
    fully_cached = isinstance(dataset, CacheDataset) and dataset.cache_num == len(dataset)
    return 0 if fully_cached else num_workers


def image_spatial_dims(path: str | Path) -> int:
    """2 for a 2D image, 3 for a volume (a 4th NIfTI axis holds modalities); read from the header only."""
    path = Path(path)
    try:
        shape = read_header(path).shape
    except ImageReadError as err:
        raise DatasetError(str(err)) from err
    planar = path.name.lower().endswith(PLANAR_SUFFIXES)  # an RGB picture is 2D with 3 channels
    return 2 if len(shape) == 2 or planar else 3


def first_image_dims(description: dict[str, Any], dataset_dir: str | Path, default: int = 3) -> int:
    """Spatial dimensions of a dataset, from its first readable training image: decides 2D-native or volume
    handling. Unreadable images are passed over (the dataset check lists them with every other problem);
    ``default`` when none can be read."""
    for item in description["training"]:
        try:
            return image_spatial_dims(resolve_path(Path(dataset_dir), item["image"]))
        except DatasetError:
            continue
    return default


def list_images(source: str | Path) -> list[dict[str, str]]:
    """Inference inputs: one image file, or every NIfTI/PNG/TIFF file of a folder, as ``[{"image": path}]``."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    else:
        raise DatasetError(f"input_dir {path} does not exist: pass --input_dir with a NIfTI file or a folder of them")
    if not files:
        raise DatasetError(f"input_dir {path} holds no NIfTI, PNG or TIFF file: pass a folder of images")
    return [{"image": str(f.resolve())} for f in files]


def bundle_image_dims(description: dict[str, Any], dataset_dir: str | Path, network_dims: int) -> int:
    """The dataset's image dimensions, checked against the bundle: a 3D network cannot train on 2D images."""
    dims = first_image_dims(description, dataset_dir, default=network_dims)
    if dims < network_dims:
        raise DatasetError(
            f"{Path(dataset_dir) / 'dataset.json'} lists 2D images; the 3D bundle needs volumes: "
            "train them with bundles/unet2d/configs/train.yaml"
        )
    return dims


read_image_dims = _exit_on_dataset_error(bundle_image_dims)
read_images = _exit_on_dataset_error(list_images)
