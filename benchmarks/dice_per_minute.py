"""Dice per minute of training: validation Dice after 1, 2, 5 and 10 minutes for the bundles' configurations.

Each configuration trains through the user's command (``python -m monai.bundle run training``) with
``time_budget_min`` set to each number of minutes, so that every run lays its learning-rate schedule out over its
own budget (warm-up and annealing included) as a user's run with that budget would; the runs are separate, the
Dice is the run's kept model (best validation mean Dice, the last, annealed epoch always validated).

The data stand in for a thin-slab MR task: anisotropic synthetic volumes (0.8 x 0.8 x 4 mm, 10-14 slices) with a
large organ, lesions of under 0.5% of the voxels and two cases without foreground, one of them among the six
training cases and one among the four validation cases (``splits.json``). The configurations (``CONFIGS``):

- ``3D defaults``: bundles/unet3d with ``plan: off``, its fixed defaults as the model zoo trains them;
- ``3D bundle, one command``: bundles/unet3d as it ships, ``plan: auto`` planning when training starts (the plan
  cached in ``OUT/plan_cache`` after the first budget; its time is not in the budget, as a plan file's is not);
- ``3D plan, unet`` and ``3D plan, dynunet``: bundles/unet3d with ``prepare plan``'s file (``planning.make_plan``,
  ``--set architecture=dynunet`` for the second), the explicit workflow;
- ``3D plan, dynunet, deep supervision``: the dynunet plan with ``deep_supervision: true`` (nnU-Net's training);
- ``2D defaults``, ``2D bundle, one command`` and ``2D plan``: bundles/unet2d the same three ways;
- ``2D plan, 4 volumes a step`` and ``2D plan, 4 slices a volume``: the 2D plan with twice and half the slices a
  step (``batch_size`` 4 instead of the plan's 2; ``num_samples`` 4 instead of 8), where the slice size caps the
  patch: whether more slices a step buy Dice per minute;
- ``3D plan, unet, compiled`` and ``3D plan, dynunet, compiled``: the two plans with ``compile: true`` (the network
  compiled by ``torch.compile``, its compile time inside the budget).

Every run trains where the bundle's ``device`` key puts it (the first GPU when there is one), and the plans measure
their steps there (``prepare plan --device cuda`` on a GPU machine); it uses the bundle's four data-loading workers
(one a core on a machine of fewer cores) and no per-iteration log. The Conv3d peak of the CPU is measured in the same
run (``throughput.conv_peak``) so that readers can scale the minutes to theirs. A killed benchmark run
again with the same options keeps the runs it finished. Run from the repository root:

    python benchmarks/dice_per_minute.py [--minutes 1 2 5 10] [--configs NAME ...] [--out runs/bench_dice_per_minute]

Writes ``dice_per_minute.md``, ``dice_per_minute.json`` and ``dice_per_minute.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from throughput import conv_peak, machine, machine_text

from custom_components.bundle import bundle_command
from custom_components.paths import REPO_ROOT
from custom_components.planning import make_plan
from custom_components.run_files import atomic_write_json
from custom_components.synthetic import write_dataset

CASES, EMPTY, SHAPE, SPACING = 10, 2, (96, 96, 12), (0.8, 0.8, 4.0)
# case_008 and case_009 are the cases without foreground, one on each side
TRAIN = [f"case_{i:03d}" for i in (0, 1, 2, 3, 4, 8)]
VAL = [f"case_{i:03d}" for i in (5, 6, 7, 9)]
# name: (bundle, how it is planned: "off" (the fixed defaults), "auto" (the one command) or "file" (`prepare plan`'s
# file), the plan's --set keys, training keys beyond RUN_KEYS)
CONFIGS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "3D defaults": ("unet3d", "off", {}, {}),
    "3D bundle, one command": ("unet3d", "auto", {}, {}),
    "3D plan, unet": ("unet3d", "file", {}, {}),
    "3D plan, dynunet": ("unet3d", "file", {"architecture": "dynunet"}, {}),
    "3D plan, dynunet, deep supervision": ("unet3d", "file", {"architecture": "dynunet"}, {"deep_supervision": True}),
    "2D defaults": ("unet2d", "off", {}, {}),
    "2D bundle, one command": ("unet2d", "auto", {}, {}),
    "2D plan": ("unet2d", "file", {}, {}),
    "2D plan, 4 volumes a step": ("unet2d", "file", {}, {"batch_size": 4}),
    "2D plan, 4 slices a volume": ("unet2d", "file", {}, {"num_samples": 4}),
    "3D plan, unet, compiled": ("unet3d", "file", {}, {"compile": True}),
    "3D plan, dynunet, compiled": ("unet3d", "file", {"architecture": "dynunet"}, {"compile": True}),
}
# the bundle's 4 data-loading workers, or one a core where there are fewer cores; no per-iteration log
WORKERS = min(4, os.cpu_count() or 1)
RUN_KEYS = {"num_workers": WORKERS, "progress_bar": False, "log_every_iteration": False, "report": False}
# where the bundle trains (its `device` key: the first GPU when present), and so where the plan measures its steps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    """A folder name for a configuration."""
    return re.sub(r"\W+", "_", name).strip("_").lower()


def prepare_data(out: Path) -> tuple[Path, Path]:
    """The synthetic dataset and its one split, written once and reused."""
    dataset, splits = out / "data", out / "splits.json"
    if not (dataset / "dataset.json").is_file():
        write_dataset(dataset, cases=CASES, seed=0, shape=SHAPE, spacing=SPACING, empty_cases=EMPTY)
    atomic_write_json([{"train": TRAIN, "val": VAL}], splits)
    return dataset, splits


def plan_file(dataset: Path, bundle: str, overrides: Mapping[str, Any], out: Path) -> Path:
    """``prepare plan`` for ``bundle`` with ``overrides``, kept as ``plans/<name>.yaml`` after the first
    configuration planned with them (planned once: it measures steps)."""
    name = next(n for n, (b, how, keys, _) in CONFIGS.items() if (b, how, keys) == (bundle, "file", overrides))
    kept = out / "plans" / f"{slug(name)}.yaml"
    if not kept.is_file():
        path, _ = make_plan(dataset, dim=int(bundle[-2]), device=DEVICE, overrides=dict(overrides))
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, kept)
    return kept


def train(configs: Sequence[Path], keys: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """One budgeted training through the user's command; its metrics.json with the process's wall time."""
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run would be resumed with less than its budget
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    args = bundle_command("training", configs, {**keys, "output_dir": run_dir})
    log = run_dir.parent / f"{run_dir.name}.log"  # with_suffix would cut "0.5min" at its dot
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(args, cwd=run_dir.parent, stdout=handle, stderr=subprocess.STDOUT, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics, "process_s": round(time.perf_counter() - start, 1), "log": str(log)}


def class_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The foreground classes, as the runs' metrics.json name them."""
    return list(next(iter(next(iter(results.values())).values()))["best_dice_per_class"])


