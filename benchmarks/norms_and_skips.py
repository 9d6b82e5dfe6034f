"""Benchmark of the 3D bundle: normalisation layers at small batches, and U-Nets with and without skip connections.

Part 1 (normalisation at small batches, after Wu & He 2018, "Group Normalization"): bundles/unet3d trained at
batch sizes 1, 2 and 8 (patches per step: ``batch_size`` volumes, one patch each) with every ``norm`` choice, on one
synthetic dataset, with the same seeds, the same number of optimiser steps for every batch size and a constant
learning rate, so that within a batch size only the norm differs. Reports the validation mean Dice (mean over seeds
and its spread, max - min) and seconds per iteration.

Part 2 (the skip-connection ablation): the bundle with ``skip_connections`` true and false (default norm, batch 2),
reporting Dice and HD95 (MONAI's ``compute_hausdorff_distance``, percentile 95, in mm) per class and the gradient
norm of the first encoder block over the first iterations.

Every run is the user's bundle (``ConfigWorkflow``, as ``python -m monai.bundle run`` builds it) with overrides.
Writes ``norms_and_skips.md``, ``norms_and_skips.png`` and ``results.json`` into ``--out`` and prints the tables.
Run from the repository root:  python benchmarks/norms_and_skips.py [--seeds 2] [--steps 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monai
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.handlers import from_engine
from monai.metrics import compute_hausdorff_distance

from custom_components.norms import NORM_CHOICES
from custom_components.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN_3D = "bundles/unet3d/configs/train.yaml"
TRAIN_CASES, VAL_CASES = 32, 8  # 5 folds of 40 cases: 32 training volumes, a whole number of batches of 1, 2 and 8
SPACING = [0.8, 0.8, 2.5]  # the synthetic volumes' own voxel size (mm)
# the test suite's small 3D setting (tests/conftest.py SMALL_3D), one patch per volume, a constant learning rate
BASE_OVERRIDES: dict[str, Any] = {
    "spacing": SPACING,
    "patch_size": [32, 32, 16],
    "channels": [16, 32, 64],
    "strides": [2, 2],
    "num_samples": 1,
    "num_folds": (TRAIN_CASES + VAL_CASES) // VAL_CASES,
    "num_workers": 0,
    "learning_rate": 0.003,
    "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.ConstantLR", "optimizer": "@optimizer", "factor": 1.0},
    "progress_bar": False,
    "log_every_iteration": False,
}
SKIP_BATCH_SIZE = 2  # the bundle's default batch size
GRAD_ITERATIONS = 20  # first iterations whose encoder gradient norm is recorded


def machine() -> str:
    """One line naming the hardware and software the numbers come from."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"{device}; {cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch thread(s); "
        f"torch {torch.__version__}, MONAI {monai.__version__}, Python {platform.python_version()}"
    )


def record_grad_norms(trainer: Engine, block: torch.nn.Module, iterations: int) -> list[float]:
    """Gradient norm of ``block``'s parameters after each of the trainer's first ``iterations`` backward passes
    (MONAI's trainer zeroes the gradients at the start of an iteration, so they are intact at its end)."""
    norms: list[float] = []

    def _record(_: Engine) -> None:
        if len(norms) < iterations:
            grads = [p.grad.norm() for p in block.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, _record)
    return norms


def record_hd95(evaluator: Engine, spacing: Sequence[float]) -> list[list[float]]:
    """HD95 in mm of each foreground class for each case of the evaluator's last run (inf where a class is missed)."""
    rows: list[list[float]] = []
    evaluator.add_event_handler(Events.STARTED, lambda _: rows.clear())

    def _record(engine: Engine) -> None:
        preds, labels = from_engine(["pred", "label"])(engine.state.output)
        distances = compute_hausdorff_distance(
            torch.stack(preds), torch.stack(labels), include_background=False, percentile=95, spacing=list(spacing)
        )
        rows.extend(distances.tolist())

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, _record)
    return rows


