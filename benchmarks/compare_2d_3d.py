"""2D vs 3D U-Net on the same data and budget: Dice per class, time and memory, as a table and a bar chart.

Both bundles train through the user's command (`python -m monai.bundle run training`) on one dataset, the same
fold, the same number of epochs and the same shared keys; only the config path and the dimension-specific sizes
differ. Run from the repository root:

    python benchmarks/compare_2d_3d.py [--dataset_dir DIR] [--epochs 100] [--output runs/compare_2d_3d]

Without --dataset_dir it writes the synthetic dataset that `make train` uses. It prints a Markdown table and
writes `comparison.md`, `comparison.json` and `comparison.png` into --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Sizes for a CPU: the same in-plane resolution for both, a 64 mm-wide patch, 3 of 5 patches centred on lesions; the
# rest at the bundles' fixed defaults (plan off), so that both bundles differ in their dimensions alone
SHARED = {
    "plan": "off",
    "channels": "[16,32,64,128]",
    "strides": "[2,2,2]",
    "patch_class_ratios": "[1,1,3]",
    "learning_rate": "0.003",
    "warmup_epochs": "3",
    "num_folds": "4",
    "num_workers": "2",
    "progress_bar": "False",
    "log_every_iteration": "False",
}
BUNDLES = {
    "unet3d": {"spacing": "[1.2,1.2,2.5]", "patch_size": "[64,64,32]", "num_samples": "2"},
    "unet2d": {"spacing": "[1.2,1.2,-1]", "patch_size": "[64,64]", "num_samples": "16"},
}


def train(bundle: str, dataset_dir: Path, output_dir: Path, epochs: int, val_interval: int) -> dict:
    """Train one bundle through the user's command and return its metrics.json."""
    args = [sys.executable, "-m", "monai.bundle", "run", "training"]
    args += ["--config_file", f"bundles/{bundle}/configs/train.yaml"]
    overrides = {**SHARED, **BUNDLES[bundle], "dataset_dir": dataset_dir, "output_dir": output_dir}
    overrides |= {"max_epochs": epochs, "val_interval": val_interval}
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    log = output_dir.with_suffix(".log")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(args, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, check=True)
    print(f"{bundle}: {time.perf_counter() - start:.0f} s, log {log}", flush=True)
    return json.loads((output_dir / "metrics.json").read_text())


def table(results: dict[str, dict]) -> str:
    """Markdown table: one row per bundle, Dice per class then cost."""
    classes = list(next(iter(results.values()))["best_dice_per_class"])
    head = ["bundle", "mean Dice", *[f"Dice {c}" for c in classes], "train time (s)", "s / iteration"]
    head += ["peak memory (MiB)", "parameters"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bundle, m in results.items():
        cells = [bundle, f"{m['best_mean_dice']:.3f}", *[f"{m['best_dice_per_class'][c]:.3f}" for c in classes]]
        cells += [f"{m['wall_time_s']:.0f}", f"{m['seconds_per_iteration']:.3f}", f"{m['peak_memory_mb']:.0f}"]
        cells += [f"{m['parameters']:,}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict[str, dict], path: Path) -> None:
    """Bar chart: Dice per class side by side, and training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = ["mean", *next(iter(results.values()))["best_dice_per_class"]]
    fig, (dice_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(classes))
    for i, (bundle, m) in enumerate(results.items()):
        values = [m["best_mean_dice"], *m["best_dice_per_class"].values()]
        dice_ax.bar(x + (i - 0.5) * 0.4, values, width=0.4, label=bundle)
        time_ax.bar(i, m["wall_time_s"], color=f"C{i}")
    dice_ax.set(xticks=x, xticklabels=classes, ylabel="validation Dice", ylim=(0, 1), title="Dice (best epoch)")
    dice_ax.legend()
    time_ax.set(xticks=range(len(results)), xticklabels=list(results), ylabel="seconds", title="training time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", type=Path, help="MSD dataset (default: a synthetic one, as `make train`)")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of each bundle")
    parser.add_argument("--val_interval", type=int, default=10, help="validate every this many epochs")
    parser.add_argument("--output", type=Path, default=Path("runs/compare_2d_3d"), help="results folder")
    args = parser.parse_args(argv)
    output = args.output.resolve()
    dataset = args.dataset_dir
    if dataset is None:
        from custom_components.synthetic import write_dataset

        dataset = write_dataset(output / "data", cases=16, seed=0)
    results = {b: train(b, dataset.resolve(), output / b, args.epochs, args.val_interval) for b in BUNDLES}
    text = table(results)
    cpu = platform.processor() or platform.machine()
    device = next(iter(results.values()))["device"]
    machine = f"{cpu}, {os.cpu_count()} CPU cores, torch device {device}, Python {platform.python_version()}"
    summary = f"{text}\n\n{args.epochs} epochs each on {dataset}; machine: {machine}\n"
    print(summary)
    (output / "comparison.md").write_text(summary)
    (output / "comparison.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    plot(results, output / "comparison.png")


if __name__ == "__main__":
    main()
