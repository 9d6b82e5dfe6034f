"""Prepare a dataset for the bundles: convert what you have, check every case, plan the training.

    python -m custom_components.prepare convert --images DICOM_OR_NIFTI_DIR [DIR ...] --labels DIR --out DATASET_DIR
    python -m custom_components.prepare check   DATASET_DIR
    python -m custom_components.prepare plan    DATASET_DIR [--memory-gb 8] [--dim 3] [--set KEY=VALUE ...]

``convert`` writes an MSD-layout dataset (``imagesTr``, ``labelsTr``, ``imagesTs``, ``dataset.json``) and checks
it; ``check`` runs the per-case check training runs, and prints every problem as a table; ``plan`` writes
``fingerprint.json`` and ``plan_3d.yaml`` (or ``plan_2d.yaml``). See docs/prepare.md.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from custom_components import settings
from custom_components.bundle import KeyValueError, parse_key_values
from custom_components.data import first_image_dims, load_dataset_json
from custom_components.dataset_check import GRID_TOLERANCE, DatasetError, Problem, check_dataset, voxel_sizes
from custom_components.imageio import ITK_SUFFIXES, NIFTI_SUFFIXES, ImageReadError, read_header, read_image
from custom_components.planning import PlanError, bundle_config, make_plan, planned_keys
from custom_components.run_files import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES  # what `convert` reads, besides DICOM series folders
DATA_SUFFIXES = (".raw", ".zraw", ".raw.gz")  # pixel data of .mhd and .nhdr headers, not images of their own
PAIRING = "images and labels are paired by case id: the file name without extension, or a DICOM series' folder name"


def _case_of(name: str) -> str | None:
    """Case id of an image file name (its name without the image extension), None for other files."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _series_names(folder: Path) -> Any:
    """GDCM's grouping of the DICOM files in ``folder`` into series, as MONAI's ITKReader groups them."""
    import itk  # DICOM only

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # series date
    names.SetDirectory(str(folder))
    return names


def _dicom_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder`` (none when it holds no DICOM); several series are an error."""
    names = _series_names(folder)
    series = names.GetSeriesUIDs()
    if len(series) > 1:
        raise DatasetError(f"{folder} holds {len(series)} DICOM series: move each series into a folder of its own")
    return list(names.GetFileNames(series[0])) if series else []


def find_cases(folder: Path) -> dict[str, Path]:
    """Case id -> image file, or folder of one DICOM series, for everything under ``folder`` (recursively)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder: pass a folder of images (NIfTI, NRRD, MHA or DICOM series)")
    cases: dict[str, Path] = {}

    def add(case: str, path: Path) -> None:
        if case in cases:
            raise DatasetError(f"case id {case!r} is both {cases[case]} and {path}: rename one ({PAIRING})")
        cases[case] = path

    for directory, subdirectories, files in os.walk(folder):
        subdirectories.sort()
        others = False
        for name in sorted(files):
            case = _case_of(name)
            if case is not None:
                add(case, Path(directory) / name)
            else:
                others |= not (name.startswith(".") or name.lower().endswith(DATA_SUFFIXES))
        if others and _dicom_files(Path(directory)):
            add(Path(directory).name, Path(directory))
    if not cases:
        raise DatasetError(f"{folder} holds no image: NIfTI, NRRD or MHA files, or one folder per DICOM series")
    return cases


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Gzipped NIfTI written atomically, the affine as both sform and qform so that every reader agrees."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1))


def _convert_image(sources: Sequence[Path], target: Path) -> None:
    """One case's image: a NIfTI file is copied as it is; otherwise read, modalities stacked on a last axis (MSD)."""
    if len(sources) == 1 and sources[0].name.endswith(NIFTI_SUFFIXES):
        data = sources[0].read_bytes()
        atomic_write_bytes(target, data if sources[0].name.endswith(".gz") else gzip.compress(data, compresslevel=1))
        return
    channels = [read_image(source) for source in sources]
    first, affine = channels[0]
    for source, (array, other) in zip(sources[1:], channels[1:], strict=True):
        tolerance = GRID_TOLERANCE * float(voxel_sizes(affine, 3).min())
        if array.shape != first.shape or np.abs(other - affine).max() > tolerance:
            raise DatasetError(
                f"{source} is not on the grid of {sources[0]} (shapes {array.shape} and {first.shape}, or their "
                "spacing, origin or direction differ): resample the modalities of a case onto one grid"
            )
    array = first if len(channels) == 1 else np.stack([array for array, _ in channels], axis=-1)
    _write_nifti(array, affine, target)


