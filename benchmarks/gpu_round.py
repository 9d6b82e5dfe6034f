"""One round on a lent GPU: every figure of issue 29 from one command, the most wanted first, within a time guard.

For the 3D bundle at its plan (``prepare plan`` measured on the GPU) on the thin-slab stand-in (dice_per_minute.py's
data and split) and on ``make train``'s data (20 synthetic cases, seed 0, fold 0 of 5), the rows of ``ROWS``:

- ``pipeline``: in this process, the bundle's own ``train#dataloader``, network, loss and optimiser (built from its
  train.yaml as throughput.py builds them) train ``--iterations`` steps after a warm-up, from one iterator as the
  trainer continues it: seconds per iteration, the step's share of it (the rest waits for the next batch), the
  peak GPU memory;
- ``dice``: the user's command (``dice_per_minute.train``) with ``time_budget_min`` 1 or 2: the kept model's mean
  Dice, the epochs, the step's share of the training time and validation's (``1 - overhead_share`` and
  ``validation_share`` of the run's metrics.json), the peak GPU memory;
- ``baseline``: MONAI's fast-training tutorial loop (Project-MONAI/tutorials,
  ``acceleration/fast_training_tutorial.ipynb``): a ``CacheDataset`` (no copy) of the deterministic transforms, the
  foreground/background indices and ``EnsureTyped`` to the GPU without metadata, ``ThreadDataLoader`` without
  workers, ``RandCropByPosNegLabeld`` on the GPU with MONAI's metadata off, AMP with a ``GradScaler``, its DiceCE
  loss and SGD; here with the bundle's network, patch, batch and validation interval, trained for the same budget
  and scored with the bundle's Dice (foreground mean, empty references counted).

Each row is ``data_device`` cpu (the cache in RAM, worker processes) or cuda (the cache on the GPU,
``ThreadDataLoader``), with ``amp``, ``channels_last``, ``compile`` or ``val_interval`` as its name says. A row starts
only when its estimated time fits in what ``--max-minutes`` leaves; the others are listed as skipped. Results are
written after every row (``gpu_round.json`` and ``gpu_round.md`` in ``--out``, copied to ``--results``), and a
second call with the same ``--out`` skips the rows already measured. Run from the repository root:

    python benchmarks/gpu_round.py [--max-minutes 9] [--out runs/gpu_round] [--results DIR] [--rows TEXT ...]
    python benchmarks/gpu_round.py --dry-run     # the rows, their estimates and what a budget would run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from dice_per_minute import RUN_KEYS, plan_file, prepare_data, slug, train
from throughput import QUIET, machine

from custom_components.paths import REPO_ROOT
from custom_components.run_files import atomic_write_json
from custom_components.step_measure import bundle_parser
from custom_components.synthetic import write_dataset

CONFIG = REPO_ROOT / "bundles" / "unet3d" / "configs" / "train.yaml"
MAKE_TRAIN_CASES = 20  # `make train`'s data: python -m custom_components.synthetic --cases 20 --seed 0
STARTUP_S = 40  # a bundle process's start and end around its budget: imports, CUDA, cache, last checkpoint
PLAN_S = 90  # `prepare plan` on the GPU, once per dataset (kept in OUT)
PIPELINE_S = 40  # an in-process pipeline row: the bundle parsed, its cache filled, warm-up and timed steps
COMPILE_S = 90  # the same with torch.compile's first calls
WARM_UP = 10  # untimed iterations of a pipeline row first
CUDA = {"data_device": "cuda", "amp": True}
CPU = {"data_device": "cpu", "amp": True}


@dataclass(frozen=True)
class Row:
    """One measurement: ``dataset``, ``kind`` (pipeline, dice, baseline), the bundle keys of its variant, the
    training budget of a dice or baseline row."""

    dataset: str
    kind: str
    variant: str
    keys: Mapping[str, Any] = field(default_factory=dict)
    minutes: float | None = None

    @property
    def name(self) -> str:
        budget = f", {self.minutes:g} min" if self.minutes is not None else ""
        return f"{self.dataset}: {self.kind} {self.variant}{budget}"

    def estimate_s(self) -> float:
        """Seconds this row is expected to take, its dataset's plan apart."""
        if self.kind == "pipeline":
            return COMPILE_S if self.keys.get("compile") else PIPELINE_S
        return (self.minutes or 0) * 60 + STARTUP_S + (COMPILE_S if self.keys.get("compile") else 0)


