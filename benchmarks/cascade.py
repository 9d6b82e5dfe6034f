"""The two-stage cascade against the single-stage 3D bundle on a small target in a large volume.

One table: out-of-fold and held-out Dice and HD95 per class, training minutes and inference seconds per case.

The data: ``--cases`` synthetic CT-like volumes of the ``nodule`` kind (custom_components.synthetic: about 200 x 200 x
120 voxels of 1 x 1 x 1.5 mm, an organ of about 5 cm, a nodule of about 10 mm on its surface and unlabelled look-alikes
of the nodule farther away) and ``--test-cases`` more, held out (dataset.json's labelled ``test`` entries). Three
K-fold runs of bundles/unet3d through the user's command (``python -m custom_components.kfold run``), on the same
folds (one ``--seed``), the plans cached in ``OUT/plan_cache``:

- ``single``: the single stage, ``time_budget_min`` = ``--single-minutes`` per fold (default twice ``--minutes``: the
  cascade's two stages together, so both train as long);
- ``coarse``: stage 1, ``resolution=coarse`` (a spacing at which a whole volume fits one patch), ``--minutes``;
- ``cascade``: stage 2 at full resolution, ``previous_stage=OUT/coarse`` (each case's out-of-fold stage-1 label map as
  extra input channels), ``--minutes``;
- ``crop``: stage 2 at full resolution on the same stage 1 with ``stage_input=crop`` (trained and predicted inside the
  box around stage 1's foreground widened by ``stage_margin_mm``), ``--minutes``.

Then ``python -m custom_components.kfold predict`` of each run on the held-out images, timed from start to exit
(start-up and model loading included; the cascade's runs stage 1 and stage 2), and its label maps scored against the
held-out labels on each image's own grid: Dice (``kfold.evaluation.label_dice``) and HD95 in mm
(``metrics.surface_scores``), empty masks decided as the bundles' evaluation decides them. A finished run (every fold
in its report.json finished) is not started again and an unfinished one is resumed by ``kfold run`` itself; a
prediction recorded in ``cascade.json`` for the same fold models is kept. Run from the repository root:

    python benchmarks/cascade.py [--minutes 2] [--single-minutes M] [--cases 12] [--test-cases 3] [--folds 3]
        [--seed 0] [--runs single coarse cascade crop] [--shape 200 200 120] [--out runs/bench_cascade]

Writes ``cascade.md`` and ``cascade.json`` into ``--out``; the commands' output goes to ``OUT/logs/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from dice_per_minute import WORKERS
from monai.data.utils import affine_to_spacing
from monai.networks.utils import one_hot
from throughput import conv_peak, machine, machine_text

from custom_components.data import case_id, load_dataset_json
from custom_components.imageio import read_image
from custom_components.kfold.evaluation import dice_scores, label_dice
from custom_components.metrics import summary, surface_scores
from custom_components.paths import REPO_ROOT
from custom_components.run_files import atomic_write_json
from custom_components.synthetic import KINDS, write_dataset

KIND = "nodule"
RUNS = {
    "single": "single stage",
    "coarse": "stage 1 alone (coarse)",
    "cascade": "cascade (stage 1 + 2, channels)",
    "crop": "cascade (stage 1 + 2, crop)",
}
STAGE_TWO = ("cascade", "crop")  # the runs on stage 1's out-of-fold maps
# for the estimate, on 2 CPU cores at the default shape: a fold's time outside its budget (start, plan, data check and
# cache, final scoring), and a held-out case's in a run (kfold run's own scoring of dataset.json's test cases with
# the ensemble, then the benchmark's timed prediction: about a minute each)
START_MIN, PREDICT_MIN = 1.5, 2.0


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """What the benchmark's folder depends on: a folder started with other values is not resumed."""
    keys = ("cases", "test_cases", "folds", "minutes", "single_minutes", "seed", "shape")
    return {key: getattr(args, key) for key in keys}


