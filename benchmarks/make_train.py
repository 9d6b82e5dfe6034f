"""`make train` now against `make train` at an earlier commit, side by side in one run: wall time, Dice, and the
share of the training time that is not the training step.

The earlier commit's files are taken with ``git archive`` into ``--out`` and its ``make train`` runs there with this
checkout's environment (``VENV``) and its code first on ``PYTHONPATH``; then this checkout's ``make train`` runs.
Both write their own copy of the same synthetic data and train through the user's command, so the table compares
what a user of each commit waits for (data, training, the end-of-run evaluation and report) on the same machine
minutes apart: quote the ratio, not the seconds. The overhead of a run is ``1 - step / (seconds per iteration)``,
the step being one training step (forward, loss, backward, optimiser step) of the run's own network, loss and
optimiser, rebuilt from its run folder's configs and timed here on pre-made tensors of its batch's shape: whatever
else the run spent (data loading and the workers' share of the CPU, validation, checkpoints, the first epoch's
warm-up) is overhead. Run from the repository root:

    python benchmarks/make_train.py [--baseline c8632f9] [--out runs/bench_make_train]

Writes ``make_train.md`` and ``make_train.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from throughput import best_time, machine, make_step

from custom_components.paths import REPO_ROOT
from custom_components.planning import bundle_parser


def checkout(revision: str, folder: Path) -> Path:
    """The files of ``revision`` in ``folder`` (replaced if present)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def make_train(source: Path, out: Path, name: str, extra: str = "", threads: int | None = None) -> dict[str, Any]:
    """``make train`` of the repository at ``source`` into ``out/name``, with ``extra`` as its ``TRAIN_EXTRA``
    overrides and ``threads`` torch threads (default: torch's own); its metrics.json and the wall time."""
    run_dir, data_dir = out / name, out / f"{name}_data"
    shutil.rmtree(run_dir, ignore_errors=True)
    venv = Path(sys.executable).parent.parent  # this checkout's environment, installed by `make install`
    args = ["make", "-C", str(source), "train", f"VENV={venv}", f"TRAIN_OUT={run_dir}", f"TRAIN_DATA={data_dir}"]
    args.append(f"TRAIN_EXTRA={extra}")
    # the install stamp taken as up to date: an archived pyproject.toml would otherwise reinstall the environment
    # with the earlier commit's package (PYTHONPATH below chooses the code)
    args += ["--old-file", str(venv / ".installed-stamp")]
    env = {**os.environ, "PYTHONPATH": str(source)}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, env=env, check=True)
    wall = time.perf_counter() - start
    return {**json.loads((run_dir / "metrics.json").read_text()), "make_train_s": round(wall, 1), "log": str(log)}


def premade_step(run_dir: Path, repeats: int = 5) -> float:
    """Seconds of one training step of the run's network, loss and optimiser (built from its run folder's
    configs/train.yaml, as resuming would) on pre-made tensors of its batch's shape: the fastest of ``repeats``."""
    parser = bundle_parser(run_dir / "configs" / "train.yaml", {})
    network, loss_function, optimizer = (
        parser.get_parsed_content(key) for key in ("network", "train#loss_function", "train#optimizer")
    )
    step = make_step(network, loss_function, optimizer)
    batch = parser.get_parsed_content("batch_size") * parser.get_parsed_content("num_samples")
    patch = parser.get_parsed_content("patch_size")
    image = torch.randn(batch, parser.get_parsed_content("network_in_channels"), *patch)
    label = torch.randint(0, parser.get_parsed_content("num_classes"), (batch, 1, *patch))
    network.train()
    step(image, label)  # warm-up: first-call allocations and kernel choices
    return best_time(lambda: step(image, label), repeats)


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per commit, the time ratio against the first row."""
    first = next(iter(results.values()))["make_train_s"]
    head = "| make train | wall time (s) | ratio | training (s) | epochs | s / iteration | step (s) | overhead "
    head += "| mean Dice | per class |"
    lines = [head, "|---" * 10 + "|"]
    for name, m in results.items():
        per_class = ", ".join(f"{c} {d:.3f}" for c, d in m["best_dice_per_class"].items())
        lines.append(
            f"| {name} | {m['make_train_s']:.0f} | {m['make_train_s'] / first:.2f} | {m['training_time_s']:.0f} | "
            f"{m['epochs']} | {m['seconds_per_iteration']:.3f} | {m['step_s']:.3f} | "
            f"{1 - m['step_s'] / m['seconds_per_iteration']:.0%} | {m['best_mean_dice']:.3f} | {per_class} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both `make train`s, print the table and write the report files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="c8632f9", help="the earlier commit (default: before the speed-ups)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_make_train"), help="sources, runs and results")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    baseline = checkout(args.baseline, out / "baseline_source")
    results = {}
    for label, source, name in [(f"at {args.baseline}", baseline, "baseline"), ("now", REPO_ROOT, "now")]:
        results[label] = make_train(source, out, name)
        results[label]["step_s"] = premade_step(out / name)
    info = machine()
    report = "\n\n".join(
        [
            table(results),
            f"Machine: {info['cpu']}, {info['cpu_count']} CPU cores; torch {info['torch']}, MONAI {info['monai']}, "
            f"Python {info['python']}; {info['date']}. The two runs one after the other; step: one training step on "
            "pre-made tensors, timed in this process after each run; overhead: 1 - step / (s / iteration).",
        ]
    )
    print(report)
    (out / "make_train.md").write_text(report + "\n")
    (out / "make_train.json").write_text(json.dumps({"results": results, "machine": info}, indent=1))


if __name__ == "__main__":
    main()