# the most wanted first: the issue's headline figures, then the comparisons that explain them
ROWS = (
    Row("thin", "pipeline", "cuda, amp", CUDA),
    Row("thin", "pipeline", "cpu, amp", CPU),
    Row("thin", "dice", "cuda, amp", CUDA, 1),
    Row("thin", "dice", "cuda, amp", CUDA, 2),
    Row("thin", "baseline", "fast-training tutorial", {}, 1),
    Row("make_train", "dice", "cuda, amp", CUDA, 1),
    Row("make_train", "dice", "cuda, amp", CUDA, 2),
    Row("thin", "baseline", "fast-training tutorial", {}, 2),
    Row("thin", "dice", "cpu, amp", CPU, 1),
    Row("thin", "dice", "cuda, amp, val_interval 40", {**CUDA, "val_interval": 40}, 1),
    Row("thin", "pipeline", "cuda, no amp", {**CUDA, "amp": False}),
    Row("thin", "pipeline", "cuda, amp, channels_last", {**CUDA, "channels_last": True}),
    Row("thin", "pipeline", "cuda, amp, compile", {**CUDA, "compile": True}),
    Row("make_train", "pipeline", "cuda, amp", CUDA),
    Row("make_train", "pipeline", "cpu, amp", CPU),
    Row("thin", "dice", "cpu, amp", CPU, 2),
    Row("make_train", "baseline", "fast-training tutorial", {}, 1),
    Row("make_train", "dice", "cpu, amp", CPU, 1),
    Row("thin", "dice", "cuda, no amp", {**CUDA, "amp": False}, 1),
    Row("thin", "dice", "cuda, amp, channels_last", {**CUDA, "channels_last": True}, 1),
    Row("thin", "dice", "cuda, amp, compile", {**CUDA, "compile": True}, 1),
)


class Data:
    """The two datasets, each written and planned once into ``out`` (a later call reuses them)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.planned: dict[str, Path] = {}

    def needs_plan(self, dataset: str) -> bool:
        return dataset not in self.planned and not (self.out / dataset / "plans" / "3d_plan_unet.yaml").is_file()

    def keys(self, dataset: str) -> dict[str, Any]:
        """The bundle keys that train on ``dataset`` at its plan (the plan file, and the thin-slab split)."""
        folder = self.out / dataset
        if dataset == "thin":
            path, splits = prepare_data(folder)
            extra = {"splits_file": str(splits)}
        else:
            path = folder / "data"
            if not (path / "dataset.json").is_file():
                write_dataset(path, cases=MAKE_TRAIN_CASES, seed=0)
            extra = {}
        if dataset not in self.planned:
            self.planned[dataset] = plan_file(path, "unet3d", {}, folder)  # measured on the GPU where there is one
        return {"dataset_dir": str(path), "plan_file": str(self.planned[dataset]), **extra}


def plan_values(keys: Mapping[str, Any]) -> dict[str, Any]:
    """``keys`` with the plan file's values spelled out: a parser built by hand does not read ``plan_file``."""
    plan = yaml.safe_load(Path(keys["plan_file"]).read_text())
    return {**plan, **{key: value for key, value in keys.items() if key != "plan_file"}}


