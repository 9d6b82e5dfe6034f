"""``python -m custom_components.kfold run|select|report|predict``: cross-validate a bundle, or choose between bundles
(2D, 3D, their ensemble) by cross-validation; report it; predict with its ensemble or the chosen configuration."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from custom_components.data import DatasetError
from custom_components.imageio import ImageReadError
from custom_components.kfold.bundle import parse_set
from custom_components.kfold.ensemble import predict
from custom_components.kfold.report import write_report
from custom_components.kfold.runner import fold_jobs, plan_cv, run_cv
from custom_components.kfold.select import DEFAULT_BUNDLES, predict_selected, run_selection, write_selection
from custom_components.kfold.select_files import SELECT_STATE
from custom_components.kfold.splits import KFoldError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m custom_components.kfold", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="split, train and score every fold, then write the report")
    run.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/unet3d")
    run.add_argument("--dataset_dir", required=True, help="MSD-layout folder with dataset.json")
    run.add_argument("--output", required=True, help="run folder; an existing one is resumed")
    run.add_argument("--folds", type=int, help="folds per repeat; the number of cases is leave-one-out")
    run.add_argument(
        "--stratify",
        default="auto",
        help="auto: classes present and foreground size from the label maps; none; or a dataset.json field",
    )
    run.add_argument("--group", help="dataset.json field whose cases stay on one side of every split (a patient)")
    run.add_argument("--repeats", type=int, default=1, help="K-fold repeated with seeds seed, seed+1, ...")
    run.add_argument("--seed", type=int, default=0, help="seed of the splits and of each fold's training")
    run.add_argument("--parallel", type=int, default=1, help="folds at once (one GPU each where there are several)")
    run.add_argument("--splits_file", help="nnU-Net splits_final.json to use as is instead of making splits")
    run.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="bundle keys for every fold, values read as YAML (channels=[16,32,64] norm=batch amp=false)",
    )
    run.add_argument("--cv_threshold", type=float, default=0.1, help="largest fold-Dice CV called stable (0.1 = 10%%)")
    run.add_argument(
        "--print-commands",
        action="store_true",
        help="write the splits, then print one shell line per unfinished fold (train, then score) for a scheduler "
        "instead of running them; `kfold report OUTPUT` collects the folds once they ran",
    )
    run.add_argument(
        "--nproc_per_node", type=int, help="with --print-commands: each fold as a torchrun job of this many GPUs"
    )

    select = commands.add_parser(
        "select",
        help="plan and cross-validate several bundles (2D, 3D) on the same folds, score them and their ensemble out "
        "of fold, and name the best: selection.json, selection.md, selection.png",
    )
    select.add_argument("--dataset_dir", required=True, help="MSD-layout folder with dataset.json")
    select.add_argument("--output", required=True, help="selection folder; an existing one is resumed")
    select.add_argument("--folds", type=int, default=5, help="folds of the one stratified split every bundle uses")
    select.add_argument(
        "--bundles", nargs="+", default=list(DEFAULT_BUNDLES), help="bundle names under bundles/, or bundle folders"
    )
    select.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="[BUNDLE:]KEY=VALUE",
        help="bundle keys for every bundle, or for one with its name first (unet3d:patch_size=[64,64,32]); they "
        "override the plan's",
    )
    select.add_argument("--time_budget_min", type=float, help="minutes of training per fold (every bundle the same)")
    select.add_argument("--seed", type=int, default=0, help="seed of the splits and of each fold's training")
    select.add_argument("--memory_gb", type=float, default=8.0, help="the plans' memory budget of a training step")
    select.add_argument("--parallel", type=int, default=1, help="folds at once (one GPU each where there are several)")
    select.add_argument(
        "--cascade",
        action="store_true",
        help="also nnU-Net's cascade of the 3D bundle: unet3d_coarse (resolution coarse, whole volumes) and "
        "unet3d_cascade (full resolution on its out-of-fold label maps as channels) and unet3d_cascade_crop (full "
        "resolution inside the box around them)",
    )

    report = commands.add_parser(
        "report",
        help="(re)write report.json, report.md, the plots and report.html of a run, from what its folds wrote "
        "(of a selection folder: selection.json, .md and .png)",
    )
    report.add_argument("output", help="the run folder")
    report.add_argument("--cv_threshold", type=float, default=0.1, help="largest fold-Dice CV called stable")

    ensemble = commands.add_parser(
        "predict",
        help="segment images with the fold models' averaged softmax (of a selection folder: with the winner)",
    )
    ensemble.add_argument("output", help="the run folder, or the selection folder of `kfold select`")
    ensemble.add_argument("--images", nargs="+", required=True, help="images (NIfTI, PNG, TIFF) or folders of them")
    ensemble.add_argument("--out", required=True, help="folder for the label maps (<case id>_seg.nii.gz)")
    ensemble.add_argument(
        "--configuration", help="selection folder: predict with this configuration (e.g. unet2d+unet3d), not the winner"
    )
    return parser


def _plan_options(args: argparse.Namespace) -> dict:
    """The options of ``kfold run`` that define the cross-validation (custom_components.kfold.runner.plan_cv)."""
    return {
        "seed": args.seed,
        "stratify": args.stratify,
        "group": args.group,
        "repeats": args.repeats,
        "overrides": parse_set(args.set),
        "splits_file": args.splits_file,
    }


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad request ends with ``error: ...`` naming the option and the fix, not a traceback."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[kfold] %(levelname)s: %(message)s")
    try:
        if args.command == "run" and args.print_commands:  # the folds run elsewhere: one line each
            cv, layout = plan_cv(args.bundle, args.dataset_dir, args.output, args.folds, **_plan_options(args))
            print("\n".join(fold_jobs(cv, layout, args.nproc_per_node)))
            print(f"# then: python -m custom_components.kfold report {args.output}", file=sys.stderr)
            return 0
        if args.command == "run":
            report = run_cv(
                args.bundle,
                args.dataset_dir,
                args.output,
                args.folds,
                parallel=args.parallel,
                cv_threshold=args.cv_threshold,
                **_plan_options(args),
            )
        elif args.command == "select" or (args.command == "report" and (Path(args.output) / SELECT_STATE).is_file()):
            selection = (
                run_selection(
                    args.dataset_dir,
                    args.output,
                    args.folds,
                    bundles=args.bundles,
                    sets=args.set,
                    time_budget_min=args.time_budget_min,
                    seed=args.seed,
                    memory_gb=args.memory_gb,
                    parallel=args.parallel,
                    cascade=args.cascade,
                )
                if args.command == "select"
                else write_selection(args.output)
            )
            print(selection["verdict"])
            print(f"selection: {args.output}/selection.md")
            return 0
        elif args.command == "report":
            report = write_report(args.output, args.cv_threshold)
        else:
            if (Path(args.output) / SELECT_STATE).is_file():
                written = predict_selected(args.output, args.images, args.out, args.configuration)
            elif args.configuration:
                raise KFoldError(f"--configuration: {args.output} is not a `kfold select` folder")
            else:
                written = predict(args.output, args.images, args.out)
            print(f"wrote {len(written)} label map(s) to {args.out}")
            return 0
    except (KFoldError, DatasetError, ImageReadError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: start the same command again to resume")
    print(report["verdict"]["text"])
    print(f"report: {args.output}/report.md")
    if report["failed"]:
        print(f"failed folds: {', '.join(report['failed'])} (their logs are in their folders)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
