"""Training throughput of the bundles: where a second of training goes, side by side in one run.

For bundles/unet3d and bundles/unet2d at their defaults (default channels, a stated small patch at the data's own
spacing) and bundles/unet3d with ``architecture=dynunet`` at its plan (``planning.make_plan``), it measures:

- seconds per training iteration (forward, loss, backward, optimiser step) (a) fed by the bundle's own
  ``train#dataloader`` (built from its train.yaml with a ConfigParser, as ``planning.bundle_parser`` does) and
  (b) on pre-made tensors of the same shape, and the share of (a) spent waiting for the next batch;
- the per-epoch overhead: the bundle's real training command (``python -m monai.bundle run training``, a few
  epochs, ``val_interval`` 1) timed per epoch from its log (ignite's epoch time, epoch-end handlers included, and
  the evaluator's run time) against iterations x the pre-made step;
- the step's FLOP/s (``torch.utils.flop_counter.FlopCounterMode`` on one forward+backward) against this machine's
  convolution peak, a large ``Conv3d(64, 64, 3)`` forward+backward counted and timed the same way;
- a baseline: a plain MONAI tutorial-style loop (same network and transforms, ``monai.data.Dataset`` uncached,
  ``torch.utils.data.DataLoader``, a hand-written loop).

Writes the synthetic data (kept and reused), the runs, ``throughput.md`` and ``throughput.json`` into ``--out``
and prints the tables. Run from the repository root:

    python benchmarks/throughput.py [--quick] [--iterations N] [--out runs/bench_throughput]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from custom_components.bundle import bundle_command
from custom_components.paths import REPO_ROOT
from custom_components.planning import make_plan
from custom_components.step_measure import bundle_parser
from custom_components.synthetic import write_dataset

CASES, SHAPE = 8, (64, 64, 32)  # synthetic volumes at 0.8 x 0.8 x 2.5 mm: small enough for a 2-core CPU
SPACING = [0.8, 0.8, 2.5]  # the data's own voxel size, so resampling neither grows nor shrinks the volumes
# the bundles' defaults except the patch (a stated small one at the data's spacing) and the run's chatter
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet3d": ("unet3d", {"spacing": SPACING, "patch_size": [64, 64, 32]}),
    "unet2d": ("unet2d", {"spacing": [*SPACING[:2], -1], "patch_size": [64, 64]}),
    "unet3d dynunet (plan)": ("unet3d", {}),  # the plan's keys are added in main()
}
QUIET = {"progress_bar": False, "log_every_iteration": False, "report": False}
CONV_SHAPE, CONV_CHANNELS = (2, 64, 64, 64, 64), 64  # the conv peak's input: batch, channels, 64^3 voxels
# ignite's log lines with their time: an engine's start (resuming), the trainer's epoch end, the evaluator's end
ENGINE_LOG = re.compile(
    r"^(\S+ \S+) - ignite\.engine\.engine\.(Supervised\w+) - INFO - (Engine run resuming|Epoch\[\d+\] Complete"
    r"|Engine run finished)",
    re.MULTILINE,
)


def machine() -> dict[str, Any]:
    """The hardware and software the numbers come from."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def machine_text(info: Mapping[str, Any], peak: Mapping[str, Any], workers: int) -> str:
    """Two report lines: the CPU's conv peak measured in the run, and the machine (``info`` from :func:`machine`)
    the bundle trained on with ``workers`` data-loading workers."""
    return (
        f"CPU conv peak: {peak['gflop_per_s']:.1f} GFLOP/s (Conv3d forward+backward, throughput.conv_peak).\n\n"
        f"Machine: {info['cpu']}, {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads"
        + (f", trained on {info['gpu']}; " if info["gpu"] else "; ")
        + f"{workers} data-loading workers; torch {info['torch']}, MONAI {info['monai']}, Python {info['python']}; "
        f"{info['date']}."
    )


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs PyTorch counts for one call of ``fn`` (convolutions and matrix products; norms and pointwise ops not)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (after a warm-up call): the one least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def conv_peak(repeats: int) -> dict[str, float]:
    """This machine's convolution FLOP/s: a large Conv3d forward+backward (input gradient too, as inside a net)."""
    conv = torch.nn.Conv3d(CONV_CHANNELS, CONV_CHANNELS, 3)
    image = torch.randn(*CONV_SHAPE, requires_grad=True)

    def step() -> None:
        conv(image).sum().backward()

    flops = count_flops(step)  # also the warm-up call
    seconds = best_time(step, repeats)
    return {"gflop": flops / 1e9, "seconds": seconds, "gflop_per_s": flops / seconds / 1e9}


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor copy (no MONAI metadata), as a pre-made batch would be."""
    return tensor.as_tensor().clone() if isinstance(tensor, monai.data.MetaTensor) else tensor.clone()


def make_step(network: torch.nn.Module, loss_function: Callable, optimizer: torch.optim.Optimizer) -> Callable:
    """The pure training step of SupervisedTrainer: zero the gradients, forward, loss, backward, optimiser step."""

    def step(image: torch.Tensor, label: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_function(network(image), label).backward()
        optimizer.step()

    return step


def time_pipeline(loader: Sequence, step: Callable, iterations: int) -> dict[str, Any]:
    """Train ``iterations`` iterations fed by ``loader``, epoch after epoch, timing each step and the wait for each
    batch. One iterator serves every epoch, as in the bundles' training (their sampler runs on across epochs); an
    epoch's first batch counts apart, as a per-epoch cost."""
    if len(loader) < 2:
        raise ValueError(f"{len(loader)} batch per epoch: no steady iteration to time (use more cases)")
    first_waits: list[float] = []
    waits: list[float] = []
    steps: list[float] = []
    batches = iter(loader)
    while len(steps) < max(iterations, len(loader) + 1):  # at least one epoch's first batch after the run's first
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # a loader that ends with its epoch (a plain shuffling one): start the next epoch
            batches = iter(loader)
            continue
        fetched = time.perf_counter()
        step(batch["image"], batch["label"])
        steps.append(time.perf_counter() - fetched)
        (waits if len(steps) % len(loader) != 1 else first_waits).append(fetched - start)
    del batches
    wait, step_seconds = statistics.fmean(waits), statistics.fmean(steps)
    return {
        "seconds_per_iteration": wait + step_seconds,
        "step_seconds_in_pipeline": step_seconds,
        "data_wait_s": wait,
        "data_wait_share": wait / (wait + step_seconds),
        "epoch_first_batch_s": statistics.fmean(first_waits),
        "iterations": len(steps),
    }


