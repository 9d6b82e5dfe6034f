"""Reading images from disk: the one place that does, so every part of the project sees what training sees.

The dataset checks, the fingerprint, the K-fold splits and scores and ``prepare convert`` all read through
:func:`read_image` (voxels) or :func:`read_header` (shape and geometry). Each format goes through the reader
MONAI's ``LoadImage`` picks for it in the bundles, with the same axis order and affine:

- NIfTI: nibabel (MONAI's ``NibabelReader``), the affine nibabel derives from the sform/qform.
- PNG: Pillow (MONAI's ``PILReader``), (rows, columns) -> (x, y), 1 mm pixels (identity affine), channels last.
- TIFF, and what else ITK reads (a DICOM series folder, NRRD, MHA/MHD): MONAI's ``ITKReader``, which keeps ITK's
  spacing, origin and direction in RAS. ``LoadImage`` reads TIFF with ITK (``PILReader`` does not claim it), so
  a TIFF's pixel size is ITK's: 1 mm, or what its resolution tags say.

Arrays are indexed (x, y[, z][, channel]); affines are 4x4 (2D images embedded), as ``nib.affines`` expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import ITKReader
from monai.data.utils import orientation_ras_lps, to_affine_nd
from PIL import Image

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PLANAR_SUFFIXES = (".png", ".tif", ".tiff")  # 2D pictures: 1 mm pixels (a TIFF's resolution tags if it has them)
IMAGE_SUFFIXES = NIFTI_SUFFIXES + PLANAR_SUFFIXES  # what the bundles train on
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # read by ITK as well, for `prepare convert`
PIL_SUFFIXES = (".png",)  # the planar suffixes MONAI's LoadImage gives to PILReader; TIFF goes to ITKReader


class ImageReadError(ValueError):
    """A file (or DICOM series folder) that cannot be read: ``path``, what is wrong (``problem``) and the ``fix``."""

    def __init__(self, path: str | Path, problem: str, fix: str = "re-export the file") -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path} {problem}: {fix}")


@dataclass(frozen=True)
class ImageHeader:
    """What an image is without its voxels: array shape (x, y[, z][, channel]) and 4x4 affine (mm, RAS)."""

    shape: tuple[int, ...]
    affine: np.ndarray


def _reader(path: Path) -> str:
    """``nifti``, ``pil`` or ``itk``: the reader MONAI's ``LoadImage`` uses for this path."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return "pil" if name.endswith(PIL_SUFFIXES) else "itk"


def _reason(err: Exception) -> str:
    """A reader's exception on one line: ITK's name a source file first, then ``ITK ERROR: Class(0x..): what``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        match = re.search(r"(?:ITK ERROR: \S+\(0x[0-9a-fA-F]+\):|Description:)\s*(.+)", line)
        if match:
            return match.group(1)
    return lines[0] if lines else type(err).__name__


def _check_exists(path: Path) -> None:
    """A missing path as an :class:`ImageReadError`, before a reader reports it in its own words."""
    if not path.exists():
        raise ImageReadError(path, "does not exist", "fix the path")


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (x, y[, z][, channel]) and 4x4 affine of an image, as MONAI's ``LoadImage`` reads them.

    Values keep the file's type (``LoadImage`` casts to float32 later). Any failure, a missing or truncated
    file included, raises :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    _check_exists(path)
    try:
        kind = _reader(path)
        if kind == "nifti":
            nii = nib.load(path)
            return np.asanyarray(nii.dataobj), nii.affine
        if kind == "pil":
            with Image.open(path) as picture:
                pixels = np.array(picture)  # a copy: writable, unlike Pillow's buffer
            return np.swapaxes(pixels, 0, 1), np.eye(4)  # (rows, columns) -> (x, y), as PILReader
        reader = ITKReader()
        array, meta = reader.get_data(reader.read(str(path)))
        return np.asarray(array), to_affine_nd(3, np.asarray(meta["affine"], dtype=float))
    except Exception as err:  # each reader raises its own types (and zlib, EOF, OS errors) for corrupt files
        raise ImageReadError(path, f"cannot be read ({_reason(err)})") from err


def _itk_header(path: Path) -> ImageHeader:
    """Shape and affine of one file ITK reads, from its header: the geometry ``ITKReader`` gives, without voxels."""
    import itk  # only for the formats nibabel and Pillow do not read

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError("no ITK reader recognises the file")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    dims = io.GetNumberOfDimensions()
    components = io.GetNumberOfComponents()
    shape = tuple(int(io.GetDimensions(axis)) for axis in range(dims)) + ((components,) if components > 1 else ())
    spatial = min(dims, 3)
    direction = np.array([io.GetDirection(axis)[:spatial] for axis in range(spatial)]).T  # column i: axis i
    affine = np.eye(spatial + 1)
    affine[:spatial, :spatial] = direction @ np.diag([io.GetSpacing(axis) for axis in range(spatial)])
    affine[:spatial, -1] = [io.GetOrigin(axis) for axis in range(spatial)]
    return ImageHeader(shape, to_affine_nd(3, orientation_ras_lps(affine)))


def read_header(path: str | Path) -> ImageHeader:
    """Shape and affine of an image, read from its header where the format has one (NIfTI, PNG, TIFF, NRRD,
    MHA): milliseconds per file. A DICOM series folder is read whole. Failures raise :class:`ImageReadError`."""
    path = Path(path)
    _check_exists(path)
    if path.is_dir():  # a DICOM series: its geometry needs every slice
        array, affine = read_image(path)
        return ImageHeader(array.shape, affine)
    try:
        kind = _reader(path)
        if kind == "nifti":
            nii = nib.load(path)  # the header; the voxels stay on disk
            return ImageHeader(tuple(int(n) for n in nii.shape), nii.affine)
        if kind == "pil":
            with Image.open(path) as picture:  # the header; the pixels are decoded on first access only
                channels = len(picture.getbands())
                return ImageHeader(picture.size + ((channels,) if channels > 1 else ()), np.eye(4))
        return _itk_header(path)
    except Exception as err:  # each reader raises its own types for corrupt files
        raise ImageReadError(path, f"cannot be read ({_reason(err)})") from err