def table(results: Mapping[str, Mapping[str, Any]], minutes: Sequence[float]) -> str:
    """Markdown: mean Dice (organ / lesion) per configuration and budget, the budget's best in bold, then the
    epochs each budget bought."""
    head = "| configuration | " + " | ".join(f"{m:g} min" for m in minutes) + " |"
    lines = [head, "|---" * (len(minutes) + 1) + "|"]
    best = {
        m: max((runs[f"{m:g}"]["best_mean_dice"] for runs in results.values() if f"{m:g}" in runs), default=None)
        for m in minutes
    }
    for name, runs in results.items():
        cells = []
        for m in minutes:
            run = runs.get(f"{m:g}")
            if run is None:
                cells.append("")
                continue
            per_class = " / ".join(f"{d:.2f}" for d in run["best_dice_per_class"].values())
            dice = f"{run['best_mean_dice']:.3f}"
            cells.append(
                f"{f'**{dice}**' if run['best_mean_dice'] == best[m] else dice} ({per_class}), {run['epochs']} ep"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Mapping[str, Mapping[str, Any]], minutes: Sequence[float], path: Path) -> None:
    """Mean Dice against the training budget, one line per configuration, and the lesion Dice beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, runs in results.items():
        done = [m for m in minutes if f"{m:g}" in runs]
        runs_done = [runs[f"{m:g}"] for m in done]
        axes[0].plot(done, [run["best_mean_dice"] for run in runs_done], marker="o", label=name)
        axes[1].plot(done, [list(run["best_dice_per_class"].values())[-1] for run in runs_done], marker="o", label=name)
    last = class_names(results)[-1]
    for ax, title in zip(axes, ("validation mean Dice", f"validation Dice, {last}"), strict=True):
        ax.set(xscale="log", xlabel="training budget (min, time_budget_min)", ylabel="Dice", ylim=(0, 1), title=title)
        ax.set_xticks(list(minutes), [f"{m:g}" for m in minutes])
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Train every configuration for every budget, print the table and write the report files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dice_per_minute"), help="data, runs, results")
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 5, 10], help="training budgets")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="which ones")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    dataset, splits = prepare_data(out)
    state_file = out / "dice_per_minute.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    earlier = state.get("results", {})  # every configuration's finished runs, also those not asked for now
    results: dict[str, dict[str, Any]] = {name: earlier.get(name, {}) for name in args.configs}
    peak = conv_peak(3)
    print(f"conv peak {peak['gflop_per_s']:.1f} GFLOP/s", flush=True)
    for name in args.configs:
        bundle, how, plan_overrides, training_keys = CONFIGS[name]
        configs = [REPO_ROOT / "bundles" / bundle / "configs" / "train.yaml"]
        if how == "file":
            plan = {"plan_file": str(plan_file(dataset, bundle, plan_overrides, out))}
        else:
            plan = {"plan": "off"} if how == "off" else {"plan_cache_dir": str(out / "plan_cache")}
        for m in args.minutes:
            if f"{m:g}" in results[name]:
                continue  # finished in an earlier run of this benchmark
            keys = {**RUN_KEYS, **training_keys, **plan, "dataset_dir": str(dataset), "splits_file": str(splits)}
            keys["time_budget_min"] = m
            results[name][f"{m:g}"] = train(configs, keys, out / "runs" / f"{slug(name)}_{m:g}min")
            run = results[name][f"{m:g}"]
            print(f"{name}, {m:g} min: Dice {run['best_mean_dice']:.3f}, {run['epochs']} epochs", flush=True)
            atomic_write_json({"results": {**earlier, **results}}, state_file)
    info = machine()
    command = " ".join(["python benchmarks/dice_per_minute.py", *(sys.argv[1:] if argv is None else argv)])
    report = "\n\n".join(
        [
            f"Command: {command} ({(time.perf_counter() - start) / 60:.0f} min)",
            table(results, args.minutes),
            "Cells: the kept model's validation mean Dice (per class: "
            + " / ".join(class_names(results))
            + f") and the epochs the budget bought. {CASES - len(VAL)} training and {len(VAL)} validation "
            f"cases of {list(SHAPE)} voxels at {list(SPACING)} mm, one without foreground in each.",
            machine_text(info, peak, WORKERS),
        ]
    )
    print(report)
    (out / "dice_per_minute.md").write_text(report + "\n")
    atomic_write_json({"results": {**earlier, **results}, "conv_peak": peak, "machine": info}, state_file)
    plot(results, args.minutes, out / "dice_per_minute.png")
    print(f"wrote {out / 'dice_per_minute.md'}, {state_file.name} and dice_per_minute.png")


if __name__ == "__main__":
    main()