def measure_in_process(
    config_file: Path, overrides: dict[str, Any], out: Path, iterations: int, baseline: bool
) -> dict[str, Any]:
    """Pipeline and pre-made step timings and FLOPs of one bundle configuration; with ``baseline``, also the
    tutorial-style loop on the same network and transforms."""
    parser = bundle_parser(config_file, {**overrides, **QUIET, "output_dir": str(out / "in_process")})
    network = parser.get_parsed_content("network")
    loss_function = parser.get_parsed_content("train#loss_function")
    optimizer = parser.get_parsed_content("train#optimizer")
    loader = parser.get_parsed_content("train#dataloader")
    network.train()
    step = make_step(network, loss_function, optimizer)
    batch = next(iter(loader))
    image, label = plain(batch["image"]), plain(batch["label"])
    result: dict[str, Any] = {"iterations_per_epoch": len(loader), "batch_shape": list(image.shape)}
    result["voxels_per_step"] = image.shape[0] * image[0, 0].numel()
    # FLOPs of forward and backward (the optimiser's are not counted), also the warm-up step
    result["gflop_per_step"] = count_flops(lambda: step(image, label)) / 1e9
    result["premade_seconds_per_iteration"] = best_time(lambda: step(image, label), iterations)
    result["pipeline"] = time_pipeline(loader, step, iterations)
    if baseline:
        result["baseline"] = tutorial_loop(parser, copy.deepcopy(network), iterations)
    result["compiled"] = compiled_step(network, step, image, label, iterations)  # last: compiles the network
    return result


def compiled_step(
    network: torch.nn.Module, step: Callable, image: torch.Tensor, label: torch.Tensor, iterations: int
) -> dict[str, float]:
    """``torch.compile``'s price and gain on the pre-made ``step`` of ``network``: the network is compiled in place
    (``nn.Module.compile``: the same graph as the bundles' ``compile`` key, which compiles its forward behind an
    unwrap of MONAI's MetaTensor); the first call compiles."""
    network.compile()
    start = time.perf_counter()
    step(image, label)
    first = time.perf_counter() - start
    seconds = best_time(lambda: step(image, label), iterations)
    return {"seconds_per_iteration": seconds, "compile_s": first - seconds}


