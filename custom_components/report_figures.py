"""The report page's figures: the learning curves, and a case drawn in three planes with its label and prediction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from custom_components.data import voxel_sizes
from custom_components.figures import png_bytes, pyplot
from custom_components.imageio import ImageReadError, read_image
from custom_components.kfold.layout import (
    PREDICTIONS_DIR,
)
from custom_components.report_sources import PLANES, Source, finite


def plot_curves(source: Source) -> bytes:
    """Training loss and validation Dice per epoch: per class for a run, one line per fold for a K-fold folder."""
    plt = pyplot()
    figure, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 4))
    several = len(source.curves) > 1
    for index, (name, rows) in enumerate(source.curves.items()):
        colour = plt.get_cmap("tab10")(index % 10)
        label = name if several else "mean"
        epochs = [row.get("epoch") for row in rows]
        loss_ax.plot(epochs, [row.get("train_loss") for row in rows], marker=".", color=colour, label=name)
        validated = [row for row in rows if row.get("val_mean_dice") is not None]
        val_epochs = [row["epoch"] for row in validated]
        dice_ax.plot(val_epochs, [row["val_mean_dice"] for row in validated], marker="o", color=colour, label=label)
        for class_index, class_name in enumerate([] if several else source.class_names):
            values = [row.get(f"dice_{class_name}") for row in validated]
            if any(value is not None for value in values):
                style = {"marker": ".", "linestyle": "--", "color": plt.get_cmap("tab10")((class_index + 1) % 10)}
                dice_ax.plot(val_epochs, values, label=class_name, **style)
    if source.best_epoch is not None:
        dice_ax.axvline(source.best_epoch, color="grey", linestyle=":", label="best epoch")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    dice_ax.set(title="validation Dice", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    if several:
        loss_ax.legend(fontsize="small")
    if dice_ax.get_legend_handles_labels()[0]:  # nothing validated (num_folds 1): no legend to draw
        dice_ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return png_bytes(figure)


def _spatial(array: np.ndarray, dims: int) -> np.ndarray:
    """``array`` cut to ``dims`` axes: trailing axes (channels, single axes) reduced to their first entry."""
    while array.ndim > dims:
        array = array[..., 0]
    return array


def _to_ras(arrays: Sequence[np.ndarray | None], affine: np.ndarray) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Volumes of one grid with their axes turned to the closest RAS order (no resampling), and the orientation
    (nibabel's: per voxel axis, the RAS axis it became and whether it was flipped)."""
    orientation = nib.orientations.io_orientation(affine)
    return [None if a is None else nib.orientations.apply_orientation(a, orientation) for a in arrays], orientation


def _file_slice(orientation: np.ndarray, axis: int, index: int, size: int) -> int:
    """Slice ``index`` across RAS axis ``axis`` numbered as in the file (before the turn of :func:`_to_ras`)."""
    source = int(np.flatnonzero(orientation[:, 0] == axis)[0])
    return index if orientation[source, 1] > 0 else size - 1 - index


def _fullest_slice(masks: Sequence[np.ndarray | None], axis: int, size: int) -> int:
    """The slice across ``axis`` with the most foreground of the first non-empty mask; the middle one if none is."""
    for mask in masks:
        if mask is not None and mask.any():
            return int(np.argmax(mask.sum(axis=tuple(i for i in range(mask.ndim) if i != axis))))
    return size // 2


def _load_case(case: Mapping[str, Any]) -> tuple[dict[str, np.ndarray | None], np.ndarray | None, list[str]]:
    """Image, reference and prediction of a case on the image's grid (spatial axes only), its affine, and what is
    missing or unusable, in words."""
    problems: list[str] = []
    arrays: dict[str, np.ndarray | None] = {"image": None, "reference": None, "prediction": None}
    if case.get("image") is None:
        return arrays, None, ["image path unknown: neither the evaluation nor the run's dataset.json names it"]
    try:
        image, affine = read_image(case["image"])
    except ImageReadError as err:
        return arrays, None, [str(err)]
    for key, what in (("label", "reference"), ("prediction", "prediction")):
        if case.get(key) is None:
            problems.append(f"no {what}" + (f" (none in {PREDICTIONS_DIR})" if key == "prediction" else ""))
            continue
        try:
            arrays[what] = np.asarray(read_image(case[key])[0])
        except ImageReadError as err:
            problems.append(str(err))
    dims = min(next((a.ndim for a in arrays.values() if a is not None), image.ndim), 3)
    arrays["image"] = _spatial(np.asarray(image, dtype=np.float32), dims)
    for what in ("reference", "prediction"):
        if arrays[what] is not None:
            labels = _spatial(arrays[what], dims)
            if labels.shape != arrays["image"].shape:
                problems.append(
                    f"the {what}'s grid {labels.shape} is not the image's {arrays['image'].shape}: not drawn"
                )
                labels = None
            arrays[what] = labels
    return arrays, affine, problems


