"""``python -m custom_components.sweep``: a real sweep of the 3D bundle on tiny data, shared by two processes, one
of them killed and started again; its report and best.yaml; bad options; pruning of a running trial."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml

from custom_components import settings_declarations
from custom_components.plan_file import read_plan
from custom_components.sweep import study as study_module
from custom_components.sweep.__main__ import main
from custom_components.sweep.report import write_report
from custom_components.sweep.space import parse_space
from custom_components.sweep.study import room_for_trial, surplus
from custom_components.sweep.trial import Sweep, TrialFailed, run_trial, watch
from tests.conftest import REPO, SMALL_3D, USER_CWD, run_bundle

# 4, not 3: whichever process finishes a trial first, A then trains one more (a third trial if A finished first, a
# fourth if B did), so the fixture always finds A training after a finish. With 3, A and B finishing their first
# trials together left the third to B and A with nothing to train until the sweep ended.
TRIALS = 4
SPACES = ["learning_rate=loguniform:1e-4:1e-2", "dropout=uniform:0:0.3"]
FIXED = {**{k: v for k, v in SMALL_3D.items() if k != "learning_rate"}, "max_epochs": "2", "val_interval": "1"}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_command(dataset: Path, output: Path, *extra: str) -> list[str]:
    """The user's ``sweep run`` of the 3D bundle: two searched keys, the tiny-training keys fixed."""
    return [
        *(sys.executable, "-m", "custom_components.sweep", "run", "--bundle", str(REPO / "bundles" / "unet3d")),
        *("--dataset_dir", str(dataset), "--output", str(output), "--trials", str(TRIALS)),
        *("--space", *SPACES, "--set", *(f"{key}={value}" for key, value in FIXED.items())),
        *extra,
    ]


@dataclass
class SharedSweep:
    output: Path
    logs: dict[str, str]  # process -> its console output
    returncodes: dict[str, int]
    kept: dict[int, tuple[bytes, int]]  # trial COMPLETE when A was killed -> its metrics.json (bytes, mtime)
    study: optuna.Study


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The command in a process group of its own (so that killing it kills its training too)."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            command, cwd=USER_CWD.name, stdout=handle, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )


def training(log: Path) -> bool:
    """Whether the sweep process logging to ``log`` is training a trial: its last trial started and has not ended."""
    text = log.read_text()
    started = re.findall(r"trial (\d+): started", text)
    return bool(started) and not re.search(rf"trial {started[-1]}: (finished|pruned|failed)", text)


@pytest.fixture(scope="module")
def shared(dataset3d: Path, tmp_path_factory: pytest.TempPathFactory) -> SharedSweep:
    """Processes A and B start the same sweep on one SQLite study; once a trial has finished, A is killed (its whole
    process group) while it trains a trial, and started again as A2; B and A2 complete the study. (A process killed
    between trials, before its next trial's first heartbeat, is `test_a_trial_that_never_beat_is_failed_...`.)"""
    output = tmp_path_factory.mktemp("sweep") / "out"
    logs = {name: output.parent / f"{name}.log" for name in ("A", "B", "A2")}
    command = sweep_command(dataset3d, output)
    a, b = start(command, logs["A"]), start(command, logs["B"])
    deadline = time.monotonic() + 300
    while not (any("finished, Dice" in logs[name].read_text() for name in ("A", "B")) and training(logs["A"])):
        assert time.monotonic() < deadline and a.poll() is None and b.poll() is None, [
            logs[name].read_text()[-3000:] for name in ("A", "B")
        ]
        time.sleep(0.5)
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{output / 'study.db'}")
    kept = {}
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = output / trial.user_attrs["folder"] / "metrics.json"
        kept[trial.number] = (metrics.read_bytes(), metrics.stat().st_mtime_ns)
    a2 = start(command, logs["A2"])
    returncodes = {"A": a.returncode, "B": b.wait(timeout=300), "A2": a2.wait(timeout=300)}
    texts = {name: log.read_text() for name, log in logs.items()}
    return SharedSweep(output, texts, returncodes, kept, study)


