"""Synthetic CT-like datasets in the Medical Segmentation Decathlon layout.

Each case is a body in air (Hounsfield units) with a smooth bias field, Gaussian noise and anisotropic spacing;
a large deformed organ (class 1) holds a few small lesions (class 2, under 1% of the voxels), and an unlabelled
"distractor" organ of the same density as class 1 makes a plain intensity threshold fail. This is the data that
`make train` and the tests use, so it must be hard enough to need a network yet learnable in a few epochs.

Two more kinds (``--kind``) each favour one of the two bundles, for ``kfold select``: ``rods`` (3D) labels bright
rods that run through the whole volume and leaves discs of the same section unlabelled, so a single slice cannot
tell them apart; ``slabs`` (2D) are thin volumes of thick slices with solid squares (labelled) and hollow ones
(unlabelled) at the same places in every slice, each slice drawing anew which one a place shows, so the neighbouring
slices only mislead.

The ``nodule`` kind is a small target in a large volume, the case for a two-stage cascade (benchmarks/cascade.py):
CT-like volumes of 200 x 200 x 120 voxels of 1 x 1 x 1.5 mm with an organ of about 5 cm (class 1) somewhere in the
body, a nodule of about 10 mm on its surface (class 2, under 0.01% of the voxels) and unlabelled look-alikes of the
nodule farther from the organ, so that only where the organ lies tells the nodule from them.

``--test-cases N`` writes N more cases into ``imagesTs``/``labelsTs``, listed with their labels in dataset.json's
``test`` entries: held out from training, they score the K-fold ensemble (custom_components.kfold).

Usage: ``python -m custom_components.synthetic --out DIR --cases N --seed S [--dim 2|3]
[--kind organs|rods|slabs|nodule] [--empty N] [--lesion-cases I ...] [--test-cases N]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

AIR_HU = -1000.0
BODY_HU = 20.0  # soft tissue / fat mixture
ORGAN_HU = 70.0  # contrast-enhanced parenchyma (class 1); the distractor has the same density
LESION_HU = 25.0  # hypodense lesion inside the organ (class 2)
NOISE_HU = 18.0  # quantum noise standard deviation
BIAS_HU = 25.0  # amplitude of the smooth, low-frequency bias field
LABELS = {"0": "background", "1": "organ", "2": "lesion"}
SHAPE_NOISE = 0.25  # noise of the rods and slabs kinds, in units of the objects' contrast (objects 1, background 0)
NODULE_HU = 120.0  # enhancing nodule (class 2 of the nodule kind), and its unlabelled look-alikes
NODULE_RADIUS_MM = (4.5, 5.5)  # a sphere of about 10 mm across
NODULE_ORGAN_RADIUS_MM = (20.0, 28.0)  # the nodule kind's organ: semi-axes of about 5 cm across, kidney- or spleen-like
ORGAN_DEFORMATION = 0.2  # the nodule kind's organ surface moves by up to this fraction of its semi-axes
DECOY_MARGIN_MM = 25.0  # the look-alikes keep at least this far from the organ
DECOYS = (2, 4)  # look-alikes per case, at least and at most
PNG_OFFSET_HU = 1024  # 16-bit PNG/TIFF hold HU + 1024, as CT exports to unsigned images usually do
FORMATS = {"nifti": ".nii.gz", "png": ".png", "tiff": ".tif"}


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, sigma_fraction: float = 0.25) -> np.ndarray:
    """Zero-mean, unit-amplitude smooth random field: white noise blurred to a fraction of the extent."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=[max(1.0, s * sigma_fraction) for s in shape])
    return field / (np.abs(field).max() + 1e-8)


