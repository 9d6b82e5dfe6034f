"""Reading, checking and splitting an MSD-layout dataset, and sizing the dataset cache.

The checks stop the run before training with one message that names every problem, its file and the fix: a
bundle config calls the ``read_*`` wrappers, which turn a :class:`DatasetError` into a clean exit instead of a
traceback from deep inside MONAI. ``python -m custom_components.prepare check`` runs the same per-case check.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
import psutil
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import set_rnd
from monai.utils import MAX_SEED

from custom_components.bundle import expression_ids
from custom_components.handlers import epoch_seed
from custom_components.imageio import IMAGE_SUFFIXES, PLANAR_SUFFIXES, ImageReadError, read_header, read_image
from custom_components.imageio import NIFTI_SUFFIXES as NIFTI_SUFFIXES  # re-exported for `from ..data import`
from custom_components.run_files import remove_stale_temporaries
from custom_components.runlock import not_a_folder

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


def _resolve(dataset_dir: Path, relative: str) -> Path:
    """A dataset.json path (``./imagesTr/x.nii.gz`` or absolute) as an absolute path."""
    path = Path(relative)
    return path if path.is_absolute() else (dataset_dir / path).resolve()


GRID_TOLERANCE = 0.01  # image and label affines may differ by this fraction of the smallest voxel size
SPACING_RANGE_MM = (0.01, 50.0)  # outside it the header is not in millimetres (metres, microns) or is broken
CHECK_THREADS = 4  # cases read at once: decompression and disk reads overlap, memory stays bounded


@dataclass(frozen=True)
class Problem:
    """One problem of one case: the file, what is wrong with it and the fix; ``fatal`` when the case is unusable."""

    case: str
    file: str
    problem: str
    fix: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.file} {self.problem}: {self.fix}"


Report = Callable[..., None]


def voxel_sizes(affine: np.ndarray, dims: int) -> np.ndarray:
    """Voxel size in mm along the first ``dims`` voxel axes, from the affine as MONAI reads it (not pixdim)."""
    return np.asarray(nib.affines.voxel_sizes(affine)[:dims], dtype=float)


def _read(path: Path, report: Report) -> tuple[np.ndarray, np.ndarray] | None:
    """The voxels and affine of a file (``imageio.read_image``), or None after reporting why it cannot be used."""
    if not path.is_file():
        report(path, "is listed in dataset.json but does not exist", "fix the entry or add the file")
        return None
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        report(
            path,
            "is neither NIfTI nor a PNG/TIFF image",
            "convert the dataset with `python -m custom_components.prepare convert`",
        )
        return None
    try:
        return read_image(path)
    except ImageReadError as err:
        report(path, err.problem, err.fix)
        return None


def _check_image(
    path: Path, data: np.ndarray, affine: np.ndarray, image_dims: int, channels: int, report: Report
) -> bool:
    """Shape, spacing and values of an image; True when its shape is usable (so the grid can be compared)."""
    shape = tuple(data.shape)
    if 0 in shape:
        report(path, f"is empty (shape {shape})", "re-export the image")
        return False
    extra = shape[image_dims:]
    if len(shape) < image_dims or not ((extra == () and channels == 1) or extra == (channels,)):
        layout = f"{image_dims}D" + (f" with the {channels} modalities on axis {image_dims}" if channels > 1 else "")
        report(
            path,
            f"has shape {shape}, not {layout}",
            f"the dataset is {image_dims}D (first image) with {channels} modality(ies) in dataset.json: "
            "export this case the same way or fix 'modality'",
        )
        return False
    spacing = voxel_sizes(affine, image_dims)
    low, high = SPACING_RANGE_MM
    if not (np.all(np.isfinite(spacing)) and np.all((spacing >= low) & (spacing <= high))):
        report(
            path,
            f"has voxel size {np.round(spacing, 6).tolist()} mm, outside the plausible {low}-{high} mm",
            "the header is not in millimetres or is broken: rewrite the affine (voxel size) in mm",
        )
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            report(path, f"has {bad} NaN or infinite voxels", "re-export the image, or replace them by its minimum")
            return True
    spatial = tuple(range(image_dims))
    low_values, high_values = np.atleast_1d(data.min(axis=spatial)), np.atleast_1d(data.max(axis=spatial))
    for channel in np.flatnonzero(low_values == high_values):
        where = f" (channel {channel})" if channels > 1 else ""
        report(path, f"is constant{where}: every voxel is {low_values[channel]}", "the export failed: re-export it")
    return True


def _check_label(path: Path, data: np.ndarray, image_dims: int, num_classes: int, report: Report) -> bool:
    """Shape and values of a label map; True when its shape is usable (so the grid can be compared)."""
    shape = tuple(data.shape)
    if 0 in shape:
        report(path, f"is empty (shape {shape})", "re-export the label")
        return False
    if len(shape) < image_dims or shape[image_dims:] not in ((), (1,)):
        report(
            path,
            f"has shape {shape}, not a {image_dims}D label map",
            "store one integer class per voxel (not one-hot channels), on the image's grid",
        )
        return False
    if np.issubdtype(data.dtype, np.floating):
        fractional = data[~(np.isfinite(data) & (data == np.round(data)))]
        if fractional.size:
            report(
                path,
                f"has non-integer label values (e.g. {fractional.flat[0]})",
                "the label was interpolated or saved as probabilities: re-export integer classes (nearest neighbour)",
            )
            return True
    low, high = data.min(), data.max()
    if low < 0 or high > num_classes - 1:
        values = np.unique(data)
        bad = values[(values < 0) | (values > num_classes - 1)]
        report(
            path,
            f"has label values {bad.tolist()[:5]} outside 0..{num_classes - 1}",
            "fix the label map or declare the classes in dataset.json 'labels'",
        )
    elif high == 0:
        report(
            path,
            "has no foreground voxel (every value is 0)",
            "check it is the right file: a case without foreground only teaches background",
            fatal=False,
        )
    return True


def _check_grid(
    image: Path,
    image_read: tuple[np.ndarray, np.ndarray],
    label: Path,
    label_read: tuple[np.ndarray, np.ndarray],
    image_dims: int,
    report: Report,
) -> None:
    """Image and label on the same grid: shape, then voxel size, then origin and orientation (the whole affine)."""
    (image_data, image_affine), (label_data, label_affine) = image_read, label_read
    image_shape, label_shape = image_data.shape[:image_dims], label_data.shape[:image_dims]
    image_spacing, label_spacing = voxel_sizes(image_affine, image_dims), voxel_sizes(label_affine, image_dims)
    tolerance = GRID_TOLERANCE * float(image_spacing.min())
    resample = "resample the label onto the image (nearest neighbour)"
    if image_shape != label_shape:
        report(label, f"has shape {label_shape} but its image {image.name} has {image_shape}", resample)
    elif np.abs(image_spacing - label_spacing).max() > tolerance:
        report(
            label,
            f"has voxel size {np.round(label_spacing, 4).tolist()} but its image {image.name} has "
            f"{np.round(image_spacing, 4).tolist()}",
            f"{resample}, or copy the image's header if only the label's header is wrong",
        )
    else:
        offset = float(np.abs(image_affine[:3] - label_affine[:3]).max())
        if offset > tolerance:
            report(
                label,
                f"has another origin or orientation than its image {image.name} (affines differ by {offset:.3g} mm)",
                f"copy the image's affine to the label if it was drawn on this image, else {resample}",
            )


def check_case(image: Path, label: Path, num_classes: int, image_dims: int = 3, channels: int = 1) -> list[Problem]:
    """Every problem of one training case, each file read once: the per-case check shared by training
    (``check_datalist``) and ``python -m custom_components.prepare check``. See docs/prepare.md for the table."""
    problems: list[Problem] = []
    case = case_id(str(image))

    def report(path: Path, problem: str, fix: str, fatal: bool = True) -> None:
        problems.append(Problem(case, str(path), problem, fix, fatal))

    image_read, label_read = _read(image, report), _read(label, report)
    image_ok = image_read is not None and _check_image(image, *image_read, image_dims, channels, report)
    label_ok = label_read is not None and _check_label(label, label_read[0], image_dims, num_classes, report)
    if image_ok and label_ok:
        _check_grid(image, image_read, label, label_read, image_dims, report)
    return problems


def check_dataset(
    description: dict[str, Any], dataset_dir: str | Path, num_classes: int, image_dims: int = 3
) -> tuple[list[dict[str, str]], list[Problem]]:
    """Check every training case and return the datalist with absolute paths and every problem of every case.

    ``dataset.json`` must number its labels 0..N-1 (one network output per class). Cases are read in a few
    threads: reading is bound by disk and decompression, which release the interpreter lock.
    """
    root = Path(dataset_dir)
    datalist = [
        {**item, "image": str(_resolve(root, item["image"])), "label": str(_resolve(root, item["label"]))}
        for item in description["training"]
    ]
    problems = []
    declared = set(description["labels"])
    if declared != {str(value) for value in range(len(declared))}:
        problems.append(
            Problem(
                "dataset.json",
                str(root / "dataset.json"),
                f"declares labels {sorted(declared)}, not 0..{len(declared) - 1}",
                "number the classes 0 (background) to N-1 without gaps: the network has one output per class",
            )
        )
    channels = len(description["modality"])
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        per_case = pool.map(
            lambda item: check_case(Path(item["image"]), Path(item["label"]), num_classes, image_dims, channels),
            datalist,
        )
        problems += [problem for case_problems in per_case for problem in case_problems]
    return datalist, problems


def check_datalist(
    description: dict[str, Any], dataset_dir: str | Path, num_classes: int, spatial_dims: int = 3
) -> list[dict[str, str]]:
    """Check every training case (``check_dataset``) and return the datalist with absolute paths.

    ``spatial_dims`` is that of the images (2: native 2D images, 3: volumes). Warnings are logged; if any case
    is unusable, one ``DatasetError`` lists every problem of every case, each with its file and fix.
    """
    datalist, problems = check_dataset(description, dataset_dir, num_classes, spatial_dims)
    for problem in problems:
        if not problem.fatal:
            logger.warning("%s", problem)
    errors = [problem for problem in problems if problem.fatal]
    if errors:
        cases = len({problem.case for problem in errors})
        raise DatasetError(
            f"{cases} of {len(datalist)} cases cannot be used (`python -m custom_components.prepare check "
            f"{dataset_dir}` prints them as a table):\n" + "\n".join(str(problem) for problem in errors)
        )
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


def case_id(path: str) -> str:
    """Case identifier of an image path: its file name without the NIfTI, PNG or TIFF suffix."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", *PLANAR_SUFFIXES):
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