def _integer_labels(array: np.ndarray) -> np.ndarray:
    """A label map in the smallest integer type that holds it exactly; unchanged if it is not whole numbers."""
    if not np.issubdtype(array.dtype, np.integer) and not np.all(np.isfinite(array) & (array == np.round(array))):
        return array  # `check` reports it with the fix
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= array.min() and array.max() <= np.iinfo(dtype).max:
            return array.astype(dtype)
    return array


def _modality(folder: Path, cases: dict[str, Path]) -> str:
    """A channel's modality from its first DICOM series' Modality tag; 'unknown' (with a warning) without DICOM."""
    series = next((path for path in cases.values() if path.is_dir()), None)
    if series is not None:
        import itk  # DICOM only

        io = itk.GDCMImageIO.New()
        io.SetFileName(_dicom_files(series)[0])
        io.ReadImageInformation()
        found, value = io.GetValueFromTag("0008|0060", "")
        if found and value.strip():
            return value.strip()
    logger.warning(
        "%s: NIfTI, NRRD and MHA files carry no modality, dataset.json says 'unknown': pass --modality (CT, MR, ...) "
        "since `prepare plan` picks the intensity scheme from it",
        folder,
    )
    return "unknown"


def convert(
    images: Sequence[Path],
    labels: Path,
    out: Path,
    modality: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Write the MSD-layout dataset ``out`` from image folders (one per modality) and a label folder.

    Cases are paired by case id; images without a label go to ``imagesTs`` (the ``test`` list). Label names are
    ``label_names`` or ``background``, ``class_1``, ... up to the largest label value found.
    """
    channel_cases = [find_cases(Path(folder)) for folder in images]
    label_cases = find_cases(Path(labels))
    ids = sorted(channel_cases[0])
    for folder, cases in zip(images[1:], channel_cases[1:], strict=True):
        if set(cases) != set(ids):
            different = sorted(set(cases) ^ set(ids))
            raise DatasetError(f"{folder} and {images[0]} hold different cases {different[:5]}: one image per modality")
    orphans = sorted(set(label_cases) - set(ids))
    if orphans:
        raise DatasetError(f"{labels} has labels without an image: {orphans[:5]} ({PAIRING})")
    if modality is not None and len(modality) != len(images):
        raise DatasetError(f"{len(images)} image folders but {len(modality)} --modality names: give one per folder")
    modalities = list(
        modality or [_modality(Path(folder), cases) for folder, cases in zip(images, channel_cases, strict=True)]
    )
    out = Path(out)
    training, test, largest = [], [], 0
    for case in tqdm(ids, desc="converting", unit="case"):
        if case not in label_cases:
            _convert_image([cases[case] for cases in channel_cases], out / "imagesTs" / f"{case}.nii.gz")
            test.append(f"./imagesTs/{case}.nii.gz")
            continue
        _convert_image([cases[case] for cases in channel_cases], out / "imagesTr" / f"{case}.nii.gz")
        array, affine = read_image(label_cases[case])
        array = _integer_labels(array)
        largest = max(largest, int(np.max(array[np.isfinite(array)], initial=0)))
        _write_nifti(array, affine, out / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    if not training:
        raise DatasetError(f"no image in {images[0]} has a label in {labels} ({PAIRING})")
    names = list(label_names or ["background"] + [f"class_{value}" for value in range(1, largest + 1)])
    description = {
        "name": out.name,
        "description": f"converted by custom_components.prepare from {', '.join(map(str, images))}",
        "tensorImageSize": f"{len(read_header(out / training[0]['image']).shape)}D",
        "modality": {str(index): name for index, name in enumerate(modalities)},
        "labels": {str(value): name for value, name in enumerate(names)},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    atomic_write_json(description, out / "dataset.json")
    return out


def problems_table(problems: Sequence[Problem], dataset_dir: Path, cases: int) -> str:
    """Every problem as a table (case, severity, file, problem, fix) with a summary line under it."""
    if not problems:
        return f"all {cases} cases pass every check"
    rows = [("case", "severity", "file", "problem", "fix")]
    for problem in problems:
        file = os.path.relpath(problem.file, dataset_dir) if problem.file.startswith(str(dataset_dir)) else problem.file
        rows.append((problem.case, "error" if problem.fatal else "warning", file, problem.problem, problem.fix))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in [*widths, 3]))
    unusable = {problem.case for problem in problems if problem.fatal}
    warnings = sum(not problem.fatal for problem in problems)
    verdict = "fix the errors before training" if unusable else "the dataset is usable"
    summary = f"{len(unusable)} unusable of {cases} cases, {warnings} warning(s): {verdict}"
    return "\n".join([*lines, "", summary])


def check(dataset_dir: Path, image_dims: int | None = None) -> bool:
    """Check every case of ``dataset_dir``, print the problems as a table; True when no case is unusable.

    ``image_dims`` (2: native 2D images, 3: volumes) defaults to the first image's, as training decides it.
    """
    dataset_dir = Path(dataset_dir).resolve()
    description = load_dataset_json(dataset_dir)
    if image_dims is None:
        image_dims = first_image_dims(description, dataset_dir)
    datalist, problems = check_dataset(description, dataset_dir, len(description["labels"]), image_dims)
    print(problems_table(problems, dataset_dir, len(datalist)))
    return not any(problem.fatal for problem in problems)


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``, read as every ``--set`` is (:func:`custom_components.bundle.parse_key_values`: the
    value as YAML, ``channels=[16,32,64]`` a list, ``norm=batch`` a string)."""
    try:
        ((key, value),) = parse_key_values([text]).items()
    except KeyValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 when the dataset is unusable or no plan can be made)."""
    parser = argparse.ArgumentParser(prog="python -m custom_components.prepare", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert_args = commands.add_parser("convert", help="DICOM series, NIfTI, NRRD, MHA -> checked MSD-layout dataset")
    convert_args.add_argument("--images", type=Path, nargs="+", required=True, help="image folder, one per modality")
    convert_args.add_argument("--labels", type=Path, required=True, help="label folder (files named by case id)")
    convert_args.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    convert_args.add_argument("--modality", nargs="+", help="one per image folder (default: DICOM tag or 'unknown')")
    convert_args.add_argument("--label-names", nargs="+", help="class names, background first (default: class_N)")
    check_args = commands.add_parser("check", help="check every case, print every problem with its fix")
    check_args.add_argument("dataset_dir", type=Path)
    check_args.add_argument("--dim", type=int, choices=(2, 3), help="image dimensions (default: the first image's)")
    plan_args = commands.add_parser("plan", help="write fingerprint.json and plan_<dim>d.yaml")
    plan_args.add_argument("dataset_dir", type=Path)
    plan_args.add_argument("--memory-gb", type=float, default=8.0, help="memory a training step may take (GiB)")
    plan_args.add_argument(
        "--cpu-step-gflop",
        type=float,
        help="on CPU, the largest training step in GFLOP (default: the bundle's plan_cpu_step_gflop)",
    )
    plan_args.add_argument("--dim", type=int, choices=(2, 3), default=3, help="bundle: 3 (unet3d) or 2 (unet2d)")
    plan_args.add_argument("--device", help="where steps are measured (default: cuda if available, else cpu)")
    plan_args.add_argument(
        "--set",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="bundle key for the measured network, or resolution=coarse, written into the plan (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "convert":
            convert(args.images, args.labels, args.out, args.modality, args.label_names)
            return 0 if check(args.out) else 1
        if args.command == "check":
            return 0 if check(args.dataset_dir, args.dim) else 1
        config_file = bundle_config(args.dim)  # every --set key, before any work (the plan decides its keys)
        bundle = config_file.parents[1]
        problems = settings.check(dict(args.set), bundle, "train", exclude=planned_keys(config_file, dict(args.set)))
        if problems:
            raise PlanError(settings.report(problems, bundle, "train", "--set"))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        make_plan(args.dataset_dir, args.memory_gb, args.dim, device, dict(args.set), gflop=args.cpu_step_gflop)
        return 0
    except (DatasetError, ImageReadError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