def test_killed_sweep_resumes_without_redoing_finished_trials(shared: SharedSweep) -> None:
    assert shared.returncodes["B"] == 0 and shared.returncodes["A2"] == 0, shared.logs
    assert shared.kept, "a trial had finished when A was killed"
    trials = {trial.number: trial for trial in shared.study.get_trials()}
    states = [trial.state for trial in trials.values()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == TRIALS
    # the trial A was running when killed is marked FAIL (its heartbeat stopped), never left RUNNING
    assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
    for number, (content, mtime) in shared.kept.items():
        metrics = shared.output / f"trial_{number:03d}" / "metrics.json"
        assert trials[number].state == optuna.trial.TrialState.COMPLETE
        assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == (content, mtime)


def test_processes_share_the_study(shared: SharedSweep) -> None:
    started = [int(n) for log in shared.logs.values() for n in re.findall(r"trial (\d+): started", log)]
    trials = {trial.number: trial for trial in shared.study.get_trials()}
    assert len(started) == len(set(started)) and set(started) <= set(trials)  # no trial run twice
    for number, trial in trials.items():  # a surplus one (both processes asked at once): failed, not run
        assert number in started or trial.state == optuna.trial.TrialState.FAIL, number
    assert re.search(r"trial \d+: started", shared.logs["A"]) and re.search(r"trial \d+: started", shared.logs["B"])
    folders = sorted(path.name for path in shared.output.glob("trial_*"))
    assert set(folders) >= {f"trial_{number:03d}" for number in started} and len(folders) <= len(trials)
    for number in started:  # each trained once: one command in its log
        assert (shared.output / f"trial_{number:03d}" / "trial.log").read_text().count("=== ") == 1


def test_report_ranks_trials_and_writes_best_settings(shared: SharedSweep, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(shared.output)]) == 0  # `sweep report OUT`, as sweep run wrote it at its end
    assert "best: trial" in capsys.readouterr().out
    report = json.loads((shared.output / "sweep_report.json").read_text())
    ranked = [row for row in report["trials"] if row["rank"] is not None]
    assert [row["rank"] for row in ranked] == list(range(1, TRIALS + 1))
    assert [row["value"] for row in ranked] == sorted((row["value"] for row in ranked), reverse=True)
    for row in ranked:
        assert row["value"] == json.loads((Path(row["folder"]) / "metrics.json").read_text())["best_mean_dice"]
    best = report["best"]
    assert best == ranked[0] and best["trial"] == shared.study.best_trial.number
    assert set(report["importance"]) == {"learning_rate", "dropout"}
    for name in ("optimization_history.png", "parallel_coordinate.png", "param_importances.png"):
        assert (shared.output / name).read_bytes()[:8] == PNG
    assert f"| 1 | {best['trial']} | complete |" in (shared.output / "sweep_report.md").read_text()
    overlay = yaml.safe_load((shared.output / "best.yaml").read_text())
    assert overlay["learning_rate"] == best["settings"]["learning_rate"]
    assert overlay["dropout"] == best["settings"]["dropout"]
    assert overlay["patch_size"] == [32, 32, 16] and overlay["max_epochs"] == 2
    # a plan file the bundle takes as it is (--plan_file): its settings only, literal values
    plan = read_plan(shared.output / "best.yaml", settings_declarations.declarations("unet3d"), "listing")
    assert plan.problems == [] and plan.values == overlay


def test_the_final_model_trains_with_best_yaml_over_the_bundle(shared: SharedSweep, dataset3d: Path) -> None:
    """The README's final training: --plan_file best.yaml trains what the best trial trained."""
    best = json.loads((shared.output / "sweep_report.json").read_text())["best"]
    final = shared.output / "final"
    overrides = {"plan_file": shared.output / "best.yaml", "dataset_dir": dataset3d, "output_dir": final}
    run_bundle("bundles/unet3d/configs/train.yaml", overrides)
    trained = yaml.safe_load((final / "configs" / "train.yaml").read_text().split("# Wiring:")[0])
    assert trained["learning_rate"] == pytest.approx(best["settings"]["learning_rate"])
    assert trained["dropout"] == pytest.approx(best["settings"]["dropout"])
    assert json.loads((final / "metrics.json").read_text())["best_mean_dice"] == pytest.approx(best["value"])


def test_the_report_page_of_a_sweep_ranks_its_trials(shared: SharedSweep) -> None:
    """`python -m custom_components.report OUT` on a sweep folder: the trials ranked and sortable, Optuna's plots,
    every trial's curve, and the best trial's own run."""
    main(["report", str(shared.output)])
    command = [sys.executable, "-m", "custom_components.report", str(shared.output)]
    subprocess.run(command, cwd=USER_CWD.name, check=True, capture_output=True)
    text = (shared.output / "report.html").read_text()
    assert "hyperparameter sweep" in text and ">Trials</h2>" in text and "https://" not in text
    best = json.loads((shared.output / "sweep_report.json").read_text())["best"]
    assert f"the best trial ({best['trial']})" in text
    assert text.count("data:image/png;base64,") >= 4  # the curves of every trial and Optuna's three plots
    assert 'class="sortable"' in text  # the trials (the trials ran with report=False: no cases of the best one)


