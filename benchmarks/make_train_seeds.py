"""`make train`'s recipe and variants of it, each over several seeds: how far the Dice moves between seeds, and so
how large a recipe change's effect must be before one run can show it.

Each run is ``make train`` with ``TRAIN_EXTRA="--seed S <variant's overrides>"``: the seed picks the fold split (which
4 of the 16 synthetic cases are validated), the initial weights and every random draw. Runs go ``--jobs`` at a time,
each with its share of the CPU's threads, so the times in the table are for a shared machine: compare Dice, and
time only as the epochs a variant trains. A run whose ``metrics.json`` exists is kept (a killed benchmark resumes).
Run from the repository root:

    python benchmarks/make_train_seeds.py [--seeds 0 1 2] [--variants "make train" ...] [--out DIR]

Writes ``make_train_seeds.md`` and ``make_train_seeds.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from make_train import make_train
from throughput import machine

from custom_components.paths import REPO_ROOT

# bundle keys on top of `make train`'s defaults (plan auto, the Makefile's time budget)
VARIANTS: dict[str, str] = {
    "make train": "",
    "batch Dice": "--losses#dice_focal#batch True",
    "learning rate 0.003": "--learning_rate 0.003",
    "patch class ratios [1,1,3]": '--patch_class_ratios "[1,1,3]"',  # centre 3 of 5 patches on the lesions
    "Dice + cross-entropy": "--loss dice_ce",  # nnU-Net's loss instead of the default dice_focal
    "plan off": "--plan off",  # the bundle's fixed defaults, as the model zoo trains them
}
QUIET = "--progress_bar False"


def run_name(variant: str, seed: int) -> str:
    """The folder of one run: the variant's name as a slug and the seed."""
    return f"{re.sub(r'[^a-z0-9]+', '_', variant.lower()).strip('_')}_s{seed}"


def run(variant: str, seed: int, out: Path, threads: int) -> dict[str, Any]:
    """One ``make train`` of ``variant`` with ``seed`` into ``out`` (``make_train.make_train``); its metrics.json,
    kept if already there. Each run writes its own copy of the data (runs overlap) and removes it after."""
    name = run_name(variant, seed)
    metrics = out / name / "metrics.json"
    if not metrics.is_file():
        make_train(REPO_ROOT, out, name, f"--seed {seed} {VARIANTS[variant]} {QUIET}", threads)
        shutil.rmtree(out / f"{name}_data", ignore_errors=True)
        print(f"{variant}, seed {seed}: {json.loads(metrics.read_text())['best_mean_dice']:.3f}", flush=True)
    return {**json.loads(metrics.read_text()), "hd95": hd95(out / name)}


def hd95(run_dir: Path) -> dict[str, float] | None:
    """Per class, the mean HD95 (mm) over the validation cases of the run's end-of-run evaluation
    (evaluation/evaluation.json, written with ``report`` on, ``make train``'s default); None without one."""
    evaluation = run_dir / "evaluation" / "evaluation.json"
    if not evaluation.is_file():
        return None
    return {name: scores["mean"] for name, scores in json.loads(evaluation.read_text())["summary"]["hd95"].items()}


def table(results: Mapping[str, Mapping[int, Mapping[str, Any]]], seeds: Sequence[int]) -> str:
    """Markdown: one row per variant, the kept model's mean Dice (lesion) per seed, their mean, the paired
    difference from the first variant (the same seeds, so the same splits) and the HD95 per class averaged over the
    seeds (where every seed's run has an evaluation)."""
    head = "| variant | epochs | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | against the first "
    head += "| HD95 mm (mean of seeds) |"
    lines = [head, "|---" * (len(seeds) + 5) + "|"]
    first = next(iter(results.values()))
    for variant, runs in results.items():
        dice = [runs[s]["best_mean_dice"] for s in seeds]
        cells = [f"{runs[s]['best_mean_dice']:.3f} ({runs[s]['best_dice_per_class']['lesion']:.2f})" for s in seeds]
        difference = statistics.mean(d - first[s]["best_mean_dice"] for s, d in zip(seeds, dice, strict=True))
        distances = [runs[s]["hd95"] for s in seeds]
        hd95_cell = (
            "–"
            if None in distances
            else ", ".join(f"{c} {statistics.mean(d[c] for d in distances):.1f}" for c in distances[0])
        )
        lines.append(
            f"| {variant} | {runs[seeds[0]]['epochs']} | {' | '.join(cells)} | {statistics.mean(dice):.3f} | "
            f"{difference:+.3f} | {hd95_cell} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every variant over every seed, print the table and write the report files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (each its own split)")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="the first is the reference"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_make_train_seeds"), help="runs and results")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        metrics = list(pool.map(lambda r: run(*r, out, threads), runs))
    results: dict[str, dict[int, dict[str, Any]]] = {variant: {} for variant in args.variants}
    for (variant, seed), m in zip(runs, metrics, strict=True):
        results[variant][seed] = m
    info = machine()
    report = "\n\n".join(
        [
            table(results, args.seeds),
            "Cells: the kept model's validation mean Dice (lesion Dice) on the seed's 4 held-out cases; HD95: the "
            "end-of-run evaluation's mean over those cases, averaged over the seeds. "
            f"Machine: {info['cpu']}, {info['cpu_count']} CPU cores, {args.jobs} runs at a time with {threads} "
            f"torch threads each; torch {info['torch']}, MONAI {info['monai']}; {info['date']}.",
        ]
    )
    print(report)
    (out / "make_train_seeds.md").write_text(report + "\n")
    payload = {"results": results, "overrides": {v: VARIANTS[v] for v in args.variants}, "machine": info}
    (out / "make_train_seeds.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