@dataclass(frozen=True)
class Plane:
    """One panel of a case figure: slices indexed (horizontal, vertical), drawn ``aspect`` times taller than wide
    per voxel (the spacing ratio, so a millimetre is as long either way)."""

    title: str
    image: np.ndarray
    reference: np.ndarray | None
    prediction: np.ndarray | None
    aspect: float
    top_down: bool  # a 2D picture: its first row on top, as it is drawn


def case_planes(
    image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray | None, affine: np.ndarray
) -> list[Plane]:
    """The panels of a case: for a volume (turned to RAS) its axial, coronal and sagittal slice with the most
    foreground (reference, else prediction, else the middle one), numbered as in the file; a 2D image whole."""
    if image.ndim == 2:
        spacing = voxel_sizes(affine, 2)
        return [Plane("image", image, reference, prediction, float(spacing[1] / spacing[0]), top_down=True)]
    (image, reference, prediction), orientation = _to_ras([image, reference, prediction], affine)
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = voxel_sizes(affine, 3)
    masks = [None if labels is None else labels > 0 for labels in (reference, prediction)]
    planes = []
    for name, axis in PLANES:
        horizontal, vertical = (index for index in range(3) if index != axis)
        index = _fullest_slice(masks, axis, image.shape[axis])
        cut = [
            None if volume is None else np.take(volume, index, axis=axis) for volume in (image, reference, prediction)
        ]
        title = f"{name}, slice {_file_slice(orientation, axis, index, image.shape[axis])}"
        planes.append(Plane(title, *cut, aspect=float(spacing[vertical] / spacing[horizontal]), top_down=False))
    return planes


def plot_case(case: Mapping[str, Any], class_names: Sequence[str]) -> tuple[bytes | None, list[str]]:
    """The case's image (grey, 1st-99th percentile) with reference (solid) and prediction (dashed) contours in one
    colour per class, in the panels of :func:`case_planes`.

    Returns the PNG (None when the image cannot be read) and what is missing, in words."""
    arrays, affine, problems = _load_case(case)
    if affine is None:
        return None, problems
    low, high = (float(v) for v in np.percentile(arrays["image"], [1, 99]))
    high = high if high > low else low + 1.0
    planes = case_planes(arrays["image"], arrays["reference"], arrays["prediction"], affine)
    plt = pyplot()
    colours = [plt.get_cmap("tab10")(index % 10) for index in range(1, len(class_names) + 1)]
    figure, axes = plt.subplots(1, len(planes), figsize=(4 * len(planes), 4.6), squeeze=False)
    for ax, plane in zip(axes[0], planes, strict=True):
        ax.imshow(plane.image.T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=plane.aspect)
        for labels, style in ((plane.reference, "solid"), (plane.prediction, "dashed")):
            for value, colour in enumerate(colours, start=1):
                if labels is not None and min(labels.shape) > 1 and (labels == value).any():
                    mask = (labels == value).T.astype(np.float32)
                    ax.contour(mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
        if plane.top_down:
            ax.invert_yaxis()
        ax.set_title(plane.title, fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], color=colour, label=name) for colour, name in zip(colours, class_names, strict=True)]
    handles += [
        plt.Line2D([], [], color="black", label="reference"),
        plt.Line2D([], [], color="black", linestyle="dashed", label="prediction"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return png_bytes(figure), problems


def chosen_cases(cases: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """The best, median and worst case by mean Dice (ties broken by case id), each once with its role(s)."""
    ranked = sorted((row["mean_dice"], case) for case, row in cases.items() if finite([row.get("mean_dice")]))
    if not ranked:
        return []
    picks = (("best", ranked[-1][1]), ("median", ranked[len(ranked) // 2][1]), ("worst", ranked[0][1]))
    roles: dict[str, list[str]] = {}
    for role, case in picks:
        roles.setdefault(case, []).append(role)
    return list(roles.items())