def refused(command: list[str]) -> str:
    """The ``error: ...`` that ``sweep run`` exits with, run in this process (no training starts)."""
    handler = signal.getsignal(signal.SIGTERM)  # `sweep run` turns SIGTERM into an interrupt: restore pytest's
    try:
        with pytest.raises(SystemExit) as exit:
            main(command[command.index("run") :])
    finally:
        signal.signal(signal.SIGTERM, handler)
    return str(exit.value.code)


def test_restart_with_other_options_is_refused(shared: SharedSweep, dataset3d: Path) -> None:
    command = sweep_command(dataset3d, shared.output)
    command[command.index("dropout=uniform:0:0.3")] = "dropout=uniform:0:0.5"
    message = refused(command)
    assert (
        "was started with other options: --space learning_rate=loguniform:0.0001:0.01 dropout=uniform:0.0:0.3 "
        in message
    )
    assert "(now learning_rate=loguniform:0.0001:0.01 dropout=uniform:0.0:0.5)" in message


def test_bad_options_are_all_reported_before_any_trial(dataset3d: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    command = sweep_command(
        dataset3d,
        output,
        *("--space", "lr=gauss:1:2", "patch_size=choice:[64,64,64],[96,96", "norm=choice:batch,nope"),
        *("--space", "dropout=uniform:0.3:0", "weight_decay=loguniform:0:1e-2"),
        *("--set", "max_epoch=3", "output_dir=elsewhere"),
    )
    message = refused(command)
    for argument in (
        "--space lr=gauss:1:2: unknown distribution 'gauss'",
        "--space patch_size=choice:[64,64,64],[96,96: ",
        '--space norm=choice:batch,nope: norm = "nope"',
        "--space dropout=uniform:0.3:0: LOW must be below HIGH",
        "--space weight_decay=loguniform:0:1e-2: loguniform needs LOW > 0",
        "--set max_epoch=3: max_epoch = 3: not a key of this bundle; did you mean `max_epochs`?",
        "--set output_dir: the sweep sets it for every trial; use --output",
    ):
        assert argument in message, message
    assert message.startswith("error: 7 problems") and not output.exists()


def test_choices_are_yaml_values_stored_as_text() -> None:
    space = parse_space("patch_size=choice:[64,64,64],[96,96,96]")
    assert space.choices == ([64, 64, 64], [96, 96, 96]) and space.options == ["[64, 64, 64]", "[96, 96, 96]"]
    assert parse_space("optimizer=choice:adamw,sgd").choices == ("adamw", "sgd")
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"patch_size": space.options}))
    assert sorted(space.suggest(study.ask()) for _ in range(2)) == [[64, 64, 64], [96, 96, 96]]


