"""``kfold select``: 2D, 3D or both, decided for one dataset by cross-validation, as nnU-Net's
``find_best_configuration`` decides between its configurations.

Each bundle is planned for the dataset (``prepare plan``: spacing, intensity, patch and batch), then
cross-validated on one set of splits (``OUT/splits.json``) into ``OUT/<bundle>/``, a ``kfold run`` folder of its own
(resumable; ``kfold report`` and ``kfold predict`` work on it). Each fold's scoring also writes the class
probabilities of its validation cases on their own image grid, so that every configuration and every ensemble of
configurations (their probabilities averaged) is scored out of fold on the same grid, with no retraining. The best
mean foreground Dice wins; a paired bootstrap over the cases gives the interval of its lead over each other
configuration. Written: ``selection.json``, ``selection.md``, ``selection.png``; ``kfold predict OUT`` then predicts
with the winner.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from custom_components import settings
from custom_components.bundle import changed_options
from custom_components.data import case_id, check_datalist, load_dataset_json
from custom_components.figures import png_bytes, pyplot
from custom_components.imageio import read_image
from custom_components.kfold.bundle import Bundle, parse_set
from custom_components.kfold.ensemble import predict
from custom_components.kfold.evaluation import label_dice
from custom_components.kfold.layout import (
    PREDICTIONS_DIR,
    SPLIT_FIELDS,
    SPLITS_FILE,
    fold_layout,
    read_list,
    read_state,
)
from custom_components.kfold.report import bootstrap_ci
from custom_components.kfold.runner import complete_cv, plan_cv
from custom_components.kfold.select_files import (
    BUNDLE_FIX,
    SELECT_SPLITS_FIX,
    SELECT_STATE,
    SELECTION_FILE,
    read_select_state,
    read_selection,
)
from custom_components.kfold.splits import KFoldError, describe_cases, make_splits
from custom_components.paths import REPO_ROOT
from custom_components.run_files import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

SELECTION_MD = "selection.md"
SELECTION_PNG = "selection.png"
ENSEMBLE_JOIN = "+"  # an ensemble's name: its members joined, e.g. unet2d+unet3d
DEFAULT_BUNDLES = ("unet2d", "unet3d")
SELECT_IDENTITY = ("bundles", "dataset_dir", "folds", "seed", "overrides", "time_budget_min", "memory_gb")
PROBABILITIES = {"save_probabilities": True}  # each fold's scoring keeps its validation cases' probabilities
# `--cascade`: the 3D bundle's cascade as three more configurations, stage 1 cross-validated first, then stage 2 on
# its out-of-fold maps as channels (nnU-Net's) and on crops around them
COARSE, CASCADE, CASCADE_CROP = "unet3d_coarse", "unet3d_cascade", "unet3d_cascade_crop"


def find_bundles(names: Sequence[str]) -> dict[str, Bundle]:
    """Each ``--bundles`` entry as a bundle by name: a folder of the repository's ``bundles/`` or a path."""
    found: dict[str, Bundle] = {}
    for name in names:
        path = Path(name) if Path(name).is_dir() else REPO_ROOT / "bundles" / name
        bundle = Bundle.find(path)
        if bundle.path.name in found:
            raise KFoldError(f"--bundles names {bundle.path.name} twice: give each bundle once")
        found[bundle.path.name] = bundle
    if not found:
        raise KFoldError("--bundles names no bundle: give one or more, e.g. --bundles unet2d unet3d")
    return found


def configurations(names: Sequence[str], cascade: bool, output: Path) -> dict[str, tuple[Bundle, dict[str, Any]]]:
    """Each configuration to cross-validate: its bundle and the keys that make it what it is. The ``--bundles``
    as they are; with ``cascade`` also the 3D bundle at ``resolution: coarse`` (:data:`COARSE`) and the 3D bundle on
    that configuration's out-of-fold label maps (``previous_stage``), as input channels (:data:`CASCADE`) and as the
    box it is trained and predicts in (:data:`CASCADE_CROP`, ``stage_input: crop``)."""
    found = {name: (bundle, {}) for name, bundle in find_bundles(names).items()}
    if cascade:
        clash = sorted({COARSE, CASCADE, CASCADE_CROP} & set(found))
        if clash:
            raise KFoldError(f"--bundles names {', '.join(clash)}, the name --cascade gives its stages: rename it")
        unet3d = found["unet3d"][0] if "unet3d" in found else Bundle.find(REPO_ROOT / "bundles" / "unet3d")
        found[COARSE] = (unet3d, {"resolution": "coarse"})
        found[CASCADE] = (unet3d, {"previous_stage": str(output / COARSE), "stage_input": "channels"})
        found[CASCADE_CROP] = (unet3d, {"previous_stage": str(output / COARSE), "stage_input": "crop"})
    return found


