"""`init` default, kaiming and xavier on `make train`'s data and recipe: the epochs (and seconds) each takes to reach a
set validation mean Dice, and the Dice it ends with, over several seeds.

The data are the Makefile's (``TRAIN_CASES`` synthetic volumes, seed 0, as ``make train`` writes them); each run is
the 3D bundle through the user's command (``dice_per_minute.train``) on its defaults (``plan: auto``, planned once
into ``OUT/plan_cache`` before the first run, outside the budget) with ``time_budget_min`` (default the Makefile's
``TRAIN_MINUTES``), ``seed`` and ``init`` set. The seed picks the fold split, the weights and the draws, so each seed
compares the three inits on the same split. The bundle's default network is ``unet``, whose ``default`` is PyTorch's
init; the epoch of first reaching the target is as fine as ``--val-interval`` (the bundle's 5 unless set). A run whose
result is in ``init_weights.json`` is kept (a killed benchmark resumes). Run from the repository root:

    python benchmarks/init_weights.py [--minutes 1.2 | --epochs N] [--seeds 0 1 2] [--target 0.8]
        [--out runs/bench_init_weights]

Writes ``init_weights.md`` and ``init_weights.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from case_sampling import add_budget, budget, spread, start_runs
from dice_per_minute import RUN_KEYS, WORKERS, train
from throughput import conv_peak, machine, machine_text

from custom_components.initialisation import INITS
from custom_components.paths import REPO_ROOT
from custom_components.run_files import atomic_write_json
from custom_components.synthetic import write_dataset


def makefile_value(name: str) -> str:
    """A ``NAME ?= value`` default of the Makefile (``make train``'s data and budget)."""
    text = (REPO_ROOT / "Makefile").read_text()
    return re.search(rf"^{name} \?= (\S+)", text, re.MULTILINE).group(1)


def first_reaching(run_dir: Path, target: float) -> dict[str, float] | None:
    """The first validated epoch whose mean Dice is at least ``target`` and the training seconds to its end (the
    run's learning_curve.csv); None when none reached it."""
    with open(run_dir / "learning_curve.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get("val_mean_dice") and float(row["val_mean_dice"]) >= target:
                return {"epoch": int(row["epoch"]), "seconds": float(row["wall_time_s"])}
    return None


def table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], seeds: Sequence[int], target: float) -> str:
    """Markdown: per init, the epochs to reach ``target`` per seed (– when not reached) with their mean and the
    seconds, then the last epoch's mean and per-class Dice (mean ± sd over the seeds) and the epochs trained."""
    first = next(iter(results.values()))
    names = list(first[str(seeds[0])]["last_dice_per_class"])
    head = "| init | " + " | ".join(f"epochs to {target:g}, seed {seed}" for seed in seeds)
    head += " | mean epochs (seconds) to it | final mean Dice | " + " | ".join(f"final {n}" for n in names)
    head += " | epochs |"
    lines = [head, "|---" * (len(seeds) + len(names) + 4) + "|"]
    for init, runs in results.items():
        chosen = [runs[str(seed)] for seed in seeds]
        reached = [run["reached"] for run in chosen]
        cells = [str(r["epoch"]) if r else "–" for r in reached]
        done = [r for r in reached if r]
        to_target = (
            f"{statistics.mean(r['epoch'] for r in done):.1f} ({statistics.mean(r['seconds'] for r in done):.0f} s)"
            + ("" if len(done) == len(reached) else f", {len(done)} of {len(reached)} seeds")
            if done
            else "not reached"
        )
        finals = [spread([run["last_dice_per_class"][name] for run in chosen]) for name in names]
        lines.append(
            f"| {init} | {' | '.join(cells)} | {to_target} | {spread([run['last_mean_dice'] for run in chosen])} | "
            f"{' | '.join(finals)} | {', '.join(str(run['epochs']) for run in chosen)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Train every init with every seed, print the table and write the report files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget(parser, float(makefile_value("TRAIN_MINUTES")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (split, weights, draws)")
    parser.add_argument("--target", type=float, default=0.8, help="the validation mean Dice to reach")
    parser.add_argument("--val-interval", type=int, help="validate every this many epochs (default: the bundle's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_init_weights"), help="data, runs, results")
    args = parser.parse_args(argv)
    out = start_runs(args.out, len(INITS) * len(args.seeds), args)
    budget_keys, budget_words = budget(args)
    start = time.perf_counter()
    cases = int(makefile_value("TRAIN_CASES"))
    dataset = out / "data"
    if not (dataset / "dataset.json").is_file():
        write_dataset(dataset, cases=cases, seed=0)  # `make train`'s: custom_components.synthetic --seed 0
    setup = {"budget": budget_words, "val_interval": args.val_interval}
    state_file = out / "init_weights.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    results: dict[str, dict[str, Any]] = state.get("results", {}) if state.get("setup") == setup else {}
    peak = conv_peak(3)
    print(f"conv peak {peak['gflop_per_s']:.1f} GFLOP/s", flush=True)
    configs = [REPO_ROOT / "bundles" / "unet3d" / "configs" / "train.yaml"]
    extra = {} if args.val_interval is None else {"val_interval": args.val_interval}
    for init in INITS:
        for seed in args.seeds:
            if str(seed) in results.setdefault(init, {}):
                continue  # finished in an earlier run of this benchmark
            keys = {**RUN_KEYS, **extra, "dataset_dir": str(dataset), "seed": seed, "init": init}
            keys.update(plan_cache_dir=str(out / "plan_cache"), **budget_keys)
            run_dir = out / "runs" / f"{init}_s{seed}"
            results[init][str(seed)] = {**train(configs, keys, run_dir), "run_dir": str(run_dir)}
            print(f"{init}, seed {seed}: final Dice {results[init][str(seed)]['last_mean_dice']:.3f}", flush=True)
            atomic_write_json({"setup": setup, "results": results}, state_file)
    for runs_of_init in results.values():  # from the curves, so that --target can change on a kept result
        for run in runs_of_init.values():
            run["reached"] = first_reaching(Path(run["run_dir"]), args.target)
    info = machine()
    command = " ".join(["python benchmarks/init_weights.py", *(sys.argv[1:] if argv is None else argv)])
    report = "\n\n".join(
        [
            f"Command: {command} ({(time.perf_counter() - start) / 60:.0f} min)",
            table(results, args.seeds, args.target),
            f"`make train`'s data ({cases} cases, seed 0; fold 0 of 5, each seed its own split) and recipe (plan auto) "
            f"with {budget_words}, validated every "
            f"{args.val_interval or 'val_interval (5)'} epochs. Epochs to {args.target:g}: the first validation with "
            f"a mean Dice of at least {args.target:g} (seconds: the run's wall_time_s at that epoch); final: the last, "
            "annealed epoch's validation; mean ± sample standard deviation over seeds "
            f"{', '.join(map(str, args.seeds))}.",
            machine_text(info, peak, WORKERS),
        ]
    )
    print(report)
    (out / "init_weights.md").write_text(report + "\n")
    atomic_write_json({"setup": setup, "results": results, "conv_peak": peak, "machine": info}, state_file)


if __name__ == "__main__":
    main()