def make_amp_step(
    network: torch.nn.Module, loss_function: Callable, optimizer: torch.optim.Optimizer, amp: bool
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """SupervisedTrainer's step: the batch to the network's device, forward and loss under autocast with ``amp``,
    backward through a GradScaler, optimiser step; it returns once the loss is read, which waits for the step's
    kernels (as the bundles' TrainingReport times a step)."""
    device = next(network.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def step(image: torch.Tensor, label: torch.Tensor) -> float:
        image, label = image.to(device), label.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_function(network(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    return step


def free_gpu() -> None:
    """Release what a finished row left on the GPU, and reset the peak for the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def time_iterations(loader: Iterable, step: Callable, warm_up: int, iterations: int) -> dict[str, Any]:
    """``warm_up`` iterations (cuDNN's choices, compilation), then ``iterations`` timed ones, all from one iterator as
    the trainer continues the bundles' never-ending loaders: the wait for each batch and each step."""
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(warm_up):
        batch = next(batches)
        step(batch["image"], batch["label"])
    warm_up_s = time.perf_counter() - start
    wait_s = step_s = 0.0
    for _ in range(iterations):
        fetch = time.perf_counter()
        batch = next(batches)
        began = time.perf_counter()
        step(batch["image"], batch["label"])
        wait_s, step_s = wait_s + began - fetch, step_s + time.perf_counter() - began
    del batches  # ends the loader's thread or workers
    return {
        "s_per_iteration": (wait_s + step_s) / iterations,
        "step_s": step_s / iterations,
        "step_share": step_s / (wait_s + step_s),
        "warm_up_s": warm_up_s,
    }


def pipeline(keys: Mapping[str, Any], run_dir: Path, iterations: int, warm_up: int = WARM_UP) -> dict[str, Any]:
    """The bundle's loader and step in this process: ``warm_up`` iterations, then ``iterations`` timed ones."""
    workers = {"num_workers": RUN_KEYS["num_workers"]}  # the bundle runs' data-loading workers
    parser = bundle_parser(CONFIG, {**plan_values(keys), **QUIET, **workers, "output_dir": str(run_dir)})
    network = parser.get_parsed_content("network")
    step = make_amp_step(
        network,
        parser.get_parsed_content("train#loss_function"),
        parser.get_parsed_content("train#optimizer"),
        bool(parser.get_parsed_content("amp")),
    )
    loader = parser.get_parsed_content("train#dataloader")
    network.train()
    timing = time_iterations(loader, step, warm_up, iterations)
    timing.update(gpu_memory_mb=peak_gpu_mb(), loader=type(loader).__name__)
    timing["data_on_device"] = str(parser.get_parsed_content("data_on_device"))
    del parser, network, step, loader
    return timing


def tutorial_loop(keys: Mapping[str, Any], run_dir: Path, minutes: float) -> dict[str, Any]:
    """MONAI's fast-training tutorial loop with the bundle's network, patch, batch, samples and validation interval
    at ``keys``, trained for ``minutes`` (from its first iteration, the cache filled; the last validation counted)."""
    from monai.data import CacheDataset, ThreadDataLoader, set_track_meta
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.transforms import AsDiscrete, Compose, EnsureTyped, FgBgToIndicesd, RandCropByPosNegLabeld, SpatialPadd

    parser = bundle_parser(CONFIG, {**plan_values(keys), **QUIET, "output_dir": str(run_dir)})
    device = torch.device(parser.get_parsed_content("device"))
    amp = device.type == "cuda"
    network = parser.get_parsed_content("network_def").to(device)
    base = parser.get_parsed_content("base_transforms")  # load, orient, resample, normalise, crop: deterministic
    patch, classes = parser.get_parsed_content("patch_size"), parser.get_parsed_content("num_classes")
    samples, batch = parser.get_parsed_content("num_samples"), parser.get_parsed_content("batch_size")
    val_interval = parser.get_parsed_content("val_interval")
    fields = ["image", "label"]
    on_device = EnsureTyped(fields, device=device, track_meta=False)  # the tutorial's last cached transform
    # padded to the patch before the indices are taken (the thin slabs have fewer slices than the patch)
    cached = [*base, SpatialPadd(fields, patch), FgBgToIndicesd("label", "_fg", "_bg", image_key="image"), on_device]
    crop = RandCropByPosNegLabeld(
        fields, "label", patch, 1, 1, samples, fg_indices_key="label_fg", bg_indices_key="label_bg"
    )
    workers = RUN_KEYS["num_workers"]
    train_ds = CacheDataset(
        parser.get_parsed_content("data#train"), Compose([*cached, crop]), num_workers=workers, copy_cache=False
    )
    val_ds = CacheDataset(parser.get_parsed_content("data#val"), Compose([*base, on_device]), copy_cache=False)
    train_loader = ThreadDataLoader(train_ds, num_workers=0, batch_size=batch, shuffle=True)
    val_loader = ThreadDataLoader(val_ds, num_workers=0, batch_size=1)
    loss_function = DiceCELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        squared_pred=True,
        batch=True,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        lambda_dice=0.5,
        lambda_ce=0.5,
    )
    optimizer = torch.optim.SGD(network.parameters(), lr=2e-4 * 1000, momentum=0.9, weight_decay=4e-5)  # the tutorial's
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    dice = DiceMetric(include_background=False, ignore_empty=False)  # the bundles' Dice, not the tutorial's
    to_pred, to_label = AsDiscrete(argmax=True, to_onehot=classes), AsDiscrete(to_onehot=classes)

    def validate() -> float:
        network.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            for item in val_loader:
                logits = sliding_window_inference(item["image"], patch, 4, network, overlap=0.5, mode="gaussian")
                dice(y_pred=[to_pred(x) for x in logits], y=[to_label(y) for y in item["label"]])
        score = float(dice.aggregate().mean())
        dice.reset()
        network.train()
        return score

    set_track_meta(False)  # as the tutorial: the random transforms skip MONAI's metadata
    try:
        budget, start = minutes * 60, time.perf_counter()
        step_s = wait_s = validation_s = 0.0
        epochs = iterations = 0
        scores: list[float] = []
        network.train()
        while time.perf_counter() - start < budget:
            fetched = time.perf_counter()
            for item in train_loader:
                began = time.perf_counter()
                wait_s += began - fetched
                optimizer.zero_grad()
                with torch.autocast(device.type, enabled=amp):
                    loss = loss_function(network(item["image"]), item["label"])
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                float(loss.detach())  # waits for the step's kernels, as the bundles' report times a step
                iterations += 1
                fetched = time.perf_counter()
                step_s += fetched - began
            epochs += 1
            if epochs % val_interval == 0 or time.perf_counter() - start >= budget:
                began = time.perf_counter()
                scores.append(validate())
                validation_s += time.perf_counter() - began
        training_s = time.perf_counter() - start
    finally:
        set_track_meta(True)
    return {
        "best_mean_dice": max(scores),
        "epochs": epochs,
        "iterations": iterations,
        "s_per_iteration": (step_s + wait_s) / max(iterations, 1),
        "step_share": step_s / training_s,
        "validation_share": validation_s / training_s,
        "training_time_s": training_s,
        "gpu_memory_mb": peak_gpu_mb(),
    }


def bundle_run(keys: Mapping[str, Any], run_dir: Path, minutes: float) -> dict[str, Any]:
    """The user's command for ``minutes``; the figures of its metrics.json."""
    metrics = train([CONFIG], {**RUN_KEYS, **keys, "time_budget_min": minutes}, run_dir)
    overhead, validation = metrics.get("overhead_share"), metrics.get("validation_share")
    return {
        "best_mean_dice": metrics["best_mean_dice"],
        "epochs": metrics["epochs"],
        "iterations": metrics["iterations"],
        "s_per_iteration": metrics["seconds_per_iteration"],
        "step_share": None if overhead is None else 1 - overhead,
        "validation_share": validation,
        "training_time_s": metrics["training_time_s"],
        "gpu_memory_mb": metrics["peak_memory_mb"] if metrics.get("memory_kind") == "cuda_allocated" else None,
        "process_s": metrics["process_s"],
        "log": metrics["log"],
    }


def measure(row: Row, data: Data, iterations: int) -> dict[str, Any]:
    """One row's figures."""
    keys = {**data.keys(row.dataset), **row.keys}
    run_dir = data.out / row.dataset / "runs" / slug(row.name)
    if row.kind == "pipeline":
        return pipeline(keys, run_dir, iterations)
    if row.kind == "baseline":
        return tutorial_loop(keys, run_dir, row.minutes or 1)
    return bundle_run(keys, run_dir, row.minutes or 1)


def cell(value: Any, form: str) -> str:
    return "" if value is None else format(value, form)


def tables(results: Mapping[str, Mapping[str, Any]], skipped: Sequence[str], info: Mapping[str, Any]) -> str:
    """The markdown report: the pipeline rows, the budgeted runs (bundle and baseline), what was skipped, the
    machine."""
    done = [(row, results[row.name]) for row in ROWS if row.name in results]
    lines = [
        "| data | pipeline | s / iteration | step share of the iteration | GPU memory (MiB) | warm-up (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row, r in done:
        if row.kind == "pipeline" and "error" not in r:
            lines.append(
                f"| {row.dataset} | {row.variant} | {r['s_per_iteration']:.4f} | {r['step_share']:.0%} | "
                f"{cell(r['gpu_memory_mb'], '.0f')} | {r['warm_up_s']:.1f} |"
            )
    lines += [
        "",
        "| data | run | budget (min) | mean Dice | epochs | s / iteration | step share of the training time | "
        "validation share | GPU memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in done:
        if row.kind != "pipeline" and "error" not in r:
            lines.append(
                f"| {row.dataset} | {row.kind} {row.variant} | {row.minutes:g} | {r['best_mean_dice']:.3f} | "
                f"{r['epochs']} | {r['s_per_iteration']:.4f} | {cell(r['step_share'], '.0%')} | "
                f"{cell(r['validation_share'], '.0%')} | {cell(r['gpu_memory_mb'], '.0f')} |"
            )
    failed = [f"- {name}: {r['error']}" for name, r in results.items() if "error" in r]
    notes = [
        f"Pipeline: the bundle's loader and step in one process (after a warm-up of {WARM_UP} iterations); step "
        "share = 1 - the wait for the next batch. Runs: the user's command with time_budget_min (bundle: its "
        "metrics.json, step share = 1 - overhead_share) or the fast-training tutorial loop (baseline) for the same "
        "budget; mean Dice of the kept (best) validation.",
    ]
    if failed:
        notes.append("Failed:\n" + "\n".join(failed))
    if skipped:
        notes.append("Skipped (out of time): " + "; ".join(skipped))
    notes.append(
        f"Machine: {info['gpu'] or 'no GPU'}, {info['cpu']}, {info['cpu_count']} CPU cores; torch {info['torch']}, "
        f"MONAI {info['monai']}, Python {info['python']}; {info['date']}."
    )
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def write(out: Path, copy_to: Path | None, report: str, state: Mapping[str, Any]) -> None:
    """``gpu_round.md`` and ``gpu_round.json`` into ``out``, and into ``copy_to`` when given."""
    for folder in (out, copy_to) if copy_to else (out,):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu_round.md").write_text(report + "\n")
        atomic_write_json(dict(state), folder / "gpu_round.json")


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the rows that fit in the time, most wanted first; print and write the report after every row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_round"), help="data, plans and run folders")
    parser.add_argument("--results", type=Path, help="a copy of gpu_round.md and .json here too (e.g. $OUT)")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="start no row that would end after this")
    parser.add_argument("--iterations", type=int, default=60, help="timed iterations of a pipeline row")
    parser.add_argument("--rows", nargs="+", help="only the rows whose name contains one of these texts")
    parser.add_argument("--dry-run", action="store_true", help="list the rows and estimates; run nothing")
    args = parser.parse_args(argv)
    free_gpu()
    out = args.out.resolve()
    state_file = out / "gpu_round.json"  # kept with the data and plans: a later call goes on from it
    results: dict[str, Any] = json.loads(state_file.read_text())["results"] if state_file.is_file() else {}
    rows = [row for row in ROWS if not args.rows or any(text in row.name for text in args.rows)]
    data = Data(out)
    start, skipped = time.perf_counter(), []
    warnings.filterwarnings("ignore")
    info = machine()
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        if info["gpu"] is None:
            print("no GPU: the cuda rows will fail; this is a check of the plumbing only", file=sys.stderr)
    planned_in_dry_run: set[str] = set()
    for row in rows:
        if row.name in results and "error" not in results[row.name]:
            continue  # measured by an earlier call
        needs_plan = data.needs_plan(row.dataset) and row.dataset not in planned_in_dry_run
        estimate = row.estimate_s() + (PLAN_S if needs_plan else 0)
        elapsed = time.perf_counter() - start
        if elapsed + estimate > args.max_minutes * 60:
            skipped.append(row.name)
            continue
        if args.dry_run:
            planned_in_dry_run.add(row.dataset)
            print(f"would run {row.name} (about {estimate:.0f} s)")
            start -= estimate  # as though it had run
            continue
        print(f"{row.name} (about {estimate:.0f} s, {elapsed / 60:.1f} min in)", flush=True)
        try:
            results[row.name] = measure(row, data, args.iterations)
        except Exception as err:  # a failed row is reported, the next ones still run
            results[row.name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        free_gpu()
        results[row.name]["seconds"] = round(time.perf_counter() - start - elapsed, 1)
        print(f"  {json.dumps({k: v for k, v in results[row.name].items() if k != 'traceback'}, default=str)}")
        write(out, args.results, tables(results, [], info), {"results": results, "machine": info})
    if args.dry_run:
        print("skipped for time: " + "; ".join(skipped) if skipped else "every row fits")
        return
    command = " ".join(["python benchmarks/gpu_round.py", *(sys.argv[1:] if argv is None else argv)])
    report = f"Command: {command} ({(time.perf_counter() - start) / 60:.1f} min)\n\n" + tables(results, skipped, info)
    print(report)
    write(out, args.results, report, {"results": results, "machine": info, "skipped": skipped})
    print(f"wrote {out / 'gpu_round.md'} and {state_file}" + (f", copied to {args.results}" if args.results else ""))


if __name__ == "__main__":
    main()
