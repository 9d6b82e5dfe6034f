"""The `augmentation` presets at one training budget: the validation Dice (mean and per class) each preset reaches on
the thin-slab stand-in and on `make train`'s data, over several seeds.

The data: the thin-slab stand-in of benchmarks/dice_per_minute.py (its ``prepare_data``: 10 synthetic volumes of
96x96x12 voxels at 0.8 x 0.8 x 4 mm, two without foreground, its fixed split of 6 training and 4 validation cases)
and ``make train``'s (``TRAIN_CASES`` synthetic volumes at 0.8 x 0.8 x 2.5 mm, seed 0; fold 0 of 5, each seed its own
split). Each run is the 3D bundle through the user's command (``dice_per_minute.train``) on its defaults (``plan:
auto``, planned once per dataset into ``OUT/<dataset>/plan_cache`` before the first run, outside the budget) with
``time_budget_min``, ``seed`` and ``augmentation`` set, so every preset gets the same minutes and each seed pairs the
presets on the same split and weights. The table states the spacing the plan chose and whether it is anisotropic
(``augmentation.anisotropic_axis``: rotation, scaling and low resolution then stay in the slice plane). A run whose
result is in ``augmentation.json`` is kept (a killed benchmark resumes). Run from the repository root:

    python benchmarks/augmentation.py [--minutes 2] [--seeds 0 1 2] [--presets none light default strong]
        [--datasets thin_slab make_train] [--out runs/bench_augmentation]

Writes ``augmentation.md`` and ``augmentation.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from case_sampling import PLAN_MIN, START_MIN, spread
from dice_per_minute import RUN_KEYS, WORKERS, train
from dice_per_minute import prepare_data as thin_slab_data
from init_weights import makefile_value
from throughput import conv_peak, machine, machine_text

from custom_components.augmentation import AUGMENTATIONS, anisotropic_axis
from custom_components.paths import REPO_ROOT
from custom_components.run_files import atomic_write_json
from custom_components.synthetic import write_dataset

DATASETS = {"thin_slab": "thin-slab stand-in", "make_train": "`make train`'s data"}


def prepare_data(out: Path, dataset: str) -> tuple[Path, Path | None]:
    """``dataset``'s folder and its fixed split (None: fold 0 of 5 by the seed), written once into ``out/dataset``."""
    if dataset == "thin_slab":
        return thin_slab_data(out / dataset)
    folder = out / dataset / "data"
    if not (folder / "dataset.json").is_file():
        write_dataset(folder, cases=int(makefile_value("TRAIN_CASES")), seed=0)  # custom_components.synthetic --seed 0
    return folder, None


def table(runs: Mapping[str, Mapping[str, Mapping[str, Any]]], seeds: Sequence[int]) -> str:
    """Markdown for one dataset: per preset, the mean and per-class Dice (mean ± sd over the seeds), the mean Dice
    per seed and its paired difference from ``default`` (when it ran), the epochs each run trained."""
    first = next(iter(runs.values()))
    names = list(first[str(seeds[0])]["best_dice_per_class"])
    head = "| augmentation | mean Dice | " + " | ".join(f"{name} Dice" for name in names) + " | "
    head += " | ".join(f"seed {seed}" for seed in seeds) + " | against default | epochs |"
    lines = [head, "|---" * (len(names) + len(seeds) + 4) + "|"]
    for preset, by_seed in runs.items():
        chosen = [by_seed[str(seed)] for seed in seeds]
        means = [run["best_mean_dice"] for run in chosen]
        per_class = [spread([run["best_dice_per_class"][name] for run in chosen]) for name in names]
        default = runs.get("default")
        paired = (
            f"{statistics.mean(m - default[str(s)]['best_mean_dice'] for m, s in zip(means, seeds, strict=True)):+.3f}"
            if default
            else ""
        )
        lines.append(
            f"| {preset} | {spread(means)} | {' | '.join(per_class)} | {' | '.join(f'{m:.3f}' for m in means)} | "
            f"{paired} | {', '.join(str(run['epochs']) for run in chosen)} |"
        )
    return "\n".join(lines)