def in_memory_workers(dataset: Dataset, num_workers: int) -> int:
    """Loader workers for a dataset read again and again (validation): none when a ``CacheDataset`` holds every
    item in memory, where workers would only add their start and the transfer of each item to this process, else
    ``num_workers``."""
    fully_cached = isinstance(dataset, CacheDataset) and dataset.cache_num == len(dataset)
    return 0 if fully_cached else num_workers


class EpochSeededDataset(torch.utils.data.Dataset):
    """``dataset`` whose random transforms draw each item from a seed of (the epoch's seed, the item's draw).

    Which worker process loads an item, when, and whether the workers live across epochs then changes no random
    draw: an epoch draws the same patches and augmentations in a resumed run as in an uninterrupted one. An index
    from :class:`EpochSeededSampler` is a pair (the epoch's seed, the draw), so a worker may load the next epoch's
    items while this one ends. The draw is the item's index in an epoch's first pass over the dataset and
    ``pass * len(dataset) + index`` in a later one (an epoch of ``iterations_per_epoch`` longer than the dataset),
    so a case drawn twice in an epoch gets other patches and augmentations the second time. A plain index (a
    sampler of MONAI's, such as ``DistributedSampler``) takes the current epoch's seed, set in the main process
    (``set_random_state``, which ``ResumableCheckpoint`` reaches through MONAI's ``set_rnd`` at every epoch start,
    with the epoch through ``set_epoch``) and read by the workers from shared memory; a worker's own seeding
    (MONAI's ``worker_init_fn``) is ignored.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self._epoch_seed = multiprocessing.RawValue("q", 0)  # shared with forked (or spawned) workers
        self.epoch = 1  # the trainer's current epoch: where an EpochSeededSampler starts

    @property
    def epoch_seed(self) -> int:
        return int(self._epoch_seed.value)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Any:
        if torch.utils.data.get_worker_info() is None:
            self._epoch_seed.value = int(seed or 0)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        seed, draw = index if isinstance(index, tuple) else (self.epoch_seed, index)
        item_seed = int(np.random.SeedSequence([seed, 0, int(draw)]).generate_state(1)[0])
        set_rnd(self.dataset, item_seed % MAX_SEED)
        return self.dataset[int(draw) % len(self)]


class EpochSeededSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Epoch after epoch without end, from the trainer's current epoch: (the epoch's seed, draw) pairs of an
    ``EpochSeededDataset``, each epoch's drawn from its seed (``handlers.epoch_seed`` of ``seed`` and the epoch) alone.

    An epoch is ``iterations_per_epoch`` batches of ``batch_size`` per process (nnU-Net's fixed epoch, whatever the
    number of cases) or, without it, one pass over the dataset shared out between the ``num_replicas`` processes and
    rounded up to whole batches (a last partial batch would be completed with the next epoch's draws). An epoch's
    draws, all processes together, are permutations of the dataset end to end, the first one the whole of a
    one-process pass, so each case is drawn as often as any other, give or take one; process ``rank`` takes every
    ``num_replicas``-th from the ``rank``-th on (as torch's ``DistributedSampler``), so the processes train on
    different cases.

    Its length is one epoch of this process (the trainer's epoch length). Not ending, the loader's iterator lives
    across epochs (the trainer continues it), so the workers prepare the next epoch's first batches during this
    epoch's end and validation instead of after them. The order is not drawn from torch's global generator (as a
    shuffling ``DataLoader`` does), which the start of a loader's workers also draws from.
    """

    def __init__(
        self,
        dataset: EpochSeededDataset,
        seed: int,
        iterations_per_epoch: int | None = None,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        if iterations_per_epoch is None:
            batches = math.ceil(len(dataset) / (self.num_replicas * batch_size))
        else:
            batches = int(iterations_per_epoch)
        self.epoch_length = batches * int(batch_size)  # draws per epoch of this process

    def __len__(self) -> int:
        return self.epoch_length

    def epoch_draws(self, epoch: int) -> list[tuple[int, int]]:
        """This process's (the epoch's seed, draw) pairs of ``epoch``, in the order it trains on them."""
        seed, size = epoch_seed(self.seed, epoch), len(self.dataset)
        total = self.epoch_length * self.num_replicas
        order = np.random.default_rng([seed, 1])
        draws = [
            (seed, first + index)
            for first in range(0, total, size)  # a pass over the dataset: its draws start at first
            for index in order.permutation(size).tolist()
        ]
        return draws[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in itertools.count(self.dataset.epoch):
            yield from self.epoch_draws(epoch)


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
            return image_spatial_dims(_resolve(Path(dataset_dir), item["image"]))
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


class OutputDirError(ValueError):
    """An ``output_dir`` that cannot hold the run: not writable, or without room for the checkpoints."""


OPTIMIZER_MOMENTS = 2  # tensors per parameter an optimiser keeps (Adam, AdamW: two; SGD, RMSprop: fewer)
SPACE_MARGIN = 1.25  # on top of the estimate: pickling overhead, the report's history, a larger optimiser state
REPORT_BYTES = 64 * 2**20  # learning curve, metrics.json, configs, docs, TensorBoard events, log


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def checkpoint_space(network: Any, output_dir: str | Path | None = None) -> int:
    """Bytes of disk a run of ``network`` needs for its checkpoints, with a margin.

    ``models/model.pt`` holds the weights, ``models/checkpoint_last.pt`` the weights and the optimiser's moments,
    and each is written to a temporary file before it replaces the previous one, so the checkpoint is on disk twice
    for a moment. What a previous run already wrote into ``output_dir`` (a resumed run) is counted as present.
    """
    weights = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)
    checkpoint = weights + OPTIMIZER_MOMENTS * trained
    needed = SPACE_MARGIN * (weights + 2 * checkpoint) + REPORT_BYTES
    if output_dir is not None:
        for name in ("model.pt", "checkpoint_last.pt"):
            existing = Path(output_dir) / "models" / name
            needed -= existing.stat().st_size if existing.is_file() else 0
    return int(max(needed, SPACE_MARGIN * checkpoint + REPORT_BYTES))


def check_output_dir(output_dir: str | Path, network: Any | None = None) -> None:
    """``output_dir`` (created if missing) is a folder that can be written and, given a ``network`` (training), has
    room for its checkpoints.

    Writability is tried, not read from the permission bits (which do not stop root, and miss read-only mounts):
    a temporary file is created and removed. Raises :class:`OutputDirError` naming the folder and the fix.
    """
    path = Path(output_dir)
    if problem := not_a_folder(path):
        raise OutputDirError(problem)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(
            f"output_dir {path} cannot be written ({err.strerror or err}): pass --output_dir with a folder you can "
            "write to"
        ) from err
    if network is None:
        return
    needed = checkpoint_space(network, path)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OutputDirError(
            f"output_dir {path} has {_size(free)} free but the checkpoints need about {_size(needed)} "
            "(models/model.pt and models/checkpoint_last.pt with the optimiser state, each written next to the "
            "previous one before replacing it): free some space or pass --output_dir on another disk"
        )


def prepare_output_dir(output_dir: str | Path, network: Any | None = None, clean: bool = True) -> str:
    """For the bundle configs, before the dataset cache is filled or the first case is written:
    :func:`check_output_dir`, a clean exit with its message if it fails, then (``clean``: the training process that
    writes) the temporary files a killed write left removed."""
    try:
        check_output_dir(output_dir, network)
    except OutputDirError as err:
        logger.error("%s", err)
        sys.exit(f"error: {err}")
    if clean:
        for path in remove_stale_temporaries(output_dir):
            logger.warning("removed %s, left by a write that was killed", path)
    return str(output_dir)
