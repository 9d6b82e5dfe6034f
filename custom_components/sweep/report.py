"""``sweep report``: the trials of a study ranked, the importance of each setting, Optuna's plots, and the best
settings as a plan file (``best.yaml``, read as data by ``--plan_file``) for training the final model.

Everything is read from the storage as data (trial values, params, user attrs) and written as data: nothing read
is evaluated, and ``best.yaml`` is refused a value that MONAI would evaluate (``$``, ``@``, ``%`` first).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import FrozenTrial, TrialState

from custom_components.bundle import expression_ids
from custom_components.figures import png_bytes, pyplot
from custom_components.run_files import atomic_write_bytes, atomic_write_json
from custom_components.sweep.layout import BEST_CONFIG, REPORT_JSON, REPORT_MD, STUDY_FILE
from custom_components.sweep.space import SweepError
from custom_components.sweep.study import OPTIONS_ATTR, load_study, shown_url, storage_url
from custom_components.sweep.trial import shown

logger = logging.getLogger(__name__)

MIN_IMPORTANCE_TRIALS = 3  # PED-ANOVA compares the best trials with all: below this it has nothing to compare
# the order of the table after the ranked COMPLETE trials
STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3}


def _rank_key(trial: FrozenTrial) -> tuple[int, float, int]:
    value = -trial.value if trial.state == TrialState.COMPLETE and trial.value is not None else 0.0
    return STATE_ORDER.get(trial.state, 4), value, trial.number


def _note(trial: FrozenTrial) -> str:
    """Why a trial ended as it did: pruned at an epoch, its error, a retry of a trial whose process died."""
    attrs, notes = trial.user_attrs, []
    if trial.state == TrialState.PRUNED and "pruned_at" in attrs:
        notes.append(f"pruned at epoch {attrs['pruned_at'].get('epoch')}")
    if trial.state == TrialState.FAIL:
        notes.append(attrs.get("error") or "its process stopped (killed, or its machine went down)")
    if "failed_trial" in trial.system_attrs:
        notes.append(f"retry of trial {trial.system_attrs['failed_trial']}")
    return "; ".join(notes)


def _row(trial: FrozenTrial, rank: int | None, output: Path) -> dict[str, Any]:
    folder = trial.user_attrs.get("folder")
    return {
        "rank": rank,
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value if trial.state == TrialState.COMPLETE else None,
        "settings": trial.user_attrs.get("settings", trial.params),
        "folder": str(output / folder) if isinstance(folder, str) else None,
        "duration_s": round(trial.duration.total_seconds(), 1) if trial.duration else None,
        "note": _note(trial),
    }


def _importance(study: optuna.Study, complete: int) -> tuple[dict[str, float] | None, str]:
    """Optuna's PED-ANOVA importance of each setting (no scikit-learn needed), or why there is none."""
    if complete < MIN_IMPORTANCE_TRIALS:
        return (
            None,
            f"not computed: it needs at least {MIN_IMPORTANCE_TRIALS} complete trials, the study has {complete}",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importance = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    how = (
        f"PED-ANOVA over {complete} complete trials: how much each setting decides whether a trial is among the best "
        "10%; sums to 1, a rough indication below about 20 trials"
    )
    return importance, how


def _plots(study: optuna.Study, output: Path, importance: bool) -> list[str]:
    """Optuna's matplotlib plots of the study as PNG files in ``output``; their names."""
    import matplotlib
    from optuna.visualization import matplotlib as plots

    pyplot()  # the Agg backend before Optuna draws

    chosen: dict[str, Callable[[optuna.Study], Any]] = {"optimization_history.png": plots.plot_optimization_history}
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        chosen["parallel_coordinate.png"] = plots.plot_parallel_coordinate
    if importance:
        chosen["param_importances.png"] = lambda s: plots.plot_param_importances(
            s, evaluator=PedAnovaImportanceEvaluator()
        )
    for name, plot in chosen.items():
        # Optuna sets its own style (plt.style.use) for good: restore the process's own afterwards, or every later
        # figure of this process (learning curves, report.html) would be drawn in Optuna's
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # the plots are "experimental"; few trials warn too
            png = png_bytes(plot(study).figure, bbox_inches="tight")
        atomic_write_bytes(output / name, png)
    return list(chosen)


def write_best(output: Path, values: Mapping[str, Any], trial: int, value: float) -> Path:
    """``best.yaml``: ``values`` (the fixed ``--set`` keys and the best trial's settings) as top-level keys, a plan
    file whose values replace the bundle's defaults (``--plan_file``)."""
    header = (
        f"# The best settings of sweep trial {int(trial)} (Dice {float(value):.4f}), a plan file read as data:\n"
        "# python -m monai.bundle run training --config_file BUNDLE/configs/train.yaml --plan_file best.yaml ...\n"
    )
    text = header + yaml.safe_dump(json.loads(json.dumps(dict(values))), sort_keys=False, default_flow_style=None)
    atomic_write_bytes(output / BEST_CONFIG, text.encode())
    return output / BEST_CONFIG


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _markdown(report: Mapping[str, Any], output: Path) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in report["counts"].items())
    lines = [f"# Sweep `{report['study']}`", "", f"Storage: `{report['storage']}`. Trials: {counts}.", ""]
    lines += [f"Score: {report['score']}.", ""]
    best, train = report["best"], Path(report["options"].get("bundle", "BUNDLE")) / "configs" / "train.yaml"
    if best and report["best_config"]:
        lines += [
            f"## Best: trial {best['trial']}, Dice {best['value']:.4f}",
            "",
            f"{shown(best['settings'])} (run folder `{best['folder']}`).",
            "",
            f"`{BEST_CONFIG}` holds these settings and the fixed `--set` keys; train the final model with",
            "",
            "```bash",
            f"python -m monai.bundle run training --config_file {train} --plan_file {report['best_config']} \\",
            "    --dataset_dir DIR --output_dir RUN",
            "```",
            "",
        ]
    elif best:
        lines += [f"## Best: trial {best['trial']}, Dice {best['value']:.4f}", "", shown(best["settings"]), ""]
    else:
        lines += ["No trial has completed yet: no best settings.", ""]
    lines += ["## Trials", "", "| rank | trial | state | Dice | settings | folder | duration (s) | note |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for row in report["trials"]:
        value = f"{row['value']:.4f}" if row["value"] is not None else ""
        cells = [row["rank"] or "", row["trial"], row["state"], value, shown(row["settings"]), row["folder"] or ""]
        cells += [row["duration_s"] if row["duration_s"] is not None else "", row["note"]]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += ["", "## Importance of each setting", "", f"{report['importance_method']}.", ""]
    if report["importance"]:
        lines += ["| setting | importance |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in report["importance"].items()]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{name[:-4]}]({name})" for name in report["plots"]]
    return "\n".join(lines) + "\n"


def write_report(output: str | Path, storage: str | None = None, study_name: str = "sweep") -> dict[str, Any]:
    """Write ``sweep_report.md``/``.json``, the PNG plots and ``best.yaml`` of the study into ``output``; returns
    the report. ``storage``: the study's storage (default: ``OUTPUT/study.db``)."""
    output = Path(output).resolve()
    if storage is None and not (output / STUDY_FILE).is_file():
        raise SweepError(f"{output / STUDY_FILE} is missing: pass the --output of `sweep run` (or its --storage)")
    url = storage_url(output, storage)
    study = load_study(url, study_name)
    options = study.user_attrs.get(OPTIONS_ATTR, {})
    trials = sorted(study.get_trials(deepcopy=False), key=_rank_key)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    rows = [
        _row(trial, i + 1 if trial.state == TrialState.COMPLETE else None, output) for i, trial in enumerate(trials)
    ]
    importance, method = _importance(study, len(complete))
    states = [trial.state.name.lower() for trial in trials]
    report: dict[str, Any] = {
        "study": study_name,
        "storage": shown_url(url),
        "options": options,
        "score": (
            f"mean out-of-fold Dice of a {options['folds']}-fold cross-validation (report.json)"
            if options.get("folds")
            else "best validation mean Dice of the training run (metrics.json best_mean_dice)"
        ),
        "counts": {state: states.count(state) for state in dict.fromkeys(states)},
        "best": rows[0] if complete else None,
        "trials": rows,
        "importance": importance,
        "importance_method": method,
        "plots": _plots(study, output, importance is not None),
    }
    report["best_config"] = None
    if complete:
        values = {**options.get("set", {}), **rows[0]["settings"]}
        evaluated = expression_ids(values)
        if evaluated:
            logger.warning(
                "%s not written: %s, as the study in %s holds them, would be evaluated by MONAI; the sweep writes "
                "literal values only, give those keys on the training command line yourself",
                output / BEST_CONFIG,
                ", ".join(evaluated),
                report["storage"],
            )
        else:
            report["best_config"] = str(write_best(output, values, rows[0]["trial"], rows[0]["value"]))
    atomic_write_json(report, output / REPORT_JSON)
    atomic_write_bytes(output / REPORT_MD, _markdown(report, output).encode())
    return report