def split_sets(pairs: Sequence[str] | None, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--set`` pairs as keys for every bundle and keys for one (``unet3d:patch_size=[...]``), values read as YAML."""
    common: list[str] = []
    per_bundle: dict[str, list[str]] = {name: [] for name in names}
    for pair in pairs or []:
        prefix, colon, rest = pair.partition(":")
        if colon and "=" not in prefix:
            if prefix not in per_bundle:
                raise KFoldError(f"--set {pair}: {prefix} is not one of --bundles ({', '.join(names)})")
            per_bundle[prefix].append(rest)
        else:
            common.append(pair)
    return parse_set(common), {name: parse_set(items) for name, items in per_bundle.items()}


def _check_identity(output: Path, previous: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """A selection started again must use the options it was started with (``previous``); name those that differ."""

    def option(key: str, value: Any) -> str:
        if key == "overrides":
            return "--set " + " ".join(
                f"{'' if bundle == 'all' else bundle + ':'}{k}={json.dumps(v)}"
                for bundle, keys in (value or {}).items()
                for k, v in keys.items()
            )
        return f"--{key} {' '.join(value) if key == 'bundles' else value}"

    changed = changed_options(previous, state, SELECT_IDENTITY, option)
    if changed:
        raise KFoldError(
            f"{output} was started with other options ({', '.join(changed)}): pass the same options to resume "
            "it, or a new --output for a new selection"
        )


def _splits(bundle: Bundle, dataset_dir: Path, output: Path, folds: int, seed: int) -> Path:
    """``OUT/splits.json``: one stratified K-fold for every bundle (kept when the selection is resumed); the classes
    and image dimensions as ``bundle`` reads them from dataset.json."""
    path = output / SPLITS_FILE
    if path.is_file():
        return path
    keys = ("num_classes", "class_names", "image_dims")
    parsed = bundle.parsed({"dataset_dir": str(dataset_dir)}, keys)
    description = load_dataset_json(dataset_dir)
    datalist = check_datalist(description, dataset_dir, parsed["num_classes"], parsed["image_dims"])
    cases = describe_cases(datalist, parsed["class_names"], parsed["image_dims"])
    splits = make_splits(cases, folds, seed, "auto", None, 1, parsed["class_names"], dataset_dir / "dataset.json")
    atomic_write_json(splits, path)
    return path


def _plan(bundle: Bundle, dataset_dir: Path, keys: Mapping[str, Any], memory_gb: float) -> dict[str, Any]:
    """The keys ``prepare plan`` chooses for this bundle and dataset (the user's keys measured with, not planned)."""
    from custom_components.planning import PlanError, make_plan, planned_keys

    dims = int(bundle.parsed({**keys, "dataset_dir": str(dataset_dir)}, ("spatial_dims",))["spatial_dims"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    decided = planned_keys(bundle.config("train"), keys)
    measured_with = {key: value for key, value in keys.items() if key not in decided}
    try:
        _, plan = make_plan(dataset_dir, memory_gb, dims, device, measured_with, log=logger.info)
    except PlanError as err:
        raise KFoldError(f"{bundle.path.name}: prepare plan: {err}") from err
    return {key: value for key, value in plan.items() if key != "dataset_dir"}


def run_selection(
    dataset_dir: str | Path,
    output: str | Path,
    folds: int,
    *,
    bundles: Sequence[str] = DEFAULT_BUNDLES,
    sets: Sequence[str] | None = None,
    time_budget_min: float | None = None,
    seed: int = 0,
    memory_gb: float = 8.0,
    parallel: int = 1,
    cascade: bool = False,
) -> dict[str, Any]:
    """Plan and cross-validate every bundle (with ``cascade`` also nnU-Net's cascade of the 3D bundle: see
    :func:`configurations`) on one set of splits, then score them and their ensembles; the selection (also written
    as selection.json, .md and .png). Started again with the same options, it resumes."""
    dataset_dir, output = Path(dataset_dir).resolve(), Path(output).resolve()
    found = configurations(bundles, cascade, output)
    common, per_bundle = split_sets(sets, list(found))
    if time_budget_min is not None:
        common["time_budget_min"] = time_budget_min
    keys = {name: {**common, **per_bundle[name], **stage} for name, (_, stage) in found.items()}
    problems = [
        settings.report(found_problems, bundle.path, "train", f"--set ({name})")
        for name, (bundle, _) in found.items()
        if (found_problems := settings.check(keys[name], bundle.path, "train"))
    ]
    if problems:
        raise KFoldError("\n".join(problems))
    if folds < 2:
        raise KFoldError(f"--folds {folds}: a selection needs at least 2 folds")
    state = {
        "bundles": {name: str(bundle.path) for name, (bundle, _) in found.items()},
        "dataset_dir": str(dataset_dir),
        "folds": folds,
        "seed": seed,
        "overrides": {"all": common, **{name: keys for name, keys in per_bundle.items() if keys}},
        "time_budget_min": time_budget_min,
        "memory_gb": memory_gb,
    }
    state = json.loads(json.dumps(state, default=str))
    state_path = output / SELECT_STATE
    previous_plans = {}
    if state_path.is_file():
        previous = read_select_state(output)
        _check_identity(output, previous, state)
        previous_plans = previous["plans"]
    output.mkdir(parents=True, exist_ok=True)
    splits_file = _splits(next(iter(found.values()))[0], dataset_dir, output, folds, seed)
    plans = {}
    for name, (bundle, _) in found.items():
        plans[name] = previous_plans.get(name) or _plan(bundle, dataset_dir, keys[name], memory_gb)
        atomic_write_json({**state, "plans": plans}, state_path)
    failed = []
    for name, (bundle, _) in found.items():  # a cascade's stage 1 before its stage 2
        logger.info("%s: cross-validation in %s", name, output / name)
        cv, layout = plan_cv(
            bundle.path,
            dataset_dir,
            output / name,
            folds,
            seed=seed,
            overrides={**plans[name], **keys[name], **PROBABILITIES},
            splits_file=splits_file,
        )
        failed += complete_cv(cv, layout, parallel)["failed"]
    if failed:
        raise KFoldError(f"folds failed: {', '.join(failed)} (their logs are in their folders); run again to retry")
    return write_selection(output)


def _validation_cases(output: Path, name: str) -> dict[str, Path]:
    """Case id -> the file of its out-of-fold probabilities, for every case of the configuration ``name``."""
    state = read_state(output / name, f"run `kfold select` into {output} to the end", BUNDLE_FIX)
    splits = read_list(output / SPLITS_FILE, SPLIT_FIELDS, "run `kfold select` again", SELECT_SPLITS_FIX)
    probabilities = {}
    for fold in fold_layout(output / name, state["fold_count"], state["split_count"]):
        for case in splits[fold.index]["val"]:
            probabilities[case] = fold.path / PREDICTIONS_DIR / f"{case}_prob.nii.gz"
    return probabilities


def read_probabilities(path: Path) -> np.ndarray:
    """Class probabilities (x, y, z, class) as an evaluation wrote them; a missing file names the fold to re-score."""
    if not path.is_file():
        fold = path.parents[len(PREDICTIONS_DIR.parts)]
        raise KFoldError(
            f"{path} is missing: {fold} was scored without its probabilities; delete {fold / 'evaluation'} and run "
            "`kfold select` again (only the scoring reruns)"
        )
    return np.asarray(read_image(path)[0], dtype=np.float32)


def score_configurations(output: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Out-of-fold Dice per case and foreground class of each configuration alone and of every ensemble of two or
    more (the mean of their probabilities), all on the original image grid, from the saved probabilities."""
    state = read_state(output / names[0], f"run `kfold select` into {output} to the end", BUNDLE_FIX)
    description = load_dataset_json(state["dataset_dir"])
    checked = check_datalist(description, state["dataset_dir"], state["num_classes"], state["image_dims"])
    labels = {case_id(entry["image"]): entry["label"] for entry in checked}
    cases = {name: _validation_cases(output, name) for name in names}
    combos = [c for size in range(1, len(names) + 1) for c in itertools.combinations(names, size)]
    rows: dict[tuple[str, ...], list[torch.Tensor]] = {combo: [] for combo in combos}
    order = sorted(cases[names[0]])
    for case in order:
        label = torch.as_tensor(read_image(labels[case])[0], dtype=torch.long)
        probabilities = {name: read_probabilities(cases[name][case]) for name in names}
        for combo in combos:
            mean = np.mean([probabilities[name] for name in combo], axis=0)
            predicted = torch.as_tensor(mean.argmax(axis=-1))
            rows[combo].append(label_dice(predicted, label, state["num_classes"]))
    scored = {}
    for combo in combos:
        table = torch.stack(rows[combo]).double()
        scored[ENSEMBLE_JOIN.join(combo)] = {
            "members": list(combo),
            "mean_dice": float(table.mean()),
            "mean_dice_ci95": bootstrap_ci(table.mean(dim=1).tolist()),
            "dice_per_class": dict(zip(state["class_names"], table.mean(dim=0).tolist(), strict=True)),
            "cases": {case: float(value) for case, value in zip(order, table.mean(dim=1).tolist(), strict=True)},
        }
    return scored


def compare(scored: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The best configuration (highest mean Dice), the paired bootstrap interval of its lead over every other one
    (per-case differences resampled; significant when the interval excludes 0), and the winner: the configuration of
    fewest models among those the best does not beat significantly (the higher mean between equals). An ensemble
    costs one inference per member: it wins only by a lead that the cases support."""
    ranking = sorted(scored, key=lambda name: (-scored[name]["mean_dice"], len(scored[name]["members"]), name))
    best = ranking[0]
    comparisons = []
    for other in ranking[1:]:
        cases = scored[best]["cases"]
        differences = [cases[case] - scored[other]["cases"][case] for case in cases]
        interval = bootstrap_ci(differences)
        comparisons.append(
            {
                "configuration": other,
                "difference": float(np.mean(differences)),
                "ci95": interval,
                "significant": interval is not None and interval[0] > 0,
            }
        )
    within_noise = [best] + [entry["configuration"] for entry in comparisons if not entry["significant"]]
    winner = min(within_noise, key=lambda name: (len(scored[name]["members"]), ranking.index(name)))
    return {"winner": winner, "best": best, "ranking": ranking, "comparisons": comparisons}


def _verdict(scored: Mapping[str, Mapping[str, Any]], comparison: Mapping[str, Any]) -> str:
    """One paragraph: the winner, its Dice, and how sure the cross-validation is of it."""
    winner, best = comparison["winner"], comparison["best"]
    text = f"{winner} wins with an out-of-fold mean Dice of {scored[winner]['mean_dice']:.3f}"
    if not comparison["comparisons"]:
        return text + " (the only configuration)."
    leads = {entry["configuration"]: entry for entry in comparison["comparisons"]}

    def lead(other: str) -> str:
        entry = leads[other]
        low, high = entry["ci95"] or (float("nan"), float("nan"))
        return f"{entry['difference']:+.3f} (95% interval {low:+.3f} to {high:+.3f})"

    if winner != best:
        return (
            f"{text}: {best} scored {lead(winner)} more, not significantly over these cases, and {winner} needs fewer "
            "models to run. More cases or folds would tell them apart."
        )
    runner_up = comparison["comparisons"][0]["configuration"]
    sure = "significant" if leads[runner_up]["significant"] else "not significant, but nothing simpler is as good"
    return f"{text}, {lead(runner_up)} over {runner_up}: {sure}."


def write_selection(output: str | Path) -> dict[str, Any]:
    """Score the configurations of a selection folder and write selection.json, selection.md and selection.png."""
    output = Path(output).resolve()
    state = read_select_state(output)
    names = list(state["bundles"])
    scored = score_configurations(output, names)
    comparison = compare(scored)
    selection = {
        "dataset_dir": state["dataset_dir"],
        "folds": state["folds"],
        "seed": state["seed"],
        "time_budget_min": state["time_budget_min"],
        "space": "original image grid, each case scored by the folds that did not train on it",
        **comparison,
        "verdict": _verdict(scored, comparison),
        "configurations": scored,
        "plans": state["plans"],
    }
    atomic_write_json(selection, output / SELECTION_FILE)
    atomic_write_bytes(output / SELECTION_MD, markdown(selection, output).encode())
    atomic_write_bytes(output / SELECTION_PNG, plot(selection))
    return selection


def markdown(selection: Mapping[str, Any], output: Path) -> str:
    """selection.md: the verdict, the table of configurations and how to use the winner."""
    scored, winner = selection["configurations"], selection["winner"]
    classes = list(scored[winner]["dice_per_class"])
    differences = {entry["configuration"]: entry for entry in selection["comparisons"]}
    lines = [
        "# 2D or 3D: cross-validated selection",
        "",
        selection["verdict"],
        "",
        f"{selection['folds']} folds, seed {selection['seed']}, out-of-fold Dice on the {selection['space']}.",
        "",
        f"| configuration | mean Dice (95% CI) | {' | '.join(classes)} | lead of the best (95% CI) | significant |",
        "|---|---|" + "---|" * len(classes) + "---|---|",
    ]
    for name in selection["ranking"]:
        entry = scored[name]
        low, high = entry["mean_dice_ci95"] or (float("nan"), float("nan"))
        lead = differences.get(name)
        lead_text = (
            f"{lead['difference']:+.3f} ({lead['ci95'][0]:+.3f} to {lead['ci95'][1]:+.3f})"
            if lead and lead["ci95"]
            else "-"
        )
        significant = "-" if lead is None else ("yes" if lead["significant"] else "no")
        per_class = " | ".join(f"{entry['dice_per_class'][c]:.3f}" for c in classes)
        marks = " (winner)" if name == selection["winner"] else ""
        marks += " (best mean)" if name == selection["best"] and name != selection["winner"] else ""
        lines.append(
            f"| {name}{marks} | {entry['mean_dice']:.3f} ({low:.3f} to {high:.3f}) | {per_class} | {lead_text} | "
            f"{significant} |"
        )
    lines += [
        "",
        f"Predict with the winner ({winner}: "
        + ("the ensemble of these configurations' fold models" if ENSEMBLE_JOIN in winner else "its fold models")
        + "):",
        "",
        f"    python -m custom_components.kfold predict {output} --images IMAGES --out PREDICTIONS",
        "",
        "Each configuration's cross-validation, with its own report, is in its folder: "
        + ", ".join(f"`{name}/`" for name in scored if ENSEMBLE_JOIN not in name)
        + ". The plans used are in selection.json.",
        "",
    ]
    return "\n".join(lines)


def plot(selection: Mapping[str, Any]) -> bytes:
    """selection.png: mean Dice per configuration with its interval, and every case's Dice across configurations."""
    plt = pyplot()
    scored, names = selection["configurations"], selection["ranking"]
    with plt.rc_context():
        figure, (bars, cases) = plt.subplots(1, 2, figsize=(11, 4.2))
        means = [scored[name]["mean_dice"] for name in names]
        intervals = np.array([scored[name]["mean_dice_ci95"] or [m, m] for name, m in zip(names, means, strict=True)])
        errors = np.abs(intervals.T - np.asarray(means))  # below and above each mean
        colours = ["tab:green" if name == selection["winner"] else "tab:gray" for name in names]
        bars.bar(names, means, yerr=errors, color=colours, capsize=4)
        bars.set_ylabel("out-of-fold mean Dice")
        bars.set_ylim(0, 1)
        bars.set_title("Dice per configuration (95% CI)")
        for case in scored[names[0]]["cases"]:
            cases.plot(names, [scored[name]["cases"][case] for name in names], marker="o", alpha=0.6)
        cases.set_ylim(0, 1)
        cases.set_ylabel("mean Dice of the case")
        cases.set_title("Dice per case")
        for axis in (bars, cases):
            axis.tick_params(axis="x", rotation=20)
        figure.tight_layout()
        return png_bytes(figure)


def predict_selected(
    output: str | Path, images: Sequence[str | Path], out_dir: str | Path, configuration: str | None = None
) -> list[Path]:
    """Segment ``images`` with the selection's winner (or the named ``configuration``): one configuration's fold
    ensemble, or the probabilities of several averaged on each image's grid; the label maps written to ``out_dir``."""
    output, out_dir = Path(output).resolve(), Path(out_dir).resolve()
    selection = read_selection(output)
    name = configuration or selection["winner"]
    if name not in selection["configurations"]:
        raise KFoldError(f"--configuration {name}: {output} has {', '.join(selection['ranking'])}")
    members = [member for member in selection["configurations"][name]["members"] if member in selection["plans"]]
    if len(members) == 1:
        return predict(output / members[0], images, out_dir)
    written = []
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.is_dir() else None) as parts:
        for member in members:
            predict(output / member, images, Path(parts) / member, save_probabilities=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        for first in sorted((Path(parts) / members[0]).glob("*_prob.nii.gz")):
            case = first.name[: -len("_prob.nii.gz")]
            mean = np.mean([read_image(Path(parts) / member / first.name)[0] for member in members], axis=0)
            affine = read_image(first)[1]
            path = out_dir / f"{case}_seg.nii.gz"
            label_map = nib.Nifti1Image(mean.argmax(axis=-1).astype(np.uint8), affine)
            atomic_write_bytes(path, gzip.compress(label_map.to_bytes(), compresslevel=6))
            written.append(path)
    logger.info("ensemble of %s on %d image(s) into %s", " + ".join(members), len(written), out_dir)
    return written
