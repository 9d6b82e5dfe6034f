"""The dataset check: every training case read and checked (files, grids, label values, intensities, sampling
weights), every problem of every case reported at once with its file and fix, each dataset state checked once per
process; the classes each label map holds are recorded on the way (``case_classes``)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from custom_components.imageio import IMAGE_SUFFIXES, PLANAR_SUFFIXES, ImageReadError, read_image

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message names the file and what to do."""


def resolve_path(dataset_dir: Path, relative: str) -> Path:
    """A dataset.json path (``./imagesTr/x.nii.gz`` or absolute) as an absolute path."""
    path = Path(relative)
    return path if path.is_absolute() else (dataset_dir / path).resolve()


GRID_TOLERANCE = 0.01  # image and label affines may differ by this fraction of the smallest voxel size
SPACING_RANGE_MM = (0.01, 50.0)  # outside it the header is not in millimetres (metres, microns) or is broken
CHECK_THREADS = 4  # cases read at once: decompression and disk reads overlap, memory stays bounded
SAMPLING_WEIGHT = "sampling_weight"  # a training entry's optional field: how often case_sampling draws the case
COUNT_BLOCK = 1 << 20  # label voxels counted at once: the integer copy bincount needs stays at 8 MiB


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


# the classes each label map the check read holds (its path -> class values), for `case_sampling: balanced`: the
# check reads every label anyway, so the sampler's weights cost no second read
_CLASSES: dict[str, tuple[int, ...]] = {}


def _present_classes(data: np.ndarray, high: int) -> tuple[int, ...]:
    """The values of a label map whose values are integers in 0..``high``, counted a block of voxels at a time."""
    flat = data.ravel(order="K")  # a view whatever the array's memory order
    counts = np.zeros(high + 1, dtype=np.int64)
    for start in range(0, flat.size, COUNT_BLOCK):
        counts += np.bincount(flat[start : start + COUNT_BLOCK].astype(np.intp), minlength=high + 1)
    return tuple(np.flatnonzero(counts).tolist())


def case_classes(labels: Sequence[str]) -> list[tuple[int, ...]]:
    """The class values each label map holds, background included: as the dataset check recorded them when it read
    the file (a file it has not read in this process is read now)."""
    found = []
    for label in labels:
        if label not in _CLASSES:
            data = read_image(label)[0]
            _CLASSES[label] = _present_classes(data, int(data.max()))
        found.append(_CLASSES[label])
    return found


def _check_label(path: Path, data: np.ndarray, image_dims: int, num_classes: int, report: Report) -> bool:
    """Shape and values of a label map; True when its shape is usable (so the grid can be compared). The classes of
    a label map with valid values are recorded (``case_classes``)."""
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
    else:
        _CLASSES[str(path)] = _present_classes(data, int(high))
        if high == 0:
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


def case_id(path: str) -> str:
    """Case identifier of an image path: its file name without the NIfTI, PNG or TIFF suffix."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", *PLANAR_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


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


def _weight_problems(description: dict[str, Any], path: Path) -> list[Problem]:
    """The training entries' ``sampling_weight``: a number >= 0 in every entry or in none, not all 0."""
    entries = description["training"]
    problems = []
    weights = []
    for index, item in enumerate(entries):
        if SAMPLING_WEIGHT not in item:
            continue
        value = item[SAMPLING_WEIGHT]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            case = case_id(item["image"])
            problems.append(
                Problem(
                    case,
                    str(path),
                    f"training[{index}] ({case}) has {SAMPLING_WEIGHT} {json.dumps(value)}",
                    "give a number >= 0 (how often case_sampling draws the case, relative to the others)",
                )
            )
        weights.append(value)
    missing = [case_id(item["image"]) for item in entries if SAMPLING_WEIGHT not in item]
    if weights and missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append(
            Problem(
                "dataset.json",
                str(path),
                f"gives {SAMPLING_WEIGHT} to {len(weights)} of {len(entries)} training cases, not to {listed}",
                f"give every training case a {SAMPLING_WEIGHT} (a number >= 0), or none",
            )
        )
    elif weights and not problems and not any(weights):
        problems.append(
            Problem(
                "dataset.json",
                str(path),
                f"gives every training case {SAMPLING_WEIGHT} 0: case_sampling would draw none",
                "give the cases to train on a weight > 0",
            )
        )
    return problems


def _checked_state(description: dict[str, Any], root: Path, num_classes: int, image_dims: int) -> str:
    """What a dataset check's outcome depends on: the description, the arguments and every listed file's size and
    modification time."""
    files = []
    for item in description["training"]:
        for name in (item["image"], item["label"]):
            try:
                state = resolve_path(root, name).stat()
                files.append([name, state.st_size, state.st_mtime_ns])
            except OSError:
                files.append([name, None])
    return json.dumps([str(root.resolve()), description, num_classes, image_dims, files], sort_keys=True, default=str)


# each dataset state is checked once per process: a training run that plans, and `kfold select`, check it in several
# places (its every file read each time) and reuse the first outcome
_CHECKED: dict[str, tuple[list[dict[str, str]], list[Problem]]] = {}


def check_dataset(
    description: dict[str, Any], dataset_dir: str | Path, num_classes: int, image_dims: int = 3
) -> tuple[list[dict[str, str]], list[Problem]]:
    """Check every training case and return the datalist with absolute paths and every problem of every case.

    ``dataset.json`` must number its labels 0..N-1 (one network output per class). Cases are read in a few
    threads: reading is bound by disk and decompression, which release the interpreter lock. A check of a dataset
    whose description and files have not changed since an earlier check in this process returns that outcome.
    """
    root = Path(dataset_dir)
    state = _checked_state(description, root, num_classes, image_dims)
    if state in _CHECKED:
        datalist, problems = _CHECKED[state]
        return [dict(item) for item in datalist], list(problems)
    datalist = [
        {**item, "image": str(resolve_path(root, item["image"])), "label": str(resolve_path(root, item["label"]))}
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
    problems += _weight_problems(description, root / "dataset.json")
    channels = len(description["modality"])
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        per_case = pool.map(
            lambda item: check_case(Path(item["image"]), Path(item["label"]), num_classes, image_dims, channels),
            datalist,
        )
        problems += [problem for case_problems in per_case for problem in case_problems]
    _CHECKED[state] = ([dict(item) for item in datalist], list(problems))
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