def train_bundle(dataset: Path, out: Path, steps: int, batch_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train the 3D bundle for ``steps`` optimiser steps, validate once at the end, return its numbers."""
    epochs, remainder = divmod(steps * batch_size, TRAIN_CASES)
    if remainder or not epochs:
        raise ValueError(f"{steps} steps of batch {batch_size} are not a whole number of epochs of {TRAIN_CASES} cases")
    workflow = ConfigWorkflow(
        config_file=TRAIN_3D,
        logging_file=False,
        workflow_type="train",
        **BASE_OVERRIDES,
        **overrides,
        dataset_dir=str(dataset),
        output_dir=str(out),
        batch_size=batch_size,
        max_epochs=epochs,
        val_interval=epochs,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    network = workflow.parser.get_parsed_content("network")
    grad_norms = record_grad_norms(trainer, network.model[0], GRAD_ITERATIONS)  # the first encoder block
    hd95 = record_hd95(workflow.parser.get_parsed_content("validate#evaluator"), SPACING)
    workflow.run()
    workflow.finalize()
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "mean_dice": metrics["last_mean_dice"],
        "dice_per_class": metrics["last_dice_per_class"],
        "hd95_per_case": hd95,
        "seconds_per_iteration": metrics["seconds_per_iteration"],
        "grad_norms": grad_norms,
        "iterations": trainer.state.iteration,
    }


def mean_and_spread(values: Sequence[float]) -> str:
    """``mean (max - min)`` of the values over seeds, for a table cell."""
    return f"{statistics.fmean(values):.3f} ({max(values) - min(values):.3f})"


def fastest(runs: Sequence[dict[str, Any]]) -> str:
    """Seconds per iteration of the fastest seed: the run least slowed by other processes on shared cores."""
    return f"{min(r['seconds_per_iteration'] for r in runs):.3f}"


def hd95_summary(runs: Sequence[dict[str, Any]], index: int) -> str:
    """Mean HD95 of one class over the cases and seeds where the class was found, and how many cases missed it."""
    values = [row[index] for run in runs for row in run["hd95_per_case"]]
    found = [v for v in values if math.isfinite(v)]
    mean = f"{statistics.fmean(found):.1f}" if found else "-"
    return f"{mean} ({len(values) - len(found)}/{len(values)} missed)"


def norms_table(results: dict[str, dict[int, list[dict[str, Any]]]], batch_sizes: Sequence[int]) -> str:
    """Markdown table: one row per norm, Dice and seconds per iteration per batch size."""
    header = [f"Dice, batch {b}" for b in batch_sizes] + [f"s/it, batch {b}" for b in batch_sizes]
    lines = ["| norm | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for norm, by_batch in results.items():
        dice = [mean_and_spread([r["mean_dice"] for r in by_batch[b]]) for b in batch_sizes]
        speed = [fastest(by_batch[b]) for b in batch_sizes]
        lines.append(f"| {norm} | " + " | ".join(dice + speed) + " |")
    return "\n".join(lines)


def skips_table(results: dict[str, list[dict[str, Any]]], class_names: Sequence[str]) -> str:
    """Markdown table: with and without skip connections, Dice and HD95 per class, encoder gradient norms."""
    header = (
        [f"Dice {c}" for c in class_names]
        + [f"HD95 {c} (mm)" for c in class_names]
        + ["grad norm, first encoder block, iteration 1", f"same, mean of iterations 1-{GRAD_ITERATIONS}", "s/it"]
    )
    lines = ["| skip connections | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for variant, runs in results.items():
        dice = [mean_and_spread([r["dice_per_class"][c] for r in runs]) for c in class_names]
        hd95 = [hd95_summary(runs, i) for i in range(len(class_names))]
        grads = [mean_and_spread([r["grad_norms"][0] for r in runs])]
        grads.append(mean_and_spread([statistics.fmean(r["grad_norms"]) for r in runs]))
        speed = fastest(runs)
        lines.append(f"| {variant} | " + " | ".join([*dice, *hd95, *grads, speed]) + " |")
    return "\n".join(lines)


def plot(norms: dict, skips: dict, batch_sizes: Sequence[int], path: Path) -> None:
    """Dice and seconds per iteration against batch size per norm (bars: min to max over seeds), and the first
    encoder block's gradient norm over the first iterations with and without skip connections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (dice_ax, speed_ax, grad_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for norm, by_batch in norms.items():
        values = [[r["mean_dice"] for r in by_batch[b]] for b in batch_sizes]
        means = [statistics.fmean(v) for v in values]
        spread = [
            [m - min(v) for m, v in zip(means, values, strict=True)],
            [max(v) - m for m, v in zip(means, values, strict=True)],
        ]
        dice_ax.errorbar(batch_sizes, means, yerr=spread, marker="o", capsize=3, label=norm)
        speed_ax.plot(
            batch_sizes,
            [min(r["seconds_per_iteration"] for r in by_batch[b]) for b in batch_sizes],
            marker="o",
            label=norm,
        )
    dice_ax.set(title="validation mean Dice (bars: seeds' min-max)", xlabel="batch size", ylabel="Dice", ylim=(0, 1))
    speed_ax.set(title="seconds per iteration (fastest seed)", xlabel="batch size", ylabel="s")
    for ax in (dice_ax, speed_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
        ax.legend(fontsize=8)
    for variant, runs in skips.items():
        for seed_index, run in enumerate(runs):
            grad_ax.plot(
                range(1, len(run["grad_norms"]) + 1),
                run["grad_norms"],
                marker=".",
                color="C0" if variant == "true" else "C3",
                alpha=1.0 - 0.4 * seed_index,
                label=f"skip_connections {variant}" if seed_index == 0 else None,
            )
    grad_ax.set(title="gradient norm, first encoder block", xlabel="iteration", ylabel="L2 norm", yscale="log")
    grad_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both parts, print the tables and write them with the PNG and the raw numbers into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_norms_and_skips"), help="output folder")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per setting (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=128, help="optimiser steps per run (a multiple of 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 8], help="divisors of 32")
    parser.add_argument("--norms", nargs="+", default=list(NORM_CHOICES), help="bundle norm choices")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (one: on shared cores, spin-waiting threads cost far more than they add)",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    os.chdir(REPO)  # the bundle's macros are relative to the repository root
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    dataset = write_dataset(out / "data", cases=TRAIN_CASES + VAL_CASES, seed=0, shape=(48, 48, 20))
    seeds = range(args.seeds)

    def runs(name: str, batch_size: int, overrides: dict[str, Any]) -> list[dict[str, Any]]:
        results = []
        for seed in seeds:
            run_out = out / "runs" / f"{name}_seed{seed}"
            shutil.rmtree(run_out, ignore_errors=True)  # a previous benchmark's checkpoint would be resumed
            results.append(train_bundle(dataset, run_out, args.steps, batch_size, {**overrides, "seed": seed}))
            print(f"{name} seed {seed}: Dice {results[-1]['mean_dice']:.3f}", flush=True)
        return results

    norms = {n: {b: runs(f"{n}_batch{b}", b, {"norm": n}) for b in args.batch_sizes} for n in args.norms}
    skips = {v: runs(f"skips_{v}", SKIP_BATCH_SIZE, {"skip_connections": v == "true"}) for v in ("true", "false")}
    class_names = list(skips["true"][0]["dice_per_class"])
    elapsed = time.perf_counter() - start
    report = "\n\n".join(
        [
            f"Command: python benchmarks/norms_and_skips.py {' '.join(sys.argv[1:] if argv is None else argv)}",
            f"Machine: {machine()}. Total {elapsed / 60:.1f} min.",
            f"Normalisation: {args.steps} steps per run; validation mean Dice, mean over seeds {list(seeds)} "
            "(max - min); seconds per iteration of the fastest seed:",
            norms_table(norms, args.batch_sizes),
            f"Skip connections (bundle default norm, batch {SKIP_BATCH_SIZE}, {args.steps} steps): Dice (max - min), "
            "HD95 mean over the validation cases that found the class (cases that missed it); gradient norm "
            "(max - min); seconds per iteration of the fastest seed:",
            skips_table(skips, class_names),
        ]
    )
    print(report)
    (out / "norms_and_skips.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps({"machine": machine(), "norms": norms, "skips": skips}, indent=1))
    plot(norms, skips, args.batch_sizes, out / "norms_and_skips.png")
    print(f"wrote {out / 'norms_and_skips.md'}, {out / 'norms_and_skips.png'}, {out / 'results.json'}")


if __name__ == "__main__":
    main()