def spacing_text(runs: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The plan's spacing of the dataset's runs and what the anisotropy rule made of it."""
    spacing = next(iter(next(iter(runs.values())).values()))["spacing"]
    axis = anisotropic_axis(spacing, 3)
    rule = "isotropic enough: every axis" if axis is None else f"anisotropic: in the plane across axis {axis}"
    return f"spacing {spacing} mm (the plan's), {rule}"


def main(argv: Sequence[str] | None = None) -> None:
    """Train every preset on every dataset with every seed, print the tables and write the report files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget of each run (time_budget_min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (weights, draws, split)")
    parser.add_argument("--presets", nargs="+", choices=AUGMENTATIONS, default=list(AUGMENTATIONS), help="which ones")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS), help="which ones")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_augmentation"), help="data, runs, results")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    count = len(args.datasets) * len(args.presets) * len(args.seeds)
    total = count * (args.minutes + START_MIN) + len(args.datasets) * PLAN_MIN
    print(
        f"{count} runs of {args.minutes:g} min: about {total:.0f} min (each run {START_MIN:g} min outside its budget, "
        f"{PLAN_MIN:g} min to plan each dataset first)",
        flush=True,
    )
    start = time.perf_counter()
    state_file = out / "augmentation.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    results: dict[str, Any] = state.get("results", {}) if state.get("minutes") == args.minutes else {}
    peak = conv_peak(3)
    print(f"conv peak {peak['gflop_per_s']:.1f} GFLOP/s", flush=True)
    configs = [REPO_ROOT / "bundles" / "unet3d" / "configs" / "train.yaml"]
    for dataset in args.datasets:
        folder, splits = prepare_data(out, dataset)
        for preset in args.presets:
            for seed in args.seeds:
                done = results.setdefault(dataset, {}).setdefault(preset, {})
                if str(seed) in done:
                    continue  # finished in an earlier run of this benchmark
                keys = {**RUN_KEYS, "dataset_dir": str(folder), "seed": seed, "augmentation": preset}
                keys.update(plan_cache_dir=str(out / dataset / "plan_cache"), time_budget_min=args.minutes)
                if splits is not None:
                    keys["splits_file"] = str(splits)
                run_dir = out / "runs" / f"{dataset}_{preset}_s{seed}"
                run = train(configs, keys, run_dir)
                run["spacing"] = yaml.safe_load((run_dir / "configs" / "train.yaml").read_text())["spacing"]
                done[str(seed)] = run
                print(f"{dataset}, {preset}, seed {seed}: mean Dice {run['best_mean_dice']:.3f}", flush=True)
                atomic_write_json({"minutes": args.minutes, "results": results}, state_file)
    info = machine()
    command = " ".join(["python benchmarks/augmentation.py", *(sys.argv[1:] if argv is None else argv)])
    sections = [f"Command: {command} ({(time.perf_counter() - start) / 60:.0f} min)"]
    for dataset in args.datasets:
        runs = {preset: results[dataset][preset] for preset in args.presets}
        sections += [f"{DATASETS[dataset]}: {spacing_text(runs)}", table(runs, args.seeds)]
    sections += [
        f"Cells: the kept model's validation Dice after {args.minutes:g} min of training (`time_budget_min`), mean ± "
        f"sample standard deviation over seeds {', '.join(map(str, args.seeds))}; against default: the mean over the "
        "seeds of each seed's difference from `default`'s mean Dice. The presets: bundles/unet3d/docs/README.md.",
        machine_text(info, peak, WORKERS),
    ]
    report = "\n\n".join(sections)
    print(report)
    (out / "augmentation.md").write_text(report + "\n")
    atomic_write_json({"minutes": args.minutes, "results": results, "conv_peak": peak, "machine": info}, state_file)


if __name__ == "__main__":
    main()