def tutorial_loop(parser: Any, network: torch.nn.Module, iterations: int) -> dict[str, Any]:
    """A plain MONAI tutorial loop: uncached ``monai.data.Dataset`` with the bundle's training transforms, torch's
    DataLoader with MONAI's list collate, a hand-written loss and optimiser (the bundle's defaults)."""
    transform = parser.get_parsed_content("train#preprocessing")
    dataset = monai.data.Dataset(parser.get_parsed_content("data#train"), transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=parser.get_parsed_content("batch_size"),
        shuffle=True,
        num_workers=parser.get_parsed_content("num_workers"),
        collate_fn=monai.data.list_data_collate,
    )
    loss_function = monai.losses.DiceFocalLoss(to_onehot_y=True, softmax=True, gamma=2.0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=parser.get_parsed_content("learning_rate"))
    network.train()
    return time_pipeline(loader, make_step(network, loss_function, optimizer), iterations)


def epoch_phases(log: str) -> list[dict[str, float]]:
    """Each epoch of a training log cut into its iterations (worker start included: from the previous epoch's end
    to the validation's start), validation, and the epoch-end handlers after it (checkpoint, curves, run bundle)."""
    marks: dict[str, list[float]] = {}
    for stamp, engine, event in ENGINE_LOG.findall(log):
        when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        marks.setdefault(f"{engine} {event.split('[')[0]}", []).append(when)
    ends = marks["SupervisedTrainer Epoch"]
    starts = marks["SupervisedTrainer Engine run resuming"][:1] + ends[:-1]
    val_starts = marks["SupervisedEvaluator Engine run resuming"]
    val_ends = marks["SupervisedEvaluator Engine run finished"]
    return [
        {"epoch_s": end - start, "iterations_s": v0 - start, "validation_s": v1 - v0, "epoch_end_s": end - v1}
        for start, end, v0, v1 in zip(starts, ends, val_starts, val_ends, strict=True)
    ]


def run_command(config_file: Path, overrides: dict[str, Any], run_dir: Path, epochs: int) -> dict[str, Any]:
    """Train through the user's command for ``epochs`` epochs with validation every epoch; each epoch's phases
    from its log, averaged over the epochs after the first (which also warms up allocations and caches)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous benchmark's checkpoint would be resumed
    settings = {**overrides, **QUIET, "output_dir": run_dir, "max_epochs": epochs, "val_interval": 1}
    args = bundle_command("training", [config_file], settings)
    args += ["--logging_file", str(config_file.parent / "logging.conf")]
    log = run_dir.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(args, cwd=run_dir.parent, stdout=handle, stderr=subprocess.STDOUT, check=True)
    process = time.perf_counter() - start
    phases = epoch_phases(log.read_text())
    steady = phases[1:] or phases
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "process_s": process,
        "epochs": epochs,
        **{key: statistics.fmean(p[key] for p in steady) for key in steady[0]},
        "phases": phases,
        "metrics_wall_time_s": metrics["wall_time_s"],
        "metrics_training_time_s": metrics["training_time_s"],
        "log": str(log),
    }


def summarise(name: str, m: dict[str, Any], peak: float) -> dict[str, Any]:
    """One table row's numbers from a configuration's measurements."""
    pipeline, command = m["pipeline"], m["command"]
    premade = m["premade_seconds_per_iteration"]
    compute = m["iterations_per_epoch"] * premade
    in_pipeline = m["iterations_per_epoch"] * pipeline["seconds_per_iteration"]
    achieved = m["gflop_per_step"] / premade
    compiled = m["compiled"]["seconds_per_iteration"]
    return {
        "configuration": name,
        "s_per_it_pipeline": pipeline["seconds_per_iteration"],
        "s_per_it_premade": premade,
        "data_wait_share": pipeline["data_wait_share"],
        "voxels_per_s": m["voxels_per_step"] / pipeline["seconds_per_iteration"],
        "gflop_per_s": achieved,
        "peak_share": achieved / peak,
        "s_per_it_compiled": compiled,
        "compiled_peak_share": m["gflop_per_step"] / compiled / peak,
        "compile_s": m["compiled"]["compile_s"],
        # iterations after which the faster compiled step has paid for its compilation (never if it is not faster)
        "compile_pays_after": m["compiled"]["compile_s"] / (premade - compiled) if compiled < premade else None,
        "overhead_share": 1 - compute / command["epoch_s"],
        "iterations_per_epoch": m["iterations_per_epoch"],
        "epoch_s": command["epoch_s"],
        "compute_s": compute,
        "validation_s": command["validation_s"],
        "pipeline_s": in_pipeline,
        "data_wait_s": m["iterations_per_epoch"] * pipeline["data_wait_s"],
        "command_iterations_s": command["iterations_s"],
        "epoch_end_s": command["epoch_end_s"],
        "worker_start_s": pipeline["epoch_first_batch_s"],
        "startup_s": command["process_s"] - sum(p["epoch_s"] for p in command["phases"]),
        "process_s": command["process_s"],
    }


def baseline_row(m: dict[str, Any], peak: float) -> dict[str, Any]:
    """The tutorial loop's row: same network and batch, so the same pre-made step and FLOPs as its bundle."""
    loop = m["baseline"]
    premade = m["premade_seconds_per_iteration"]
    achieved = m["gflop_per_step"] / premade
    epoch = loop["epoch_first_batch_s"] + m["iterations_per_epoch"] * loop["seconds_per_iteration"]
    return {
        "configuration": "unet3d tutorial loop (baseline)",
        "s_per_it_pipeline": loop["seconds_per_iteration"],
        "s_per_it_premade": premade,
        "data_wait_share": loop["data_wait_share"],
        "voxels_per_s": m["voxels_per_step"] / loop["seconds_per_iteration"],
        "gflop_per_s": achieved,
        "peak_share": achieved / peak,
        "overhead_share": 1 - m["iterations_per_epoch"] * premade / epoch,
    }