def _coarse_smooth_field(
    shape: tuple[int, ...], rng: np.random.Generator, sigma_fraction: float, factor: int = 4
) -> np.ndarray:
    """:func:`_smooth_field` drawn on a grid ``factor`` times coarser and interpolated up: the same kind of field,
    at a small fraction of the cost of blurring a large volume with a wide kernel."""
    coarse = tuple(max(2, -(-n // factor)) for n in shape)
    field = _smooth_field(coarse, rng, sigma_fraction)
    return ndimage.zoom(
        field, [n / c for n, c in zip(shape, coarse, strict=True)], order=1, mode="nearest", grid_mode=True
    )


def _ellipsoid_distance(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid distance: < 1 inside, computed in millimetres so anisotropy is physical."""
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))


def make_case(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    rng: np.random.Generator,
    foreground: bool = True,
    lesions: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like image (float32 HU) and its label map (uint8: 0 background, 1 organ, 2 lesion).

    ``foreground`` False leaves the organ and its lesions out (the distractor stays): a case without foreground,
    whose right answer is an empty label map. ``lesions`` False leaves the lesions out (the organ whole). Either
    draws the same random numbers, so the rest of the case, and every later case, is the same."""
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    extent = np.array([n * s for n, s in zip(shape, spacing, strict=True)])
    centre = extent / 2

    body = _ellipsoid_distance(grid, centre, extent * rng.uniform(0.42, 0.47, len(shape))) < 1
    # organ: an off-centre ellipsoid whose surface is pushed in and out by a smooth random field
    organ_centre = centre + extent * rng.uniform(-0.08, 0.08, len(shape))
    organ_radii = extent * rng.uniform(0.2, 0.26, len(shape))
    organ = (_ellipsoid_distance(grid, organ_centre, organ_radii) + 0.25 * _smooth_field(shape, rng)) < 1
    organ &= body
    # distractor: same density as the organ, unlabelled, on the opposite side of the body
    distractor_centre = 2 * centre - organ_centre + extent * np.sign(centre - organ_centre) * 0.12
    distractor_radii = extent * rng.uniform(0.08, 0.12, len(shape))
    distractor = (_ellipsoid_distance(grid, distractor_centre, distractor_radii) < 1) & body & ~organ

    # lesions: up to three spheres inside the organ, each at most 0.3% of the volume, so class 2 stays under 1%
    lesion = np.zeros(shape, dtype=bool)
    max_radius = np.cbrt(0.003 * np.prod(shape) * np.prod(spacing) * 3 / (4 * np.pi))
    organ_voxels = np.argwhere(ndimage.binary_erosion(organ, iterations=2))
    if len(organ_voxels) == 0:
        organ_voxels = np.argwhere(organ)
    for _ in range(rng.integers(1, 4)):
        centre_mm = organ_voxels[rng.integers(len(organ_voxels))] * np.asarray(spacing)
        radius = min(rng.uniform(3.0, 5.0), max_radius)
        lesion |= _ellipsoid_distance(grid, centre_mm, np.full(len(shape), radius)) < 1
    lesion &= organ
    if not foreground:
        organ[:] = lesion[:] = False
    if not lesions:
        lesion[:] = False

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body] = BODY_HU
    image[organ | distractor] = ORGAN_HU
    image[lesion] = LESION_HU
    image[body] += BIAS_HU * _smooth_field(shape, rng, 0.35)[body]
    image = ndimage.gaussian_filter(image, sigma=0.6)  # partial-volume blur at the edges
    image += rng.normal(0.0, NOISE_HU, shape).astype(np.float32)

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    return image.astype(np.float32), label


def _free_centres(shape: tuple[int, int], radius: float, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``count`` in-plane centres at least two radii plus two voxels apart and a radius from the border."""
    centres: list[np.ndarray] = []
    for _ in range(50 * count):
        centre = rng.uniform(radius + 1, np.asarray(shape) - radius - 1)
        if all(np.linalg.norm(centre - other) > 2 * radius + 2 for other in centres):
            centres.append(centre)
        if len(centres) == count:
            break
    return centres


def _shape_image(objects: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Objects of contrast 1 (per-object brightness 0.8-1.2 already in ``objects``), blurred, with Gaussian noise."""
    image = ndimage.gaussian_filter(objects.astype(np.float32), sigma=0.6)
    return (image + rng.normal(0.0, SHAPE_NOISE, objects.shape)).astype(np.float32)


def make_rods_case(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rods (class 1) through every slice and discs (unlabelled) three slices thick, of one section and brightness:
    only the extent across slices tells them apart."""
    radius = 0.09 * min(shape[:2])
    xy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    objects, label = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.uint8)
    for index, centre in enumerate(_free_centres(shape[:2], radius, 6, rng)):
        section = (xy[0] - centre[0]) ** 2 + (xy[1] - centre[1]) ** 2 < radius**2
        brightness = rng.uniform(0.8, 1.2)
        if index % 2 == 0:  # a rod
            objects[section] = brightness
            label[section] = 1
        else:  # a disc somewhere along the volume
            start = int(rng.integers(0, shape[2] - 2))
            objects[section, start : start + 3] = brightness
    return _shape_image(objects, rng), label


def make_slabs_case(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Solid squares (class 1) and hollow ones (unlabelled) of one size and brightness at a few places, each slice
    drawing anew which one a place shows: the in-plane pattern is all there is to learn, and the neighbouring slices,
    alike at a glance, say nothing about it."""
    half = 0.12 * min(shape[:2])
    xy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    objects, label = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.uint8)
    for centre in _free_centres(shape[:2], half * np.sqrt(2), 4, rng):
        distance = np.maximum(np.abs(xy[0] - centre[0]), np.abs(xy[1] - centre[1]))
        solid, hollow = distance < half, (distance < half) & (distance >= half - 2)
        for z in range(shape[2]):
            brightness = rng.uniform(0.8, 1.2)
            if rng.random() < 0.5:
                objects[solid, z] = brightness
                label[solid, z] = 1
            else:
                objects[hollow, z] = brightness
    return _shape_image(objects, rng), label


def _surface_point(
    organ: np.ndarray, centre: np.ndarray, direction: np.ndarray, spacing: np.ndarray
) -> np.ndarray | None:
    """The last point (mm) of the organ along the ray from its centre in ``direction``; None if it leaves the grid."""
    for step in np.arange(0.0, np.linalg.norm(np.asarray(organ.shape) * spacing), 0.5):
        index = np.round((centre + step * direction) / spacing).astype(int)
        if np.any(index < 0) or np.any(index >= organ.shape):
            return None
        if not organ[tuple(index)]:
            return centre + (step - 0.5) * direction
    return None


def make_nodule_case(
    shape: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A small target in a large CT-like volume (float32 HU; label uint8: 0 background, 1 organ, 2 nodule).

    A body in air holds a deformed ellipsoidal organ of about 5 cm (:data:`NODULE_ORGAN_RADIUS_MM`) somewhere in it,
    a sphere of about 10 mm (:data:`NODULE_RADIUS_MM`, :data:`NODULE_HU`) touching the organ's surface in a random
    direction, and :data:`DECOYS` unlabelled spheres of the same size and density at least
    :data:`DECOY_MARGIN_MM` from the organ: the nodule differs from them by where it lies alone. Drawn in mm, so
    the structures keep their size whatever the spacing."""
    step = np.asarray(spacing, dtype=float)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    extent = np.asarray(shape) * step
    centre = extent / 2
    body_radii = extent * rng.uniform(0.42, 0.47, 3)
    body = _ellipsoid_distance(grid, centre, body_radii) < 1

    organ_centre = centre + extent * rng.uniform(-0.15, 0.15, 3)
    organ_radii = rng.uniform(*NODULE_ORGAN_RADIUS_MM, 3)
    deformation = ORGAN_DEFORMATION * _coarse_smooth_field(shape, rng, 0.06)
    organ = ((_ellipsoid_distance(grid, organ_centre, organ_radii) + deformation) < 1) & body

    def inside_body(point: np.ndarray, margin: float) -> bool:
        return float(_ellipsoid_distance(list(point), centre, body_radii - margin)) < 1

    radius = rng.uniform(*NODULE_RADIUS_MM)
    nodule_centre = organ_centre  # kept only if none of 100 directions fits: a body this size always has one
    for _ in range(100):  # a direction whose surface point leaves the nodule inside the body
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        surface = _surface_point(organ, organ_centre, direction, step)
        if surface is not None and inside_body(surface + (radius + 1.0) * direction, radius + 2.0):
            nodule_centre = surface + (radius + 1.0) * direction  # 1 mm out: touching after the blur
            break
    nodule = _ellipsoid_distance(grid, nodule_centre, np.full(3, radius)) < 1

    # look-alikes: anywhere in the body outside the organ's largest extent widened by the margin, apart from each other
    widened = organ_radii * (1 + ORGAN_DEFORMATION) + DECOY_MARGIN_MM
    decoys = np.zeros(shape, dtype=bool)
    spheres: list[np.ndarray] = [nodule_centre]
    wanted = int(rng.integers(DECOYS[0], DECOYS[1] + 1))
    for _ in range(200 * wanted):  # as many as fit, up to ``wanted``
        point = rng.uniform(0, extent)
        decoy_radius = rng.uniform(*NODULE_RADIUS_MM)
        if (
            inside_body(point, decoy_radius + 2.0)
            and float(_ellipsoid_distance(list(point), organ_centre, widened)) >= 1
            and all(np.linalg.norm(point - other) > 4 * NODULE_RADIUS_MM[1] for other in spheres)
        ):
            decoys |= _ellipsoid_distance(grid, point, np.full(3, decoy_radius)) < 1
            spheres.append(point)
            if len(spheres) == wanted + 1:
                break

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body] = BODY_HU
    image[organ] = ORGAN_HU
    image[(nodule | decoys) & body] = NODULE_HU
    image[body] += BIAS_HU * _coarse_smooth_field(shape, rng, 0.35)[body]
    image = ndimage.gaussian_filter(image, sigma=0.6)  # partial-volume blur at the edges
    image += rng.normal(0.0, NOISE_HU, shape).astype(np.float32)

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[nodule & body] = 2
    return image.astype(np.float32), label


# dataset kinds: case maker, labels, modality, default shape and spacing (3D)
KINDS = {
    "organs": (None, LABELS, "CT", (96, 96, 40), (0.8, 0.8, 2.5)),
    "rods": (make_rods_case, {"0": "background", "1": "rod"}, "MR", (40, 40, 24), (1.0, 1.0, 1.0)),
    "slabs": (make_slabs_case, {"0": "background", "1": "square"}, "MR", (48, 48, 6), (0.8, 0.8, 5.0)),
    "nodule": (
        make_nodule_case,
        {"0": "background", "1": "organ", "2": "nodule"},
        "CT",
        (200, 200, 120),
        (1.0, 1.0, 1.5),
    ),
}


def write_dataset(
    out: str | Path,
    cases: int,
    seed: int = 0,
    dim: int = 3,
    shape: tuple[int, ...] | None = None,
    spacing: tuple[float, ...] | None = None,
    image_format: str = "nifti",
    kind: str = "organs",
    empty_cases: int = 0,
    lesion_cases: Collection[int] | None = None,
    test_cases: int = 0,
) -> Path:
    """Write ``cases`` synthetic cases with an MSD ``dataset.json``; returns the dataset folder.

    Case sizes vary by up to +-15% around ``shape`` so that no two volumes share a grid, as in real data.
    ``image_format`` png or tiff (2D only) writes 16-bit images of HU + 1024 and 8-bit label maps, which carry
    no spacing: the form 2D datasets often come in. ``kind`` (:data:`KINDS`): the CT-like organs, or the 3D
    ``rods`` and the thin ``slabs`` (volumes only, float32 MR-like intensities). The last ``empty_cases`` cases
    (organs only) have no organ and no lesion: a label map of background alone. ``lesion_cases`` (organs only): the
    indices of the cases that hold lesions, the others an organ alone (None: every case with an organ), so that the
    lesion class is as rare among the cases as a study needs. ``test_cases`` more cases (drawn after the training
    cases, which they leave unchanged; every one with its foreground) go to ``imagesTs``/``labelsTs`` and dataset.json's
    ``test`` entries, with their labels: held-out cases that score the K-fold ensemble.
    """
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if image_format not in FORMATS or (image_format != "nifti" and dim != 2):
        raise ValueError(f"image_format must be one of {list(FORMATS)} (png and tiff for dim 2), got {image_format}")
    if kind not in KINDS or (kind != "organs" and dim != 3):
        raise ValueError(f"kind must be one of {list(KINDS)} (all but organs are volumes: dim 3), got {kind}")
    if not 0 <= empty_cases <= cases or (empty_cases and kind != "organs"):
        raise ValueError(f"empty_cases must be between 0 and cases={cases} (organs only), got {empty_cases}")
    if lesion_cases is not None and (kind != "organs" or not set(lesion_cases) <= set(range(cases))):
        raise ValueError(f"lesion_cases must be case indices below cases={cases} (organs only), got {lesion_cases}")
    if test_cases < 0:
        raise ValueError(f"test_cases must be 0 or more, got {test_cases}")
    maker, labels, modality, default_shape, default_spacing = KINDS[kind]
    shape = tuple(shape or (default_shape if dim == 3 else (128, 128)))
    spacing = tuple(spacing or (default_spacing if dim == 3 else (0.8, 0.8)))
    if len(shape) != dim or len(spacing) != dim:
        raise ValueError(f"shape {shape} and spacing {spacing} must both have {dim} entries")
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def write_case(index: int, part: str, foreground: bool, lesions: bool) -> dict[str, str]:
        """Draw case ``index`` and write it into ``images<part>``/``labels<part>``; its dataset.json entry."""
        case_shape = tuple(int(round(n * rng.uniform(0.85, 1.15))) for n in shape)
        if maker is None:
            image, label = make_case(case_shape, spacing, rng, foreground, lesions)
        elif maker is make_nodule_case:  # drawn in millimetres, as the organs
            image, label = maker(case_shape, spacing, rng)
        else:
            image, label = maker(case_shape, rng)
        affine = np.diag([*spacing, *([1.0] * (3 - dim)), 1.0])
        affine[:dim, 3] = rng.uniform(-50, 50, dim)  # scanner origin differs between cases
        name = f"case_{index:03d}{FORMATS[image_format]}"
        images, labels = out / f"images{part}", out / f"labels{part}"
        if image_format == "nifti":
            stored = np.round(image).astype(np.int16) if modality == "CT" else image  # HU as CT stores them
            nib.save(nib.Nifti1Image(stored, affine), images / name)
            nib.save(nib.Nifti1Image(label, affine), labels / name)
        else:  # (x, y) -> (rows, columns)
            stored = np.clip(np.round(image) + PNG_OFFSET_HU, 0, 65535).astype(np.uint16)
            Image.fromarray(stored.T).save(images / name)
            Image.fromarray(label.T).save(labels / name)
        return {"image": f"./{images.name}/{name}", "label": f"./{labels.name}/{name}"}

    training = [
        write_case(index, "Tr", index < cases - empty_cases, lesion_cases is None or index in lesion_cases)
        for index in range(cases)
    ]
    if test_cases:
        (out / "imagesTs").mkdir(exist_ok=True)
        (out / "labelsTs").mkdir(exist_ok=True)
    test = [write_case(index, "Ts", True, True) for index in range(cases, cases + test_cases)]
    description = {
        "name": f"Synthetic{dim}D" + ("" if kind == "organs" else f"-{kind}"),
        "description": f"Synthetic {kind} ({', '.join(list(labels.values())[1:])}) made by custom_components.synthetic",
        "tensorImageSize": f"{dim}D",
        "modality": {"0": modality},
        "labels": labels,
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
    }
    (out / "dataset.json").write_text(json.dumps(description, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder to write (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("--cases", type=int, default=12, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data")
    parser.add_argument("--dim", type=int, default=3, choices=(2, 3), help="3: volumes; 2: native 2D images")
    parser.add_argument("--shape", type=int, nargs="+", help="typical grid size in voxels (default 96 96 40 / 128 128)")
    parser.add_argument("--format", default="nifti", choices=list(FORMATS), help="png/tiff: 2D images, no spacing")
    parser.add_argument("--spacing", type=float, nargs="+", help="voxel size in mm (default 0.8 0.8 2.5 / 0.8 0.8)")
    parser.add_argument(
        "--kind",
        default="organs",
        choices=list(KINDS),
        help="organs: CT-like; rods: favours 3D; slabs: favours 2D; nodule: a 10 mm target in a large volume",
    )
    parser.add_argument("--empty", type=int, default=0, help="the last N cases without foreground (organs only)")
    parser.add_argument(
        "--lesion-cases", type=int, nargs="+", help="indices of the cases with lesions (default: all; organs only)"
    )
    parser.add_argument(
        "--test-cases", type=int, default=0, help="N more cases into imagesTs/labelsTs, dataset.json's labelled test"
    )
    args = parser.parse_args(argv)
    out = write_dataset(
        args.out,
        args.cases,
        args.seed,
        args.dim,
        args.shape,
        args.spacing,
        args.format,
        args.kind,
        args.empty,
        args.lesion_cases,
        args.test_cases,
    )
    print(
        f"wrote {args.cases} {args.dim}D cases to {out}"
        + (f" and {args.test_cases} test cases" if args.test_cases else "")
    )


if __name__ == "__main__":
    main()
