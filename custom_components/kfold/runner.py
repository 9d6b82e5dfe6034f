"""Every fold of a cross-validation through the user's own ``monai.bundle`` commands: resumable, in parallel.

Each fold is the bundle's ``training`` command, run from its own folder with its own log: the bundle's train.yaml
(the user's ``--set`` keys, ``fold`` / ``splits_file`` / ``output_dir`` / ``seed`` set per fold), which makes the
fold folder a run bundle (``custom_components.run_bundle``) and, at its end, scores its best model on its validation
cases with the fold's own ``configs/evaluate.yaml`` (``report``: evaluation/ and the fold's report.html, in the same
process). Only a fold trained but not scored (its end-of-training scoring failed, or was interrupted) gets the
``evaluating`` command of that evaluate.yaml (the fold, the splits file and every model key are literal in it:
nothing is replayed). A fold counts as finished once it has trained ``max_epochs`` and been scored; a run started
again skips finished folds, only scores a trained but unscored one, and the bundle resumes an interrupted training
from its ``models/checkpoint_last.pt`` (same ``output_dir``). A failed fold is recorded and the others go on.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from custom_components import settings
from custom_components.bundle import bundle_command, changed_options, command_line_value
from custom_components.data import check_datalist, load_dataset_json
from custom_components.kfold.bundle import Bundle
from custom_components.kfold.ensemble import score_test_cases
from custom_components.kfold.layout import (
    CASE_FIELDS,
    CASES_FILE,
    EVALUATE_CONFIG,
    EVALUATION_DIR,
    EVALUATION_FILE,
    FAILED_FILE,
    IDENTITY,
    REMADE_FIX,
    SPLIT_FIELDS,
    SPLITS_FILE,
    STATE_FILE,
    Fold,
    fold_finished,
    fold_layout,
    read_list,
    read_state,
    training_finished,
)
from custom_components.kfold.report import write_report
from custom_components.kfold.splits import KFoldError, describe_cases, load_splits, make_splits
from custom_components.run_files import atomic_write_json

logger = logging.getLogger(__name__)

# Fold logs are files: no progress-bar redraws in them unless the user asks (--set progress_bar=true). A fold scores
# its best model at the end of its training, in that process (report: evaluation/ and its report.html).
FOLD_DEFAULTS = {"progress_bar": False, "report": True}


@dataclass(frozen=True)
class CrossValidation:
    """What every fold of one ``kfold run`` gets: the options of this invocation (the user's command line), never
    values read back from kfold.json, and ``max_epochs`` as read from the bundle with them."""

    bundle: Bundle
    dataset_dir: Path
    output: Path
    seed: int
    overrides: Mapping[str, Any]
    max_epochs: int


def available_cpus() -> int:
    """CPU cores this process may use (its affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA device ids the folds may use, as CUDA_VISIBLE_DEVICES would name them."""
    count = torch.cuda.device_count()
    listed = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def fold_environment(slot: int, parallel: int, cpus: int, gpus: Sequence[str]) -> dict[str, str]:
    """Environment variables for the fold running in ``slot`` of ``parallel``.

    Several GPUs: one per fold (round robin). Otherwise, with folds in parallel, each gets an equal share of the
    CPU threads, so that N PyTorch processes do not each start one thread per core.
    """
    if len(gpus) > 1:
        return {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
    if parallel > 1:
        threads = str(max(1, cpus // parallel))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return {}


def fold_overrides(cv: CrossValidation, fold: Fold) -> dict[str, Any]:
    """The bundle keys of one fold's training: the user's ``--set`` keys plus this fold's split, folder and seed."""
    return {
        **FOLD_DEFAULTS,
        **cv.overrides,
        "dataset_dir": str(cv.dataset_dir),
        "output_dir": str(fold.path),
        "fold": fold.index,
        "splits_file": str(cv.output / SPLITS_FILE),
        "seed": cv.seed + fold.repeat,
    }


def training_command(cv: CrossValidation, fold: Fold, nproc_per_node: int | None = None) -> list[str]:
    """``python -m monai.bundle run training`` of the bundle's train.yaml for ``fold``; every value written so that
    the bundle receives exactly the value given (a string stays a string). With ``nproc_per_node``, the same as a
    ``torchrun`` command with the bundle's multi-GPU overlay (one process per GPU)."""
    overrides = {key: command_line_value(value) for key, value in fold_overrides(cv, fold).items()}
    if nproc_per_node is None:
        return bundle_command("training", [cv.bundle.config("train")], overrides)
    configs = [cv.bundle.config("train"), cv.bundle.config("multi_gpu_train")]
    _python, _module, *bundle_args = bundle_command("training", configs, overrides)  # [python, -m, monai.bundle, ...]
    return ["torchrun", f"--nproc_per_node={nproc_per_node}", "-m", *bundle_args]


def fold_job(cv: CrossValidation, fold: Fold, nproc_per_node: int | None = None) -> str:
    """One shell line that trains ``fold`` (resuming it if started) and, unless its training scored it, scores it, as
    ``kfold run`` would: a job for a scheduler on any machine that sees the CV folder; ``kfold report`` then collects
    what the folds wrote."""
    train, score = training_command(cv, fold, nproc_per_node), evaluation_command(fold)
    folder, scored = shlex.quote(str(fold.path)), shlex.quote(str(fold.path / EVALUATION_FILE))
    return f"mkdir -p {folder} && {shlex.join(train)} && {{ test -f {scored} || {shlex.join(score)}; }}"


def evaluation_command(fold: Fold) -> list[str]:
    """``python -m monai.bundle run evaluating`` of the fold's own configs/evaluate.yaml into its evaluation/."""
    return bundle_command("evaluating", [fold.path / EVALUATE_CONFIG], {"output_dir": fold.path / EVALUATION_DIR})


def _run_logged(command: list[str], log: Path, cwd: Path, env: Mapping[str, str]) -> int:
    """Run ``command`` with its output appended to ``log`` under a dated header; its exit status."""
    with open(log, "a") as handle:
        handle.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {shlex.join(command)}\n")
        handle.flush()
        return subprocess.run(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode


def run_fold(cv: CrossValidation, fold: Fold, env: Mapping[str, str]) -> str | None:
    """Train one fold (resuming it if it was interrupted) unless it is trained, which scores it at its end; score it
    with its own evaluate.yaml if it is still unscored. An error message, or None if it finished. The commands run in
    the fold folder."""
    fold.path.mkdir(parents=True, exist_ok=True)
    (fold.path / FAILED_FILE).unlink(missing_ok=True)
    log = fold.path / "fold.log"

    def run(step: str, command: list[str]) -> str | None:
        logger.info("%s: %s (log: %s)", fold.name, step, log)
        returncode = _run_logged(command, log, fold.path, env)
        if returncode == 0:
            return None
        atomic_write_json({"step": step, "returncode": returncode, "log": str(log)}, fold.path / FAILED_FILE)
        return f"{fold.name}: {step} exited with status {returncode}; see {log}"

    if not training_finished(fold.path, cv.max_epochs):
        (fold.path / EVALUATION_FILE).unlink(missing_ok=True)  # a score of a shorter training would be stale
        error = run("training", training_command(cv, fold))
        if error:
            return error
    if (fold.path / EVALUATION_FILE).is_file():  # the training scored its best model itself
        return None
    return run("evaluating", evaluation_command(fold))


def run_folds(cv: CrossValidation, folds: Sequence[Fold], parallel: int) -> list[str]:
    """Run the unfinished folds, ``parallel`` at a time; the error messages of those that failed."""
    todo = [fold for fold in folds if not fold_finished(fold.path, cv.max_epochs)]
    for fold in folds:
        if fold not in todo:
            logger.info("%s: already finished, skipped", fold.name)
    gpus, cpus = visible_gpus(), available_cpus()
    if gpus and parallel > len(gpus):
        logger.warning("--parallel %d: %d folds will share %d GPU(s)", parallel, parallel, len(gpus))
    elif parallel > cpus:
        logger.warning("--parallel %d exceeds the %d CPU cores: each fold gets a single thread", parallel, cpus)
    slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(parallel):
        slots.put(slot)

    def work(fold: Fold) -> str | None:
        slot = slots.get()
        try:
            env = {**os.environ, **fold_environment(slot, parallel, cpus, gpus)}
            return run_fold(cv, fold, env)
        finally:
            slots.put(slot)

    failures = []
    with (
        logging_redirect_tqdm(),
        tqdm(total=len(folds), initial=len(folds) - len(todo), desc="folds", unit="fold") as progress,
        ThreadPoolExecutor(max_workers=parallel) as pool,
    ):
        futures = {pool.submit(work, fold): fold for fold in todo}
        for future in as_completed(futures):
            error = future.result()
            if error:
                logger.error("%s", error)
                failures.append(error)
            else:
                logger.info("%s: finished", futures[future].name)
            progress.update()
    return failures


def _check_identity(output: Path, state: Mapping[str, Any]) -> None:
    """A run started again must use the options it was started with; name those that differ."""
    if not (output / STATE_FILE).is_file():
        return
    previous = read_state(output)

    def option(key: str, value: Any) -> str:
        if key == "overrides":
            return "--set " + (" ".join(f"{k}={json.dumps(v)}" for k, v in (value or {}).items()) or "(none)")
        return f"--{key} {value}" if value is not None else f"--{key} not given"

    changed = changed_options(previous, state, IDENTITY, option)
    if changed:
        raise KFoldError(
            f"{output} was started with other options: {', '.join(changed)}. Pass the same options to resume "
            "it, or a new --output for a new cross-validation"
        )


def prepare(
    bundle: Bundle,
    dataset_dir: Path,
    output: Path,
    folds: int | None,
    seed: int,
    stratify: str,
    group: str | None,
    repeats: int,
    overrides: Mapping[str, Any],
    splits_file: Path | None,
) -> dict[str, Any]:
    """Check the dataset and the request, then write ``kfold.json``, ``cases.json`` and ``splits.json``.

    Runs before any training, so that a bad dataset or an impossible split stops the run with a message. A
    folder started before keeps its cases and splits (and must be resumed with the same options). ``kfold.json``
    is a record (data): nothing in it is ever handed to a config parser or a fold's command.
    """
    description = load_dataset_json(dataset_dir)
    keys = ("num_classes", "in_channels", "image_dims", "max_epochs", "val_interval", "class_names")
    parsed = bundle.parsed({**overrides, "dataset_dir": str(dataset_dir)}, keys)
    if parsed["val_interval"] > parsed["max_epochs"]:
        raise KFoldError(
            f"val_interval {parsed['val_interval']} > max_epochs {parsed['max_epochs']}: no fold would ever validate, "
            "so none would write the model.pt that is scored; lower val_interval with --set"
        )
    datalist = check_datalist(description, dataset_dir, parsed["num_classes"], parsed["image_dims"])
    state = {
        "bundle": str(bundle.path),
        "dataset_dir": str(dataset_dir),
        "folds": folds,
        "repeats": repeats,
        "seed": seed,
        "stratify": stratify,
        "group": group,
        "splits_file": str(splits_file) if splits_file else None,
        "overrides": json.loads(json.dumps(dict(overrides), default=str)),  # as kfold.json holds them
        "class_names": list(parsed["class_names"]),
        "num_classes": int(parsed["num_classes"]),
        "in_channels": int(parsed["in_channels"]),
        "image_dims": int(parsed["image_dims"]),
        "max_epochs": int(parsed["max_epochs"]),
    }
    _check_identity(output, state)
    cases_path, splits_path = output / CASES_FILE, output / SPLITS_FILE
    if cases_path.is_file():
        cases = read_list(cases_path, CASE_FIELDS, REMADE_FIX)
    else:
        cases = describe_cases(datalist, state["class_names"], state["image_dims"])
    if splits_path.is_file():
        splits = read_list(splits_path, SPLIT_FIELDS, REMADE_FIX)
    elif splits_file:
        splits = load_splits(splits_file, [case["case"] for case in cases])
    else:
        if folds is None:
            raise KFoldError("--folds is required unless --splits_file gives the splits")
        splits = make_splits(
            cases, folds, seed, stratify, group, repeats, state["class_names"], dataset_dir / "dataset.json"
        )
    fold_count = folds or len(splits)
    if len(splits) % fold_count:
        raise KFoldError(
            f"{splits_file or splits_path} has {len(splits)} splits, not a multiple of --folds {fold_count}: pass "
            "--folds with the number of folds per repeat"
        )
    state["fold_count"] = fold_count
    state["split_count"] = len(splits)
    atomic_write_json(state, output / STATE_FILE)
    atomic_write_json(cases, cases_path)
    atomic_write_json(splits, splits_path)
    return state


def plan_cv(
    bundle: str | Path,
    dataset_dir: str | Path,
    output: str | Path,
    folds: int | None = None,
    *,
    seed: int = 0,
    stratify: str = "auto",
    group: str | None = None,
    repeats: int = 1,
    overrides: Mapping[str, Any] | None = None,
    splits_file: str | Path | None = None,
) -> tuple[CrossValidation, list[Fold]]:
    """Check the ``--set`` keys, the dataset and the request, write kfold.json, cases.json and splits.json (a folder
    started before keeps them), and return what every fold gets with the folds' layout; nothing is trained."""
    found = Bundle.find(bundle)
    output, dataset_dir = Path(output).resolve(), Path(dataset_dir).resolve()
    overrides = dict(overrides or {})
    problems = settings.check(overrides, found.path, "train")  # every --set key, before any work
    if problems:
        raise KFoldError(settings.report(problems, found.path, "train", "--set"))
    state = prepare(
        found,
        dataset_dir,
        output,
        folds,
        seed,
        stratify,
        group,
        repeats,
        overrides,
        Path(splits_file).resolve() if splits_file else None,
    )
    cv = CrossValidation(found, dataset_dir, output, seed, overrides, state["max_epochs"])
    return cv, fold_layout(output, state["fold_count"], state["split_count"])


def fold_jobs(cv: CrossValidation, layout: Sequence[Fold], nproc_per_node: int | None = None) -> list[str]:
    """The shell line (:func:`fold_job`) of every fold not finished yet: ``kfold run --print-commands``."""
    return [fold_job(cv, fold, nproc_per_node) for fold in layout if not fold_finished(fold.path, cv.max_epochs)]


def run_cv(
    bundle: str | Path,
    dataset_dir: str | Path,
    output: str | Path,
    folds: int | None = None,
    *,
    parallel: int = 1,
    cv_threshold: float = 0.1,
    **options: Any,
) -> dict[str, Any]:
    """Cross-validate a bundle on a dataset: splits, every fold trained and scored, the ensemble, the report.

    ``options`` are those of :func:`plan_cv` (``seed``, ``stratify``, ``group``, ``repeats``, ``overrides``,
    ``splits_file``); ``overrides`` are bundle keys for every fold, values as
    :func:`custom_components.bundle.parse_key_values` reads ``--set`` (``{"channels": [16, 32, 64], "norm":
    "batch"}``). Returns the report (also written as ``report.json`` / ``report.md``); its ``failed`` list names
    the folds that did not finish. Starting it again on the same ``output`` with the same options resumes it.
    """
    if parallel < 1:
        raise KFoldError(f"--parallel {parallel}: run at least one fold at a time")
    cv, layout = plan_cv(bundle, dataset_dir, output, folds, **options)
    return complete_cv(cv, layout, parallel, cv_threshold)


def complete_cv(
    cv: CrossValidation, layout: Sequence[Fold], parallel: int = 1, cv_threshold: float = 0.1
) -> dict[str, Any]:
    """Run the unfinished folds of a planned cross-validation, score the ensemble on the test cases, write the
    report; the report (its ``failed`` list names the folds that did not finish)."""
    failures = run_folds(cv, layout, parallel)
    if len(failures) < len(layout):
        score_test_cases(cv.output)
    return write_report(cv.output, cv_threshold)