def tables(rows: list[dict[str, Any]], peak: dict[str, float], info: Mapping[str, Any], epochs: int) -> str:
    """The markdown report: the throughput table, the per-epoch breakdown, the conv peak and the machine."""
    head = "| configuration | s/it, pipeline | s/it, pre-made | data-wait share | voxels/s | GFLOP/s | % conv peak | "
    head += "per-epoch overhead |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {r['s_per_it_pipeline']:.3f} | {r['s_per_it_premade']:.3f} | "
            f"{r['data_wait_share']:.0%} | {r['voxels_per_s']:,.0f} | {r['gflop_per_s']:.1f} | {r['peak_share']:.0%} | "
            f"{r['overhead_share']:.0%} |"
        )
    epoch_head = "| configuration | iterations/epoch | epoch (s) | iterations x pre-made step (s) | "
    epoch_head += "iterations x s/it with pipeline (s) | of which data wait (s) | epoch's first batch (s) | "
    epoch_head += "command: iterations (s) | command: validation (s) | command: epoch end (s) | "
    epoch_head += "process start and end (s) |\n" + "|---" * 11 + "|"
    epoch_lines = [epoch_head]
    for r in rows:
        if "epoch_s" in r:
            epoch_lines.append(
                f"| {r['configuration']} | {r['iterations_per_epoch']} | {r['epoch_s']:.1f} | {r['compute_s']:.1f} | "
                f"{r['pipeline_s']:.1f} | {r['data_wait_s']:.1f} | {r['worker_start_s']:.1f} | "
                f"{r['command_iterations_s']:.1f} | {r['validation_s']:.1f} | {r['epoch_end_s']:.1f} | "
                f"{r['startup_s']:.1f} |"
            )
    compile_head = "| configuration | s/it, pre-made | s/it, compiled | ratio | % conv peak, compiled | compile (s) | "
    compile_head += "pays after (iterations) |\n" + "|---" * 7 + "|"
    compile_lines = [compile_head]
    for r in rows:
        if "s_per_it_compiled" in r:
            pays = "never" if r["compile_pays_after"] is None else f"{r['compile_pays_after']:.0f}"
            compile_lines.append(
                f"| {r['configuration']} | {r['s_per_it_premade']:.3f} | {r['s_per_it_compiled']:.3f} | "
                f"{r['s_per_it_compiled'] / r['s_per_it_premade']:.2f} | {r['compiled_peak_share']:.0%} | "
                f"{r['compile_s']:.0f} | {pays} |"
            )
    return "\n\n".join(
        [
            "\n".join(lines),
            "torch.compile on the same pre-made step (the network compiled in place; its first call compiles):",
            "\n".join(compile_lines),
            f"Conv peak: Conv3d({CONV_CHANNELS}, {CONV_CHANNELS}, 3) forward+backward on {list(CONV_SHAPE)}: "
            f"{peak['gflop']:.0f} GFLOP in {peak['seconds']:.2f} s = {peak['gflop_per_s']:.1f} GFLOP/s.",
            f"Per epoch of the bundle's training command ({epochs} epochs, validation every epoch, the first epoch "
            "left out), from its log: 'iterations' from the previous epoch's end to validation (worker start "
            "included), 'epoch end' the handlers after validation (checkpoint, learning curve, run bundle); the "
            "in-process columns for comparison; 'process start and end' is imports, caching and exit, once per run:",
            "\n".join(epoch_lines),
            "s/it: forward, loss, backward and optimiser step, steady iterations (an epoch's first batch apart); "
            "pre-made: the same step on tensors already in memory (fastest of the repeats); data-wait share: time in "
            "the loader's next() over s/it with pipeline; voxels/s: patch voxels per second with the pipeline; "
            "GFLOP/s: FlopCounterMode's forward+backward FLOPs of one step (convolutions and matrix products) over "
            "the pre-made step; per-epoch overhead: 1 - iterations x pre-made step / epoch time of the command "
            "(baseline: of its own loop, with no validation or checkpoint).",
            f"Machine: {info['cpu']}, {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads; "
            f"torch {info['torch']}, MONAI {info['monai']}, Python {info['python']}; {info['date']}.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Measure every configuration, print the tables and write ``throughput.md`` and ``throughput.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_throughput"), help="data, runs and results")
    parser.add_argument("--quick", action="store_true", help="fewer iterations and epochs (about 3 minutes)")
    parser.add_argument("--iterations", type=int, help="timed iterations per measurement (default 5, quick 2)")
    args = parser.parse_args(argv)
    iterations = args.iterations or (2 if args.quick else 5)
    epochs = 2 if args.quick else 3
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    dataset = out / "data"
    if not (dataset / "dataset.json").is_file():  # written once, reused (the same seed writes the same data)
        write_dataset(dataset, cases=CASES, seed=0, shape=SHAPE)
    plan_file = dataset / "plan_3d.yaml"
    if plan_file.is_file():  # planned once: its training steps take a while on a CPU
        plan = yaml.safe_load(plan_file.read_text())
    else:
        plan = make_plan(dataset, dim=3, overrides={"architecture": "dynunet"})[1]
    configs = {name: (bundle, dict(keys)) for name, (bundle, keys) in CONFIGS.items()}
    configs["unet3d dynunet (plan)"][1].update(plan)
    peak = conv_peak(1 if args.quick else 3)
    print(f"conv peak {peak['gflop_per_s']:.1f} GFLOP/s", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name, (bundle, keys) in configs.items():
        config_file = REPO_ROOT / "bundles" / bundle / "configs" / "train.yaml"
        overrides = {**keys, "dataset_dir": str(dataset)}
        folder = out / re.sub(r"\W+", "_", name).strip("_")
        results[name] = measure_in_process(config_file, overrides, folder, iterations, baseline=name == "unet3d")
        results[name]["command"] = run_command(config_file, overrides, folder / "run", epochs)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = [summarise(name, m, peak["gflop_per_s"]) for name, m in results.items()]
    rows.append(baseline_row(results["unet3d"], peak["gflop_per_s"]))
    info = machine()
    elapsed = time.perf_counter() - start
    command = " ".join(["python benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)])
    report = f"Command: {command} ({elapsed / 60:.1f} min)\n\n" + tables(rows, peak, info, epochs)
    print(report)
    (out / "throughput.md").write_text(report + "\n")
    payload = {"machine": info, "conv_peak": peak, "rows": rows, "measurements": results, "plan": plan}
    (out / "throughput.json").write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out / 'throughput.md'} and {out / 'throughput.json'}")


if __name__ == "__main__":
    main()
