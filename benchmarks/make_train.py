"""`make train` now against `make train` at an earlier commit, side by side in one run: wall time, Dice, and the
share of the training time spent outside the training step.

The earlier commit's files are taken with ``git archive`` into ``--out`` and its ``make train`` runs there with this
checkout's environment (``VENV``) and its code first on ``PYTHONPATH``; then this checkout's ``make train`` runs.
Both write their own copy of the same synthetic data and train through the user's command, so the table compares
what a user of each commit waits for (data, training, the end-of-run evaluation and report) on the same machine
minutes apart: quote the ratio, not the seconds. The overhead is the run's own ``metrics.json`` ``overhead_share``
(the training time outside the trainer's iterations: waits for data, validation, checkpoints, epoch ends; commits
before it was recorded show none), and the share of the training time that validation took is read from the
run's log. Run from the repository root:

    python benchmarks/make_train.py [--baseline c8632f9] [--out runs/bench_make_train]

Writes ``make_train.md`` and ``make_train.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from throughput import conv_peak, machine

from custom_components.paths import REPO_ROOT

# the evaluator's run time, and the trainer's epoch ends (the end-of-run evaluation comes after the last one)
VALIDATION_LOG = re.compile(r"SupervisedEvaluator - INFO - Engine run finished\. Time taken: (\d+):(\d+):(\d+\.\d+)")
EPOCH_END_LOG = re.compile(r"SupervisedTrainer - INFO - Epoch\[\d+\] Complete")
PLANNING_LOG = re.compile(r"from a plan made in (\d+\.\d+) s")  # plan: auto, when it planned (not from its cache)


def validation_s(log: str) -> float:
    """Seconds the run's validations took during training: the evaluator's runs before the trainer's last epoch end
    (the end-of-run evaluation after it is not training time)."""
    training = log[: list(EPOCH_END_LOG.finditer(log))[-1].start()]
    return sum(int(h) * 3600 + int(m) * 60 + float(sec) for h, m, sec in VALIDATION_LOG.findall(training))


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
    metrics = json.loads((run_dir / "metrics.json").read_text())
    text = log.read_text()
    planning = PLANNING_LOG.search(text)
    return {
        **metrics,
        "make_train_s": round(wall, 1),
        "validation_s": validation_s(text),
        "planning_s": float(planning.group(1)) if planning else None,
        "log": str(log),
    }


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per commit, the time ratio against the first row."""
    first = next(iter(results.values()))["make_train_s"]
    head = "| make train | wall time (s) | ratio | planning (s) | training (s) | epochs | iterations | s / iteration "
    head += "| overhead | of it validation | mean Dice | per class |"
    lines = [head, "|---" * 12 + "|"]
    for name, m in results.items():
        per_class = ", ".join(f"{c} {d:.3f}" for c, d in m["best_dice_per_class"].items())
        overhead = "–" if m.get("overhead_share") is None else f"{m['overhead_share']:.1%}"
        planning = "–" if m.get("planning_s") is None else f"{m['planning_s']:.1f}"
        lines.append(
            f"| {name} | {m['make_train_s']:.0f} | {m['make_train_s'] / first:.2f} | {planning} | "
            f"{m['training_time_s']:.0f} | {m['epochs']} | {m.get('iterations', '–')} | "
            f"{m['seconds_per_iteration']:.3f} | {overhead} | "
            f"{m['validation_s'] / m['training_time_s']:.1%} | {m['best_mean_dice']:.3f} | {per_class} |"
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
    peak = conv_peak(3)  # the machine's speed in this run: readers scale the seconds to theirs
    baseline = checkout(args.baseline, out / "baseline_source")
    results = {
        f"at {args.baseline}": make_train(baseline, out, "baseline"),
        "now": make_train(REPO_ROOT, out, "now"),
    }
    results["now"]["conv_peak"] = peak
    info = machine()
    report = "\n\n".join(
        [
            table(results),
            f"Machine: {info['cpu']}, {info['cpu_count']} CPU cores, conv peak {peak['gflop_per_s']:.1f} GFLOP/s "
            f"(throughput.conv_peak, before the runs); torch {info['torch']}, MONAI {info['monai']}, "
            f"Python {info['python']}; {info['date']}. The two runs one after the other; overhead: the training time "
            "outside the trainer's iterations (metrics.json overhead_share); of it validation: the validations' "
            "share of the training time (from the log).",
        ]
    )
    print(report)
    (out / "make_train.md").write_text(report + "\n")
    (out / "make_train.json").write_text(json.dumps({"results": results, "machine": info}, indent=1))


if __name__ == "__main__":
    main()