def test_unpromising_trial_is_stopped_at_its_validation(tmp_path: Path) -> None:
    """The median of earlier trials at epoch 2 is 0.9: a run validating 0.1 there is pruned and its process
    ended (the epoch without validation is skipped)."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    done = optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.8, 2: 0.9}, params={}, distributions={})
    study.add_trial(done)
    curve = tmp_path / "learning_curve.csv"
    script = f"import time; open({str(curve)!r}, 'w').write('epoch,val_mean_dice\\n1,\\n2,0.1\\n'); time.sleep(300)"
    process = subprocess.Popen([sys.executable, "-c", script])
    started = time.monotonic()
    assert watch(process, study.ask(), curve) == (2, 0.1)
    assert process.poll() is not None and time.monotonic() - started < 60


def test_trials_are_counted_over_the_study() -> None:
    """COMPLETE and PRUNED trials count towards --trials; a running one (in any process) holds a place."""
    study = optuna.create_study(direction="maximize")
    for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        study.add_trial(optuna.trial.create_trial(state=state, value=0.5 if state.name == "COMPLETE" else None))
    running = study.ask()
    assert not room_for_trial(study, 2) and room_for_trial(study, 4)
    assert surplus(study, running.number, 2) and not surplus(study, running.number, 3)


def test_a_trial_that_never_beat_is_failed_and_queued_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed between creating its trial and that trial's first heartbeat leaves it RUNNING with no
    heartbeat, which Optuna never counts stale: seen so for UNBEATEN_S, it is failed and queued once more, and the
    waiting process goes on; a trial whose heartbeat is fresh keeps running."""
    monkeypatch.setattr(study_module, "UNBEATEN_S", 0.2)
    monkeypatch.setattr(study_module, "WAIT_S", 0.05)
    study = study_module.open_study(study_module.storage_url(tmp_path, None), "sweep")
    space = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    silent, beating = study.ask(space), study.ask(space)
    study._storage.record_heartbeat(beating._trial_id)
    started = time.monotonic()
    study_module.fail_stale(study)  # the first look: the silent trial's watch starts
    assert [trial.state.name for trial in study.get_trials()] == ["RUNNING", "RUNNING"]
    assert room_for_trial(study, 2)  # it waited for the silent trial to go stale, then has room for one
    assert 0.2 <= time.monotonic() - started < 10
    trials = study.get_trials()
    assert [trial.state.name for trial in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == silent.params  # queued once more with the same settings


def test_a_queued_trial_outside_the_space_is_failed_not_run(tmp_path: Path) -> None:
    """Settings the study's storage queues for a trial (a shared storage, a planted study.db) are Optuna's to check
    against --space: one that is not a value of it fails the trial, named with the storage, and reaches no command."""
    marker = tmp_path / "PWNED_trial"
    url = study_module.storage_url(tmp_path, None)
    study = study_module.open_study(url, "sweep")
    study.enqueue_trial({"norm": f"$__import__('pathlib').Path({str(marker)!r}).touch()"})
    spaces = (parse_space("norm=choice:batch,instance"),)
    sweep = Sweep(REPO / "bundles" / "unet3d", tmp_path / "data", tmp_path, spaces, {}, folds=None, trials=1)
    trial = study.ask()
    with pytest.raises(TrialFailed) as failed:
        run_trial(sweep, trial, study_module.shown_url(url))
    message = str(failed.value)
    study_file = tmp_path / "study.db"
    assert message.startswith(f"sqlite:///{study_file} holds settings for it that are not values of --space ("), message
    assert "not run, the sweep goes on with trials it draws" in message
    assert study.get_trials()[0].user_attrs["error"] == message  # what the log and the report show
    assert not marker.exists() and not (tmp_path / "trial_000").exists()


def test_best_yaml_takes_no_expression_from_the_study(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """best.yaml is a config: a value the study holds (its --set keys, a trial's settings) that MONAI would run is
    not written into it; the warning names the storage that holds it."""
    marker = tmp_path / "PWNED_best"
    planted = f"$__import__('pathlib').Path({str(marker)!r}).touch()"
    url = study_module.storage_url(tmp_path, None)
    study = study_module.open_study(url, "sweep")
    study.set_user_attr(study_module.OPTIONS_ATTR, {"set": {"network_def": planted}, "folds": None})
    rate = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    settings = {"learning_rate": 1e-3, "loss": planted}
    trial = optuna.trial.create_trial(
        params={"learning_rate": 1e-3},
        distributions={"learning_rate": rate},
        value=0.5,
        user_attrs={"settings": settings},
    )
    study.add_trial(trial)
    with caplog.at_level(logging.WARNING):
        report = write_report(tmp_path)
    assert report["best_config"] is None and not (tmp_path / "best.yaml").exists()
    storage = study_module.shown_url(url)
    assert f"network_def, loss, as the study in {storage} holds them, would be evaluated by MONAI" in caplog.text
    assert not marker.exists()


def test_optuna_still_asks_the_storage_for_its_stale_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SweepStorage extends Optuna's private RDBStorage._get_stale_trial_ids (no public hook counts a trial that never
    beat): this fails the day Optuna stops calling it, instead of a sweep waiting for such a trial for ever."""
    asked = []
    original = study_module.SweepStorage._get_stale_trial_ids

    def spy(self: study_module.SweepStorage, study_id: int) -> list[int]:
        asked.append(study_id)
        return original(self, study_id)

    monkeypatch.setattr(study_module.SweepStorage, "_get_stale_trial_ids", spy)
    study = study_module.open_study(study_module.storage_url(tmp_path, None), "sweep")
    study_module.fail_stale(study)
    assert len(asked) == 1  # once per look, for the sweep's study
