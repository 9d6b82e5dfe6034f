"""`case_sampling` uniform against balanced on data where the lesion class is in 2 of the 12 training cases: the
validation Dice of each class after the same training budget, over several seeds.

The data: 16 synthetic CT-like volumes of ``make train``'s kind (96x96x40 voxels of 0.8x0.8x2.5 mm), an organ in
each and lesions (under 1% of the voxels) in cases 4 and 9 of the 12 training cases and in all 4 validation cases
(``splits.json``: the split is fixed, so the seeds change the weights and draws alone and pair the variants). Each run
is the 3D bundle through the user's command (``dice_per_minute.train``) on its defaults (``plan: auto``, planned
once into ``OUT/plan_cache`` before the first run, outside the budget) with ``time_budget_min`` and ``case_sampling``
set. Uniform draws the two lesion cases in 2/12 of the draws, balanced in 4/9 (``sampling.balanced_weights``).
A run whose result is in ``case_sampling.json`` is kept (a killed benchmark resumes). Run from the repository root:

    python benchmarks/case_sampling.py [--minutes 3 | --epochs N] [--seeds 0 1 2] [--out runs/bench_case_sampling]

Writes ``case_sampling.md`` and ``case_sampling.json`` into ``--out``.
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

from dice_per_minute import RUN_KEYS, WORKERS, train
from throughput import conv_peak, machine, machine_text

from custom_components.paths import REPO_ROOT
from custom_components.run_files import atomic_write_json
from custom_components.sampling import CASE_SAMPLING
from custom_components.synthetic import write_dataset

CASES, TRAINING = 16, 12  # the first 12 train, the last 4 validate
LESION_CASES = (4, 9, *range(TRAINING, CASES))  # lesions in 2 of the training cases, in every validation case
START_MIN = 1.0  # a run's time outside its budget (start, data check and cache, the last validation), for the estimate
PLAN_MIN = 1.0  # planning before the first run (then cached), for the estimate


def prepare_data(out: Path) -> tuple[Path, Path]:
    """The dataset and its one split, written once and reused."""
    dataset, splits = out / "data", out / "splits.json"
    if not (dataset / "dataset.json").is_file():
        write_dataset(dataset, cases=CASES, seed=0, lesion_cases=LESION_CASES)
    names = [f"case_{index:03d}" for index in range(CASES)]
    atomic_write_json([{"train": names[:TRAINING], "val": names[TRAINING:]}], splits)
    return dataset, splits


def add_budget(parser: argparse.ArgumentParser, minutes: float) -> None:
    """``--minutes`` (each run's ``time_budget_min``) or ``--epochs`` (its ``max_epochs``)."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=minutes, help="training budget of each run (time_budget_min)")
    budget.add_argument(
        "--epochs", type=int, help="train each run this many epochs (max_epochs): the same work on a busy machine"
    )


def budget(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The bundle keys of each run's budget and the budget in words."""
    if args.epochs:
        return {"max_epochs": args.epochs}, f"{args.epochs} epochs of training (`max_epochs`)"
    return {"time_budget_min": args.minutes}, f"{args.minutes:g} min of training (`time_budget_min`)"


def start_runs(out: Path, runs: int, args: argparse.Namespace) -> Path:
    """The output folder (made), warnings off, and the runs to come with their estimated time printed."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    estimate = (
        f": about {runs * (args.minutes + START_MIN) + PLAN_MIN:.0f} min (each run {START_MIN:g} min outside its "
        f"budget, {PLAN_MIN:g} min to plan first)"
        if not args.epochs
        else ""
    )
    print(f"{runs} runs of {budget(args)[1]}{estimate}", flush=True)
    return out


def spread(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation (the mean alone for one value)."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], seeds: Sequence[int]) -> str:
    """Markdown: per variant, each class's Dice (mean ± sd over the seeds), the lesion Dice per seed and its paired
    difference from the first variant, the epochs trained."""
    first = next(iter(results.values()))
    names = list(first[str(seeds[0])]["best_dice_per_class"])
    head = "| case_sampling | " + " | ".join(f"{name} Dice" for name in names) + " | mean Dice | "
    head += " | ".join(f"lesion, seed {seed}" for seed in seeds) + " | lesion against the first | epochs |"
    lines = [head, "|---" * (len(names) + len(seeds) + 4) + "|"]
    for variant, runs in results.items():
        chosen = [runs[str(seed)] for seed in seeds]
        per_class = [spread([run["best_dice_per_class"][name] for run in chosen]) for name in names]
        lesion = [run["best_dice_per_class"][names[-1]] for run in chosen]
        uniform = [first[str(seed)]["best_dice_per_class"][names[-1]] for seed in seeds]
        paired = statistics.mean(d - u for d, u in zip(lesion, uniform, strict=True))
        lines.append(
            f"| {variant} | {' | '.join(per_class)} | {spread([run['best_mean_dice'] for run in chosen])} | "
            + " | ".join(f"{d:.3f}" for d in lesion)
            + f" | {paired:+.3f} | {', '.join(str(run['epochs']) for run in chosen)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Train every variant with every seed, print the table and write the report files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget(parser, 3.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (weights and draws)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_case_sampling"), help="data, runs, results")
    args = parser.parse_args(argv)
    out = start_runs(args.out, len(CASE_SAMPLING) * len(args.seeds), args)
    budget_keys, budget_words = budget(args)
    start = time.perf_counter()
    dataset, splits = prepare_data(out)
    state_file = out / "case_sampling.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    results: dict[str, dict[str, Any]] = state.get("results", {}) if state.get("budget") == budget_words else {}
    peak = conv_peak(3)
    print(f"conv peak {peak['gflop_per_s']:.1f} GFLOP/s", flush=True)
    configs = [REPO_ROOT / "bundles" / "unet3d" / "configs" / "train.yaml"]
    for variant in CASE_SAMPLING:
        for seed in args.seeds:
            if str(seed) in results.setdefault(variant, {}):
                continue  # finished in an earlier run of this benchmark
            keys = {**RUN_KEYS, "dataset_dir": str(dataset), "splits_file": str(splits), "seed": seed}
            keys.update(plan_cache_dir=str(out / "plan_cache"), case_sampling=variant, **budget_keys)
            run = train(configs, keys, out / "runs" / f"{variant}_s{seed}")
            results[variant][str(seed)] = run
            print(f"{variant}, seed {seed}: Dice per class {run['best_dice_per_class']}, {run['epochs']} epochs")
            atomic_write_json({"budget": budget_words, "results": results}, state_file)
    info = machine()
    command = " ".join(["python benchmarks/case_sampling.py", *(sys.argv[1:] if argv is None else argv)])
    report = "\n\n".join(
        [
            f"Command: {command} ({(time.perf_counter() - start) / 60:.0f} min)",
            table(results, args.seeds),
            "Cells: the kept model's validation Dice (best mean Dice) on the 4 validation cases, each with lesions, "
            f"after {budget_words}; mean ± sample standard deviation over seeds "
            f"{', '.join(map(str, args.seeds))}; the lesion class is in 2 of the {TRAINING} training cases. "
            f"Against the first: the mean over seeds of the lesion Dice's difference from uniform with the same seed.",
            machine_text(info, peak, WORKERS),
        ]
    )
    print(report)
    (out / "case_sampling.md").write_text(report + "\n")
    atomic_write_json({"budget": budget_words, "results": results, "conv_peak": peak, "machine": info}, state_file)


if __name__ == "__main__":
    main()
