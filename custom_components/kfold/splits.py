"""Cross-validation splits: K-fold, stratified (by the label maps or a dataset.json field), grouped, repeated, LOO.

The splits are deterministic from a seed and written in nnU-Net's ``splits_final.json`` form (a list of
``{"train": [case ids], "val": [case ids]}``), which ``custom_components.data.split_datalist`` reads.
scikit-learn's splitters cover neither multi-label stratification nor its combination with groups, so the
iterative stratification of Sechidis et al. (2011) is implemented here, on groups of cases as well as on cases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom_components.data import case_id, voxel_sizes
from custom_components.imageio import read_image

logger = logging.getLogger(__name__)

SIZE_BINS = ("small", "medium", "large")  # foreground-size strata of --stratify auto, at most three
CLASS_STRATUM = "class "  # name prefix of the class-presence strata of --stratify auto


class KFoldError(ValueError):
    """An impossible or inconsistent cross-validation request; the message names the option and the fix."""


def describe_cases(datalist: Sequence[dict[str, Any]], class_names: Sequence[str], image_dims: int) -> list[dict]:
    """Per case: its id, the foreground classes its label map contains and its foreground size.

    The size is in mm^3 (mm^2 for 2D images; PNG pixels are 1 mm), from the voxel sizes of the affine as the
    bundles see them. The other dataset.json fields of the entry are kept, so that a ``--stratify KEY`` or
    ``--group KEY`` field travels with the case. Reads every label map once.
    """
    cases = []
    for item in datalist:
        data, affine = read_image(item["label"])
        voxel = float(np.prod(voxel_sizes(affine, image_dims)))
        present = [name for value, name in enumerate(class_names, start=1) if np.any(data == value)]
        fields = {key: value for key, value in item.items() if key not in ("image", "label")}
        cases.append(
            {
                **fields,
                "case": case_id(item["image"]),
                "classes": present,
                "foreground_size": float(np.count_nonzero(data) * voxel),
            }
        )
    return cases


def _field(cases: Sequence[dict], key: str, option: str, dataset_json: Path) -> list[str]:
    """The value of dataset.json field ``key`` in every case; every entry must have it."""
    missing = [case["case"] for case in cases if key not in case]
    if missing:
        raise KFoldError(
            f"{option} {key}: {len(missing)} training entries of {dataset_json} have no '{key}' field "
            f"(first: {missing[:3]}); add it to every entry or choose another field"
        )
    return [str(case[key]) for case in cases]


def strata(
    cases: Sequence[dict], stratify: str, folds: int, class_names: Sequence[str], dataset_json: Path
) -> tuple[np.ndarray, list[str]]:
    """The 0/1 matrix (cases x strata) that the folds must balance, and the strata names.

    ``auto``: one column per foreground class (the case contains it) and one per foreground-size bin (quantile
    bins, at most three, each with at least ``folds`` cases where possible); ``none``: no columns; any other
    value: the dataset.json field of that name, one column per value.
    """
    if stratify == "none":
        return np.zeros((len(cases), 0), dtype=int), []
    if stratify == "auto":
        present = np.array([[name in case["classes"] for name in class_names] for case in cases], dtype=int)
        names = [f"{CLASS_STRATUM}{name}" for name in class_names]
        bins = max(1, min(len(SIZE_BINS), len(cases) // folds))
        if bins == 1:
            return present, names
        sizes = np.array([case["foreground_size"] for case in cases])
        edges = np.quantile(sizes, np.linspace(0, 1, bins + 1)[1:-1])
        size_bin = np.digitize(sizes, edges, right=True)
        labels = SIZE_BINS if bins == len(SIZE_BINS) else (SIZE_BINS[0], SIZE_BINS[-1])
        one_hot = (size_bin[:, None] == np.arange(bins)[None, :]).astype(int)
        return np.hstack([present, one_hot]), names + [f"foreground {label}" for label in labels]
    values = _field(cases, stratify, "--stratify", dataset_json)
    levels = sorted(set(values))
    return np.array([[value == level for level in levels] for value in values], dtype=int), [
        f"{stratify}={level}" for level in levels
    ]


def _warn_thin_strata(carriers: np.ndarray, names: Sequence[str], folds: int, units: str) -> None:
    """A stratum carried by fewer cases (or groups) than folds cannot reach every fold: say so, and what it means."""
    for name, count in zip(names, carriers, strict=True):
        if count == 0:
            logger.warning("%s is in no case: its Dice is undefined in every fold", name)
        elif count < folds:
            undefined = " (its Dice is undefined there)" if name.startswith(CLASS_STRATUM) else ""
            logger.warning(
                "%s is in only %d %s, fewer than the %d folds: %d fold(s) validate without it%s",
                name,
                count,
                units,
                folds,
                folds - count,
                undefined,
            )


def iterative_stratification(counts: np.ndarray, sizes: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """The fold of every unit (a case, or a group of cases), balancing each stratum and the fold sizes.

    Sechidis et al. (2011): strata are taken rarest first; each unit carrying the stratum goes to the fold that
    still wants most of it, ties broken by how much the fold wants the unit's other strata, then by free room,
    then at random. ``counts`` (units x strata) counts each unit's cases per stratum, ``sizes`` its cases. A fold
    takes a unit only while it stays within its share (sizes differ by one case at most) if any fold has room.
    """
    units, _ = counts.shape
    total = int(sizes.sum())
    floor, extra = divmod(total, folds)
    label_total = np.maximum(counts.sum(axis=0), 1)
    want = np.tile(counts.sum(axis=0) / folds, (folds, 1)).astype(float)  # folds x strata still wanted
    room = np.full(folds, total / folds)  # cases each fold still wants
    fold_size = np.zeros(folds, dtype=int)
    fold_of = np.full(units, -1)
    has = counts > 0

    def candidates(size: int) -> np.ndarray:
        after = fold_size + size
        over = np.count_nonzero(fold_size > floor)
        fits = (after <= floor) | ((after <= floor + 1) & (fold_size <= floor) & (over < extra))
        return np.flatnonzero(fits) if fits.any() else np.flatnonzero(np.isclose(room, room.max()))

    def best(options: np.ndarray, score: np.ndarray) -> np.ndarray:
        return options[np.isclose(score, score.max())]

    while (fold_of < 0).any():
        open_units = fold_of < 0
        carriers = has[open_units].sum(axis=0)
        if carriers.any():
            label = int(np.argmin(np.where(carriers > 0, carriers, np.iinfo(int).max)))  # first column on ties
            chosen = np.flatnonzero(open_units & has[:, label])
        else:
            label = -1
            chosen = np.flatnonzero(open_units)
        chosen = rng.permutation(chosen)
        for unit in chosen[np.argsort(-sizes[chosen], kind="stable")]:  # large groups first: they pack worst
            options = candidates(int(sizes[unit]))
            if label >= 0:
                options = best(options, want[options, label])
                options = best(options, (want[options][:, has[unit]] / label_total[has[unit]]).sum(axis=1))
            options = best(options, room[options])
            fold = int(rng.choice(options))
            fold_of[unit] = fold
            fold_size[fold] += sizes[unit]
            room[fold] -= sizes[unit]
            want[fold] -= counts[unit]
    return fold_of


def make_splits(
    cases: Sequence[dict],
    folds: int,
    seed: int,
    stratify: str,
    group: str | None,
    repeats: int,
    class_names: Sequence[str],
    dataset_json: Path,
) -> list[dict[str, list[str]]]:
    """``repeats`` x ``folds`` train/val splits of the cases, repeat ``r`` drawn with ``seed + r``.

    ``folds`` equal to the number of cases (of groups with ``group``) is leave-one-out. Impossible requests
    raise :class:`KFoldError` before anything is trained; strata too thin for every fold only warn.
    """
    n = len(cases)
    if folds < 2:
        raise KFoldError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if repeats < 1:
        raise KFoldError(f"--repeats {repeats}: repeat K-fold at least once")
    if folds > n:
        raise KFoldError(
            f"--folds {folds} but {dataset_json} lists {n} training cases: use --folds {n} (leave-one-out) or fewer"
        )
    group_of = _field(cases, group, "--group", dataset_json) if group else [case["case"] for case in cases]
    group_names = sorted(set(group_of))
    index_of = {name: index for index, name in enumerate(group_names)}
    unit_of = np.array([index_of[value] for value in group_of])
    if folds > len(group_names):
        raise KFoldError(
            f"--group {group} makes {len(group_names)} groups, fewer than --folds {folds}: a group never sits on "
            f"both sides, so use --folds {len(group_names)} or fewer, or drop --group"
        )
    sizes = np.bincount(unit_of, minlength=len(group_names))
    if group and sizes.max() > n / folds:
        logger.warning(
            "--group %s: group '%s' holds %d of %d cases, more than a fold's share (%.1f): fold sizes will differ",
            group,
            group_names[int(sizes.argmax())],
            sizes.max(),
            n,
            n / folds,
        )
    leave_one_out = folds == len(group_names)
    if leave_one_out and repeats > 1:
        logger.warning("leave-one-out gives the same folds for every seed: --repeats %d is run once", repeats)
        repeats = 1
    matrix, names = strata(cases, "none" if leave_one_out else stratify, folds, class_names, dataset_json)
    counts = np.zeros((len(group_names), matrix.shape[1]), dtype=int)  # per group (case), cases in each stratum
    np.add.at(counts, unit_of, matrix)
    _warn_thin_strata((counts > 0).sum(axis=0), names, folds, f"'{group}' group(s)" if group else "case(s)")
    ids = [case["case"] for case in cases]
    splits = []
    for repeat in range(repeats):
        fold_of_unit = iterative_stratification(counts, sizes, folds, np.random.default_rng(seed + repeat))
        fold_of_case = fold_of_unit[unit_of]
        for fold in range(folds):
            splits.append(
                {
                    "train": [c for c, f in zip(ids, fold_of_case, strict=True) if f != fold],
                    "val": [c for c, f in zip(ids, fold_of_case, strict=True) if f == fold],
                }
            )
    return splits


def load_splits(path: str | Path, case_ids: Sequence[str]) -> list[dict[str, list[str]]]:
    """A splits file given by the user (nnU-Net form, case ids or paths), checked and reduced to case ids."""
    path = Path(path)
    if not path.is_file():
        raise KFoldError(f"--splits_file {path} does not exist: pass an existing splits_final.json or leave it out")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KFoldError(f"--splits_file {path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    shape_ok = isinstance(splits, list) and splits and all(isinstance(s, dict) for s in splits)
    if not shape_ok or not all(isinstance(s.get(k), list) for s in splits for k in ("train", "val")):
        raise KFoldError(f"--splits_file {path} must be a non-empty list of {{'train': [...], 'val': [...]}}")
    known = set(case_ids)
    checked = []
    for index, split in enumerate(splits):
        train, val = [case_id(c) for c in split["train"]], [case_id(c) for c in split["val"]]
        unknown = sorted(set(train + val) - known)
        if unknown:
            raise KFoldError(f"--splits_file {path} fold {index} names cases not in dataset.json: {unknown[:5]}")
        if not val or set(train) & set(val):
            raise KFoldError(f"--splits_file {path} fold {index} needs validation cases that are not also trained on")
        checked.append({"train": train, "val": val})
    return checked
