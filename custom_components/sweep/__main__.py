"""``python -m custom_components.sweep run|report``: search a bundle's settings with Optuna, then rank the trials."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from custom_components.sweep.report import write_report
from custom_components.sweep.runner import check_request, run_sweep
from custom_components.sweep.space import SYNTAX, SweepError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m custom_components.sweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run trials until the study has --trials finished ones, then report")
    run.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/unet3d")
    run.add_argument("--dataset_dir", required=True, help="MSD-layout folder with dataset.json")
    run.add_argument("--output", required=True, help="folder of the trial runs, the report and the default storage")
    run.add_argument("--trials", type=int, required=True, help="COMPLETE + PRUNED trials wanted in the study in all")
    run.add_argument(
        "--space", nargs="+", action="extend", required=True, metavar="KEY=DIST:...", help=f"a searched key: {SYNTAX}"
    )
    run.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="bundle keys for every trial, values read as YAML (max_epochs=100 norm=batch amp=false)",
    )
    run.add_argument("--folds", type=int, help="cross-validate each trial with `kfold run` on this many folds")
    run.add_argument("--time_budget_min", type=float, help="minutes of training per trial (per fold with --folds)")
    run.add_argument("--seed", type=int, default=0, help="seed of the sampler (trial N draws from seed + N)")
    run.add_argument("--study", default="sweep", help="study name in the storage")
    run.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUTPUT/study.db)")

    report = commands.add_parser("report", help="(re)write the ranked report, plots and best.yaml of a study")
    report.add_argument("output", help="the --output folder of `sweep run`")
    report.add_argument("--study", default="sweep", help="study name in the storage")
    report.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUTPUT/study.db)")
    return parser


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a scheduler ending the job) as Ctrl-C: the running trial is stopped and marked failed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad request ends with ``error: ...`` naming each argument and its fix, no traceback."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[sweep] %(levelname)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep logs each trial's start and end itself
    try:
        if args.command == "report":
            report = write_report(args.output, args.storage, args.study)
        else:
            signal.signal(signal.SIGTERM, _interrupted)
            sweep = check_request(
                args.bundle,
                args.dataset_dir,
                args.output,
                args.trials,
                args.space,
                args.set,
                args.folds,
                args.time_budget_min,
            )
            report = run_sweep(sweep, args.seed, args.study, args.storage)
    except SweepError as err:
        sys.exit(f"error: {err}")
    except UpdateFinishedTrialError as err:
        sys.exit(f"error: {err}: another process failed this trial as its heartbeat stopped; start the command again")
    except KeyboardInterrupt:
        sys.exit("interrupted: start the same command again to resume (finished trials are kept)")
    best = report["best"]
    if best:
        print(f"best: trial {best['trial']}, Dice {best['value']:.4f}, {best['folder']}")
    print(
        f"report: {args.output}/sweep_report.md"
        + (f"; best settings: {report['best_config']}" if report["best_config"] else "")
    )
    return 1 if report.get("gave_up") or not best else 0


if __name__ == "__main__":
    sys.exit(main())