def read_state(path: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The benchmark's state (its options and recorded predictions); stops if the folder was started otherwise."""
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state and state.get("options") != dict(options):
        differ = ", ".join(
            f"{k}: {state['options'].get(k)} -> {v}" for k, v in options.items() if state["options"].get(k) != v
        )
        sys.exit(f"error: {path.parent} holds a benchmark started with other options ({differ}): pass a new --out")
    return {"options": dict(options), "predictions": state.get("predictions", {})}


def prepare_data(out: Path, args: argparse.Namespace) -> Path:
    """The dataset with its held-out cases, written once (dataset.json last: a killed write is written again)."""
    dataset = out / "data"
    if not (dataset / "dataset.json").is_file():
        start = time.perf_counter()
        write_dataset(dataset, args.cases, args.seed, shape=tuple(args.shape), kind=KIND, test_cases=args.test_cases)
        seconds = (time.perf_counter() - start) / (args.cases + args.test_cases)
        print(f"wrote {args.cases} + {args.test_cases} held-out cases, {seconds:.1f} s a case", flush=True)
    return dataset


def run_sets(name: str, out: Path, args: argparse.Namespace) -> list[str]:
    """The ``--set`` keys of run ``name``: its budget and stage, the plan cache, the data-loading workers."""
    common = [f"plan_cache_dir={out / 'plan_cache'}", f"num_workers={WORKERS}"]
    if name == "single":
        return [f"time_budget_min={args.single_minutes}", *common]
    if name == "coarse":
        return ["resolution=coarse", f"time_budget_min={args.minutes}", *common]
    stage = [f"previous_stage={out / 'coarse'}", f"stage_input={'crop' if name == 'crop' else 'channels'}"]
    return [*stage, f"time_budget_min={args.minutes}", *common]


def read_report(run_dir: Path) -> dict[str, Any] | None:
    """The run's report.json, or None before it is written."""
    path = run_dir / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def finished_folds(report: Mapping[str, Any] | None) -> list[str]:
    """The names of the report's finished folds."""
    return [fold["name"] for fold in (report or {}).get("folds", []) if fold["status"] == "finished"]


def kfold(*args: str) -> list[str]:
    """The user's command ``python -m custom_components.kfold`` with ``args``."""
    return [sys.executable, "-m", "custom_components.kfold", *args]


def run_command(args: Sequence[str], log: Path) -> float:
    """Run ``args`` from the repository root with its output appended to ``log``; the seconds it took. A failure
    stops the benchmark naming the log (starting it again resumes)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(args)}\n")
        handle.flush()
        status = subprocess.run(args, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status:
        sys.exit(
            f"error: `{' '.join(args[2:4])} ...` exited with {status}: see {log}; run the benchmark again to retry"
        )
    return time.perf_counter() - start


def cross_validate(name: str, dataset: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``name``'s ``kfold run`` unless every fold already finished; its report."""
    run_dir = out / name
    if len(finished_folds(read_report(run_dir))) < args.folds:
        command = kfold("run", "--bundle", str(REPO_ROOT / "bundles" / "unet3d"), "--dataset_dir", str(dataset))
        command += ["--folds", str(args.folds), "--output", str(run_dir), "--seed", str(args.seed)]
        command += ["--set", *run_sets(name, out, args)]
        print(f"{name}: kfold run, log {out / 'logs' / f'{name}.log'}", flush=True)
        seconds = run_command(command, out / "logs" / f"{name}.log")
        print(f"{name}: {seconds / 60:.1f} min", flush=True)
    return json.loads((run_dir / "report.json").read_text())  # kfold run wrote it before it exited with 0


def predict(name: str, dataset: Path, out: Path, report: Mapping[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """``kfold predict`` of run ``name`` on the held-out images into ``OUT/predictions/<name>``, timed; kept when
    recorded for the same fold models with every label map written."""
    pred_dir = out / "predictions" / name
    images = sorted((dataset / "imagesTs").iterdir())
    expected = [pred_dir / f"{case_id(image)}_seg.nii.gz" for image in images]
    models = finished_folds(report)
    recorded = state["predictions"].get(name)
    if recorded and recorded["models"] == models and all(path.is_file() for path in expected):
        return recorded
    shutil.rmtree(pred_dir, ignore_errors=True)
    command = kfold("predict", str(out / name), "--images", str(dataset / "imagesTs"), "--out", str(pred_dir))
    seconds = run_command(command, out / "logs" / f"predict_{name}.log")
    state["predictions"][name] = {"models": models, "cases": len(images), "seconds": round(seconds, 2)}
    print(f"{name}: predicted {len(images)} held-out cases in {seconds:.0f} s", flush=True)
    return state["predictions"][name]


def score(pred_dir: Path, dataset: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """Dice and HD95 (mm) per class of the label maps in ``pred_dir`` against the held-out labels, on each image's
    grid: MONAI's reductions for the Dice (mean, per class, per case), mean, median and SD for the HD95."""
    rows, hd95, cases = [], [], []
    for entry in load_dataset_json(dataset)["test"]:
        case = case_id(entry["image"])
        predicted, _ = read_image(pred_dir / f"{case}_seg.nii.gz")
        label, affine = read_image(dataset / entry["label"])
        if predicted.shape != label.shape:
            sys.exit(f"error: {pred_dir / case}_seg.nii.gz is {predicted.shape}, its label {label.shape}: not its grid")
        predicted, label = torch.as_tensor(predicted, dtype=torch.long), torch.as_tensor(label, dtype=torch.long)
        rows.append(label_dice(predicted, label, len(class_names) + 1))
        onehots = [one_hot(x[None, None], len(class_names) + 1, dim=1) for x in (predicted, label)]
        spacing = [float(v) for v in affine_to_spacing(torch.as_tensor(affine), r=3)]
        hd95.append(surface_scores(*onehots, "hd95", 0.0, spacing)[0].tolist())
        cases.append(case)
    scores = dice_scores(torch.stack(rows), class_names, cases)
    for case, row in zip(cases, hd95, strict=True):
        scores["cases"][case]["hd95"] = dict(zip(class_names, row, strict=True))
    scores["hd95_per_class"] = {name: summary([row[index] for row in hd95]) for index, name in enumerate(class_names)}
    return scores


def training_minutes(run_dir: Path, report: Mapping[str, Any]) -> float:
    """Minutes of training summed over the run's finished folds (each metrics.json's ``training_time_s``)."""
    seconds = [
        json.loads((run_dir / fold / "metrics.json").read_text())["training_time_s"] for fold in finished_folds(report)
    ]
    return sum(seconds) / 60


def row(
    name: str,
    out: Path,
    reports: Mapping[str, Mapping[str, Any]],
    held_out: Mapping[str, Any],
    timing: Mapping[str, Any],
) -> dict[str, Any]:
    """One row's numbers: the run's out-of-fold scores (report.json), its training minutes (the cascade's with stage
    1's), the held-out scores and the inference seconds per case."""
    report = reports[name]
    oof = report["summary"]
    hd95 = oof.get("oof_metrics", {}).get("hd95", {})
    minutes = training_minutes(out / name, report)
    if name in STAGE_TWO:
        minutes += training_minutes(out / "coarse", reports["coarse"])
    return {
        "folds_finished": oof["folds_finished"],
        "oof_mean_dice": oof["oof_mean_dice"]["mean"],
        "oof_dice_per_class": {c: v["mean"] for c, v in oof["oof_dice_per_class"].items()},
        "oof_hd95_per_class": {c: hd95.get(c, {}).get("mean") for c in report["classes"]},
        "dice_space": report["dice_space"],
        "training_min": minutes,
        "held_out": held_out,
        "ensemble_test_dice": report["ensemble"].get("dice_per_class"),  # kfold run's own scoring: the same ensemble
        "inference_s": timing["seconds"],
        "inference_s_per_case": timing["seconds"] / timing["cases"],
    }


def cell(value: float | None, digits: int) -> str:
    """A number for the table; a dash where there is none (a class no case scored)."""
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> str:
    """Markdown: one row per run, the out-of-fold scores, training minutes, the held-out scores, inference time."""
    head = [
        "run",
        "OOF mean Dice",
        *[f"OOF Dice {c}" for c in class_names],
        *[f"OOF HD95 {c} (mm)" for c in class_names],
    ]
    head += ["training (min)", "held-out mean Dice", *[f"held-out Dice {c}" for c in class_names]]
    head += [*[f"held-out HD95 {c} (mm)" for c in class_names], "inference (s / case)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        held = r["held_out"]
        cells = [RUNS[name], cell(r["oof_mean_dice"], 3), *[cell(r["oof_dice_per_class"][c], 3) for c in class_names]]
        cells += [cell(r["oof_hd95_per_class"][c], 1) for c in class_names]
        cells += [cell(r["training_min"], 1), cell(held["mean_dice"], 3)]
        cells += [cell(held["dice_per_class"][c], 3) for c in class_names]
        cells += [cell(held["hd95_per_class"][c]["mean"], 1) for c in class_names]
        cells += [cell(r["inference_s_per_case"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Cross-validate the single stage and the cascade's two stages, predict the held-out cases with each, print the
    table and write the report files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cascade"), help="data, runs, predictions, results")
    parser.add_argument("--cases", type=int, default=12, help="training cases (cross-validated)")
    parser.add_argument("--test-cases", type=int, default=3, help="held-out cases (predicted and scored)")
    parser.add_argument("--folds", type=int, default=3, help="folds of each run")
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per fold of each cascade stage")
    parser.add_argument(
        "--single-minutes", type=float, help="the single stage's budget per fold (default 2 x --minutes)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the folds and the training")
    parser.add_argument(
        "--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (cascade and crop bring coarse)"
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(KINDS[KIND][3]),
        help="typical volume in voxels (smaller: a quick check)",
    )
    args = parser.parse_args(argv)
    args.single_minutes = args.single_minutes or 2 * args.minutes
    names = [name for name in RUNS if name in args.runs or (name == "coarse" and set(STAGE_TWO) & set(args.runs))]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    budgets = {"single": args.single_minutes, "coarse": args.minutes, "cascade": args.minutes, "crop": args.minutes}
    total = sum(args.folds * (budgets[name] + START_MIN) + args.test_cases * PREDICT_MIN for name in names)
    print(
        f"{len(names)} runs of {args.folds} folds: about {total:.0f} min on 2 CPU cores (each fold {START_MIN:g} min "
        f"outside its budget, each held-out case {PREDICT_MIN:g} min of prediction a run)",
        flush=True,
    )
    start = time.perf_counter()
    state_file = out / "cascade.json"
    state = read_state(state_file, options_of(args))
    atomic_write_json(state, state_file)
    dataset = prepare_data(out, args)
    class_names = list(KINDS[KIND][1].values())[1:]
    peak = conv_peak(3)
    print(f"conv peak {peak['gflop_per_s']:.1f} GFLOP/s", flush=True)
    reports = {name: cross_validate(name, dataset, out, args) for name in names}
    results = {}
    for name in names:
        timing = predict(name, dataset, out, reports[name], state)
        atomic_write_json(state, state_file)
        held_out = score(out / "predictions" / name, dataset, class_names)
        results[name] = row(name, out, reports, held_out, timing)
    info = machine()
    command = " ".join(["python benchmarks/cascade.py", *(sys.argv[1:] if argv is None else argv)])
    shape = " x ".join(map(str, args.shape))
    report = "\n\n".join(
        [
            f"Command: {command} ({(time.perf_counter() - start) / 60:.0f} min)",
            table(results, class_names),
            f"Data: {args.cases} training and {args.test_cases} held-out synthetic volumes of the `{KIND}` kind (about "
            f"{shape} voxels of {' x '.join(f'{s:g}' for s in KINDS[KIND][4])} mm, an organ of about 5 cm, a nodule of "
            f"about 10 mm on its surface, unlabelled look-alikes of the nodule elsewhere), seed {args.seed}. "
            f"{args.folds}-fold cross-validation of bundles/unet3d on the same folds; each fold trained "
            f"{args.single_minutes:g} min (single stage) or {args.minutes:g} min a stage (`time_budget_min`). "
            "OOF: each case scored by the fold model that did not train on it, in the run's validation space "
            "(resampled to its spacing: stage 1's coarse grid for stage 1 alone), means over cases. Training: the "
            "folds' `training_time_s` summed, both stages for the cascades. Held-out: the K fold models' ensemble "
            "(`kfold predict`) on the held-out cases, scored on each image's own grid; HD95 of a class missed or "
            "falsely found is the image's diagonal. Inference: `kfold predict`'s wall clock over the held-out cases "
            "(start-up and model loading included; the cascade's runs both stages).",
            machine_text(info, peak, WORKERS),
        ]
    )
    print(report)
    (out / "cascade.md").write_text(report + "\n")
    atomic_write_json({**state, "results": results, "conv_peak": peak, "machine": info}, state_file)


if __name__ == "__main__":
    main()
