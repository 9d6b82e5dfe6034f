"""K-fold cross-validation: the splits' guarantees, and a real 3-fold run through the user's command.

The real run is killed once its first fold is finished and started again, as a lost job would be; the tests
after it read what the resumed run left: which folds trained again, the report, and the ensemble. Each fold folder
is a run bundle; the ensemble is built from the folds' own configs, never from what kfold.json says.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from fire.parser import DefaultParseValue

from custom_components.bundle import command_line_value
from custom_components.kfold import runner
from custom_components.kfold.__main__ import main
from custom_components.kfold.bundle import Bundle, parse_set
from custom_components.kfold.ensemble import predict
from custom_components.kfold.layout import Fold
from custom_components.kfold.report import bootstrap_ci, spread
from custom_components.kfold.runner import CrossValidation, fold_environment, prepare
from custom_components.kfold.splits import KFoldError, describe_cases, load_splits, make_splits
from custom_components.synthetic import write_dataset
from tests.conftest import REPO, SMALL_2D, SMALL_3D, USER_CWD
from tests.test_resume import UNSAFE_ADVICE, Payload, refusal

CLASSES = ["organ", "lesion"]
DATASET_JSON = Path("dataset.json")  # only named in error messages by the splitter
KFOLD = [sys.executable, "-m", "custom_components.kfold"]


def _val_folds(splits: list[dict]) -> dict[str, int]:
    """Case id -> index of the split that validates it (each case once per repeat)."""
    return {case: index for index, split in enumerate(splits) for case in split["val"]}


def _label_cases(folder: Path, lesion_cases: set[int], count: int) -> list[dict]:
    """Tiny label maps on disk: every case has an organ of its own size, only ``lesion_cases`` a lesion."""
    folder.mkdir(parents=True, exist_ok=True)
    datalist = []
    for index in range(count):
        label = np.zeros((12, 12, 4), dtype=np.uint8)
        label[: 2 + index % 9, :6] = 1  # foreground sizes differ: the size strata have something to balance
        if index in lesion_cases:
            label[1, 1, 1] = 2
        path = folder / f"case_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(label, np.diag([1.0, 1.0, 2.0, 1.0])), path)
        datalist.append({"image": str(path), "label": str(path)})
    return describe_cases(datalist, CLASSES, image_dims=3)


def test_auto_stratification_puts_the_rare_class_in_every_fold(tmp_path: Path) -> None:
    cases = _label_cases(tmp_path, lesion_cases={0, 4, 7}, count=9)
    assert [case["classes"] for case in cases[:2]] == [["organ", "lesion"], ["organ"]]
    rare = [case["case"] for case in cases if "lesion" in case["classes"]]
    for seed in range(10):
        folds = _val_folds(make_splits(cases, 3, seed, "auto", None, 1, CLASSES, DATASET_JSON))
        assert sorted(folds[case] for case in rare) == [0, 1, 2], seed
    # without stratification a random split puts two of them together for some seed: the check above has teeth
    unstratified = [
        _val_folds(make_splits(cases, 3, seed, "none", None, 1, CLASSES, DATASET_JSON)) for seed in range(10)
    ]
    assert any(len({folds[case] for case in rare}) < 3 for folds in unstratified)

    more = _label_cases(tmp_path / "more", lesion_cases={0, 2, 4, 7, 8}, count=12)
    rare = [case["case"] for case in more if "lesion" in case["classes"]]
    for seed in range(10):
        folds = _val_folds(make_splits(more, 3, seed, "auto", None, 1, CLASSES, DATASET_JSON))
        assert sorted(np.bincount([folds[case] for case in rare], minlength=3)) == [1, 2, 2], seed


def _patient_cases(sizes: list[int], site_of: str = "AB") -> list[dict]:
    """Cases of patients with several scans each (``sizes``), alternating over sites."""
    cases = []
    for patient, size in enumerate(sizes):
        for scan in range(size):
            index = len(cases)
            cases.append(
                {
                    "case": f"p{patient}_s{scan}",
                    "patient": f"p{patient}",
                    "site": site_of[index % len(site_of)],
                    "classes": ["organ"],
                    "foreground_size": 100.0 + index,
                }
            )
    return cases


@pytest.mark.parametrize("stratify", ["auto", "site", "none"])
def test_groups_are_never_split(stratify: str) -> None:
    cases = _patient_cases([3, 2, 2, 1, 1, 1, 2, 1, 1])
    patient = {case["case"]: case["patient"] for case in cases}
    for seed in range(5):
        splits = make_splits(cases, 3, seed, stratify, "patient", 2, CLASSES, DATASET_JSON)
        assert len(splits) == 6
        for split in splits:
            assert not {patient[c] for c in split["train"]} & {patient[c] for c in split["val"]}
            assert sorted(split["train"] + split["val"]) == sorted(patient)
        for repeat in (splits[:3], splits[3:]):
            assert sorted(c for split in repeat for c in split["val"]) == sorted(patient)


def test_splits_are_fixed_by_the_seed() -> None:
    cases = _patient_cases([1] * 10)
    first = make_splits(cases, 5, 3, "auto", None, 1, CLASSES, DATASET_JSON)
    assert make_splits(cases, 5, 3, "auto", None, 1, CLASSES, DATASET_JSON) == first
    assert make_splits(cases, 5, 4, "auto", None, 1, CLASSES, DATASET_JSON) != first
    repeated = make_splits(cases, 5, 3, "auto", None, 2, CLASSES, DATASET_JSON)
    assert repeated[:5] == first and repeated[5:] != first  # repeat r is drawn with seed + r


def test_site_stratification_spreads_every_site() -> None:
    cases = _patient_cases([1] * 9, site_of="AAAAAABBB")  # 6 cases of site A, 3 of site B
    site_of = {case["case"]: case["site"] for case in cases}
    for seed in range(5):
        splits = make_splits(cases, 3, seed, "site", None, 1, CLASSES, DATASET_JSON)
        assert [sorted(site_of[c] for c in split["val"]) for split in splits] == [["A", "A", "B"]] * 3


def test_leave_one_out(caplog: pytest.LogCaptureFixture) -> None:
    cases = _patient_cases([1] * 6)
    with caplog.at_level(logging.WARNING):
        splits = make_splits(cases, 6, 0, "auto", None, 3, CLASSES, DATASET_JSON)
    assert len(splits) == 6  # the same folds for every seed: repeated once, with a warning
    assert "leave-one-out" in caplog.text
    assert all(len(split["val"]) == 1 and len(split["train"]) == 5 for split in splits)
    assert sorted(split["val"][0] for split in splits) == sorted(case["case"] for case in cases)


def test_impossible_requests_fail_before_training(caplog: pytest.LogCaptureFixture) -> None:
    cases = _patient_cases([2, 2, 1])
    with pytest.raises(KFoldError, match=r"--folds 6 but dataset.json lists 5 training cases: use --folds 5"):
        make_splits(cases, 6, 0, "auto", None, 1, CLASSES, DATASET_JSON)
    with pytest.raises(KFoldError, match=r"--group patient makes 3 groups, fewer than --folds 4"):
        make_splits(cases, 4, 0, "auto", "patient", 1, CLASSES, DATASET_JSON)
    with pytest.raises(KFoldError, match=r"--stratify scanner: 5 training entries .* have no 'scanner' field"):
        make_splits(cases, 2, 0, "scanner", None, 1, CLASSES, DATASET_JSON)
    with caplog.at_level(logging.WARNING):  # safe fallback: split anyway, say which folds lack the class
        make_splits(cases, 2, 0, "auto", None, 1, CLASSES, DATASET_JSON)
    assert "class lesion is in no case" in caplog.text
    for case in cases[:2]:  # lesions in two scans of one patient: one fold at most can validate on them
        case["classes"] = ["organ", "lesion"]
    with caplog.at_level(logging.WARNING):
        splits = make_splits(cases, 2, 0, "auto", "patient", 1, CLASSES, DATASET_JSON)
    assert "class lesion is in only 1 'patient' group(s), fewer than the 2 folds: 1 fold(s) validate without it" in (
        caplog.text
    )
    assert [sum(c in ("p0_s0", "p0_s1") for c in split["val"]) for split in splits] in ([2, 0], [0, 2])


def test_given_splits_file_is_used_as_is(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data", cases=4, seed=2, shape=(24, 24, 8))
    given = [
        {"train": ["case_000", "case_001"], "val": ["imagesTr/case_002.nii.gz", "case_003"]},
        {"train": ["case_002", "case_003"], "val": ["case_000", "case_001"]},
    ]
    (tmp_path / "given.json").write_text(json.dumps(given))
    output = tmp_path / "cv"
    bundle = Bundle.find(REPO / "bundles/unet3d")
    state = prepare(bundle, dataset, output, None, 0, "auto", None, 1, {}, tmp_path / "given.json")
    assert state["fold_count"] == 2 and state["split_count"] == 2
    written = json.loads((output / "splits.json").read_text())
    assert written == [{**given[0], "val": ["case_002", "case_003"]}, given[1]]  # paths reduced to case ids
    assert [case["case"] for case in json.loads((output / "cases.json").read_text())] == [
        f"case_00{i}" for i in range(4)
    ]

    with pytest.raises(KFoldError, match="fold 0 names cases not in dataset.json: \\['case_999'\\]"):
        load_splits(_write(tmp_path / "bad.json", [{"train": ["case_999"], "val": ["case_000"]}]), ["case_000"])
    with pytest.raises(KFoldError, match="started with other options: --folds not given \\(now --folds 3\\)"):
        prepare(bundle, dataset, output, 3, 0, "auto", None, 1, {}, tmp_path / "given.json")


def _write(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_parallel_folds_share_the_machine() -> None:
    assert fold_environment(slot=3, parallel=4, cpus=16, gpus=["0", "1"]) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert fold_environment(slot=1, parallel=3, cpus=8, gpus=[]) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert fold_environment(slot=1, parallel=4, cpus=2, gpus=["0"]) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert fold_environment(slot=0, parallel=1, cpus=8, gpus=[]) == {}


def test_set_values_are_yaml_and_reach_the_bundle_as_given() -> None:
    pairs = ["channels=[16,32,64]", "norm=batch", "amp=false", "class_weights=null", "learning_rate=1e-3"]
    pairs += ["intensity#window=[864,1264]", "name='True'", "tag='a#b'", "loss=$@losses['dice']"]
    values = parse_set(pairs)
    assert values == {
        "channels": [16, 32, 64],
        "norm": "batch",
        "amp": False,
        "class_weights": None,
        "learning_rate": 0.001,
        "intensity#window": [864, 1264],
        "name": "True",
        "tag": "a#b",
        "loss": "$@losses['dice']",
    }
    for value in values.values():  # fire, MONAI's command line, reads the written value back as it was
        parsed = DefaultParseValue(command_line_value(value))
        assert parsed == value and type(parsed) is type(value), value
    with pytest.raises(KFoldError, match="--set output_dir: the K-fold run sets it for every fold; use --output"):
        parse_set(["output_dir=elsewhere"])
    with pytest.raises(KFoldError, match="'max_epochs': write KEY=VALUE"):
        parse_set(["max_epochs"])


def test_a_fold_trains_unless_trained_then_scores_with_its_own_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[str], Path]] = []
    returncodes = {"training": 0, "evaluating": 0}

    scores_itself = False  # whether the training writes evaluation.json at its end, as a real one does

    def run_logged(command: list[str], log: Path, cwd: Path, env: dict) -> int:
        calls.append((command, cwd))
        if command[4] == "training" and scores_itself:
            (fold.path / "evaluation").mkdir(exist_ok=True)
            (fold.path / "evaluation" / "evaluation.json").write_text("{}")
        return returncodes[command[4]]

    monkeypatch.setattr(runner, "_run_logged", run_logged)
    bundle = Bundle.find(REPO / "bundles/unet3d")
    overrides = {"channels": [16, 32], "norm": "batch", "name": "True"}
    cv = CrossValidation(bundle, tmp_path / "data", tmp_path / "cv", 5, overrides, max_epochs=2)
    fold = Fold(index=1, repeat=0, fold=1, path=tmp_path / "cv" / "fold_1")
    evaluate = ["evaluating", "--config_file", str(fold.path / "configs/evaluate.yaml")]
    evaluate += ["--output_dir", str(fold.path / "evaluation")]  # nothing else: every key is in the fold's config

    assert runner.run_fold(cv, fold, {}) is None  # a new fold whose training did not score it: then scored
    (train, train_cwd), (score, score_cwd) = calls
    assert train_cwd == score_cwd == fold.path
    assert train[4:7] == ["training", "--config_file", str(bundle.config("train"))]
    assert {key[2:]: DefaultParseValue(value) for key, value in zip(train[7::2], train[8::2], strict=True)} == {
        "progress_bar": False,
        "report": True,  # the training scores its best model at its end
        **overrides,
        "dataset_dir": str(tmp_path / "data"),
        "output_dir": str(fold.path),
        "fold": 1,
        "splits_file": str(tmp_path / "cv" / "splits.json"),
        "seed": 5,
    }
    assert score[4:] == evaluate

    calls.clear()
    scores_itself = True
    (fold.path / "evaluation" / "evaluation.json").unlink(missing_ok=True)
    assert runner.run_fold(cv, fold, {}) is None  # a training that scored itself: one command
    assert [command[4] for command, _ in calls] == ["training"]

    calls.clear()
    scores_itself = False
    (fold.path / "evaluation" / "evaluation.json").unlink()
    (fold.path / "metrics.json").write_text(json.dumps({"epochs": 2}))
    assert runner.run_fold(cv, fold, {}) is None  # trained but not scored: only scored
    assert [command[4:] for command, _ in calls] == [evaluate]

    calls.clear()
    (fold.path / "metrics.json").write_text(json.dumps({"epochs": 1}))
    (fold.path / "evaluation" / "evaluation.json").write_text("{}")
    returncodes["training"] = 3
    assert runner.run_fold(cv, fold, {}) == f"{fold.name}: training exited with status 3; see {fold.path / 'fold.log'}"
    assert [command[4] for command, _ in calls] == ["training"]  # not scored after a failed training
    assert not (fold.path / "evaluation" / "evaluation.json").exists()  # the score of a shorter training is gone
    assert json.loads((fold.path / "failed.json").read_text())["step"] == "training"


def test_spread_and_bootstrap_interval() -> None:
    stats = spread([0.6, 0.8, 1.0])
    assert stats["mean"] == pytest.approx(0.8) and stats["std"] == pytest.approx(0.2)
    assert stats["cv"] == pytest.approx(0.25)
    values = np.random.default_rng(0).uniform(0.5, 0.9, 40)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high and high - low < 0.1
    assert bootstrap_ci(values) == [low, high]  # seeded: the same interval every time
    assert bootstrap_ci([0.5]) is None


# --- a real cross-validation: 6 training cases, 2 labelled test cases, 3 folds of 2 epochs ----------------------
# (`report` as kfold sets it: each fold scored at the end of its training)
FOLD_OVERRIDES = {
    **{k: v for k, v in SMALL_3D.items() if k not in ("num_folds", "report")},
    "max_epochs": "2",
    "val_interval": "2",
    "checkpoint_interval_min": "0",  # fold 1 is killed after its first epoch's checkpoint
}


@pytest.fixture(scope="module")
def cross_validation(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The user's `kfold run`, killed with its fold process once fold 0 is finished and fold 1 has trained one
    epoch, then started again."""
    root = tmp_path_factory.mktemp("kfold")
    dataset = write_dataset(root / "data", cases=8, seed=1, shape=(48, 48, 20))
    description = json.loads((dataset / "dataset.json").read_text())
    description["training"], description["test"] = description["training"][:6], description["training"][6:]
    (dataset / "dataset.json").write_text(json.dumps(description))
    output = root / "cv"
    bundle = str(REPO / "bundles/unet3d")
    command = [*KFOLD, "run", "--bundle", bundle, "--dataset_dir", str(dataset), "--folds", "3"]
    # the bundle's plan on (its default) for the keys left to it (intensity, class weights, batch size), cached here
    keys = {**FOLD_OVERRIDES, "plan": "auto", "plan_cache_dir": root / "plans", "iterations_per_epoch": 3}
    command += ["--output", str(output), "--set", *[f"{k}={v}" for k, v in keys.items()]]

    first = subprocess.Popen(
        command, cwd=USER_CWD.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    fold1_checkpoint = output / "fold_1" / "models" / "checkpoint_last.pt"
    while not fold1_checkpoint.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the run and the fold it is training, like a lost job
    first.wait()
    assert fold1_checkpoint.exists(), "fold 1 did not train an epoch before the deadline"
    assert (output / "fold_0" / "evaluation" / "evaluation.json").exists()
    assert not (output / "fold_1" / "evaluation" / "evaluation.json").exists(), "fold 1 ended before the kill"
    fold0 = output / "fold_0"
    before = {name: (fold0 / name).stat().st_mtime_ns for name in ("models/model.pt", "metrics.json", "fold.log")}

    second = subprocess.run(command, cwd=USER_CWD.name, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return SimpleNamespace(dataset=dataset, output=output, fold0_before=before, log=second.stdout + second.stderr)


def test_restart_skips_finished_folds_and_resumes_the_interrupted_one(cross_validation: SimpleNamespace) -> None:
    output, fold0 = cross_validation.output, cross_validation.output / "fold_0"
    assert "fold_0: already finished, skipped" in cross_validation.log
    assert "fold_0: training" not in cross_validation.log
    assert {n: (fold0 / n).stat().st_mtime_ns for n in cross_validation.fold0_before} == cross_validation.fold0_before
    assert "resumed from" in (output / "fold_1" / "fold.log").read_text()  # from its first epoch's checkpoint
    # one plan for the cross-validation: made by the first fold, read by the next, never made again on resume
    logs = {fold: (output / fold / "fold.log").read_text() for fold in ("fold_0", "fold_1", "fold_2")}
    assert "from a plan made in" in logs["fold_0"]
    assert "from the cached plan" in logs["fold_1"] and "(resumed: not planned again)" in logs["fold_1"]
    assert "from the cached plan" in logs["fold_2"] and "plan made in" not in logs["fold_1"] + logs["fold_2"]
    assert len(list((output.parent / "plans").glob("*.json"))) == 1  # the fixture's plan_cache_dir
    for fold in ("fold_0", "fold_1", "fold_2"):  # each fold folder is a run bundle that resumes and scores in place
        assert (output / fold / "configs" / "train.yaml").read_text().count('output_dir: "$@bundle_root"') == 1
        assert (output / fold / "models" / "model.pt").is_file()
    with open(output / "fold_1" / "learning_curve.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2]
    for fold in ("fold_1", "fold_2"):
        assert f"{fold}: finished" in cross_validation.log
        assert json.loads((output / fold / "metrics.json").read_text())["epochs"] == 2
    splits = json.loads((output / "splits.json").read_text())
    assert sorted(c for split in splits for c in split["val"]) == [f"case_00{i}" for i in range(6)]


def test_report_has_finite_scores_and_every_case_out_of_fold(cross_validation: SimpleNamespace) -> None:
    output = cross_validation.output
    report = json.loads((output / "report.json").read_text())
    assert [fold["status"] for fold in report["folds"]] == ["finished"] * 3
    for fold in report["folds"]:
        metrics = json.loads((output / fold["name"] / "metrics.json").read_text())
        assert fold["mean_dice"] == pytest.approx(metrics["best_mean_dice"], abs=1e-5)  # re-scored = validated
    fold_stats = report["summary"]["fold_mean_dice"]
    assert fold_stats["n"] == 3 and all(np.isfinite([fold_stats[k] for k in ("mean", "std", "cv")]))
    oof = report["out_of_fold"]
    assert sorted(oof) == [f"case_00{i}" for i in range(6)] and not report["missing_out_of_fold"]
    assert all(np.isfinite(score["mean_dice"]) and len(score["folds"]) == 1 for score in oof.values())
    overall = report["summary"]["oof_mean_dice"]
    assert overall["ci95"][0] <= overall["mean"] <= overall["ci95"][1]
    assert overall["mean"] == pytest.approx(np.mean([score["mean_dice"] for score in oof.values()]))
    assert [row["class_cases"]["lesion"] for row in report["balance"]] == [2, 2, 2]
    ensemble = report["ensemble"]
    assert ensemble["measured"] and sorted(ensemble["cases"]) == ["case_006", "case_007"]
    assert np.isfinite(ensemble["mean_dice"])
    assert report["verdict"]["stable"] in (True, False) and report["verdict"]["text"]
    for score in oof.values():  # surface metrics out of fold too, per case and class
        assert all(np.isfinite(list(score[metric].values())).all() for metric in ("hd95", "nsd"))
    hd95 = report["summary"]["oof_metrics"]["hd95"]["organ"]
    assert hd95["median"] == pytest.approx(np.median([score["hd95"]["organ"] for score in oof.values()]))
    post = report["postprocessing"]
    assert post["cases"] == 6 and set(post["recommended_postprocess"]) <= {"organ", "lesion"}
    assert post["recommended_postprocess"] == [n for n, e in post["per_class"].items() if e["verdict"] == "raises"]
    markdown = (output / "report.md").read_text()
    assert report["verdict"]["text"] in markdown and "case_005" in markdown
    assert "HD95 (mm) organ" in markdown and "--postprocess" in markdown
    for plot in ("fold_dice.png", "case_dice.png", "fold_balance.png"):
        assert (output / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Best, median and worst case" in (output / "report.html").read_text()


def test_ensemble_prediction_is_on_the_input_grid(cross_validation: SimpleNamespace, tmp_path: Path) -> None:
    source = nib.load(cross_validation.dataset / "imagesTr" / "case_006.nii.gz")
    affine = source.affine.copy()
    affine[0, 0] *= -1  # another orientation and origin than the training data
    affine[:3, 3] += [100.0, -20.0, 5.0]
    image = np.flip(np.asarray(source.dataobj), axis=0).copy()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    command = [*KFOLD, "predict", str(cross_validation.output), "--images", str(tmp_path / "scan.nii.gz")]
    command += ["--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=USER_CWD.name, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    prediction = nib.load(tmp_path / "out" / "scan_seg.nii.gz")
    assert prediction.shape == image.shape
    np.testing.assert_allclose(prediction.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(prediction.dataobj)).tolist()) <= {0, 1, 2}


def test_predict_takes_no_code_from_kfold_json(cross_validation: SimpleNamespace, tmp_path: Path) -> None:
    """kfold.json is a record: an expression planted in it is never evaluated; the folds' own configs decide."""
    output = Path(shutil.copytree(cross_validation.output, tmp_path / "cv"))  # a moved run folder predicts too
    marker = tmp_path / "PWNED_kfold"
    planted = f"$open({str(marker)!r}, 'w')"
    state = json.loads((output / "kfold.json").read_text())
    state["overrides"].update({key: planted for key in ("network", "num_classes", "channels", "input_dir")})
    (output / "kfold.json").write_text(json.dumps(state))
    written = predict(output, [cross_validation.dataset / "imagesTr" / "case_000.nii.gz"], tmp_path / "out")
    assert not marker.exists()
    assert written == [tmp_path / "out" / "case_000_seg.nii.gz"] and written[0].is_file()


def test_kfold_run_on_png_images_with_a_copied_bundle(tmp_path: Path) -> None:
    """`kfold run` on native 2D PNG images (2 folds of 1 epoch, in parallel) with a copy of the 2D bundle outside the
    repository: every case gets an out-of-fold Dice."""
    dataset = write_dataset(tmp_path / "png", cases=6, seed=0, dim=2, shape=(48, 40), image_format="png")
    bundle = shutil.copytree(REPO / "bundles/unet2d", tmp_path / "my_unet2d")
    keys = {k: v for k, v in SMALL_2D.items() if k != "num_folds"}
    keys.update(max_epochs="1", val_interval="1", warmup_epochs="1")
    keys["intensity#window"] = "[864,1264]"  # PNG holds HU + 1024: the CT window moves with it
    output = tmp_path / "cv"
    argv = ["run", "--bundle", str(bundle), "--dataset_dir", str(dataset), "--folds", "2", "--output", str(output)]
    argv += ["--parallel", "2"]  # both folds at once, a thread each: what keeps this test short
    assert main([*argv, "--set", *[f"{key}={value}" for key, value in keys.items()]]) == 0
    report = json.loads((output / "report.json").read_text())
    assert [fold["status"] for fold in report["folds"]] == ["finished"] * 2
    oof = report["out_of_fold"]
    assert sorted(oof) == [f"case_00{i}" for i in range(6)] and not report["missing_out_of_fold"]
    assert all(np.isfinite(score["mean_dice"]) and len(score["folds"]) == 1 for score in oof.values())
    assert "case_005" in (output / "report.md").read_text()


def test_print_commands_gives_one_job_per_fold_and_report_collects_what_ran(
    cross_validation: SimpleNamespace, tmp_path: Path
) -> None:
    """`kfold run --print-commands` writes the splits and prints one shell line per fold for a scheduler; a fold run
    from its line elsewhere is collected by `kfold report`."""
    output = tmp_path / "cv"
    command = [*KFOLD, "run", "--bundle", str(REPO / "bundles/unet3d"), "--dataset_dir", str(cross_validation.dataset)]
    command += ["--folds", "2", "--output", str(output), "--set", *[f"{k}={v}" for k, v in FOLD_OVERRIDES.items()]]
    printed = subprocess.run([*command, "--print-commands"], cwd=USER_CWD.name, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr[-3000:]
    jobs = printed.stdout.strip().splitlines()
    assert len(jobs) == 2 and (output / "splits.json").is_file() and not (output / "fold_0").exists()
    for index, job in enumerate(jobs):
        assert "-m monai.bundle run training" in job and "|| /" in job and "-m monai.bundle run evaluating" in job
        assert f"--output_dir {output / f'fold_{index}'}" in job and f"--fold {index}" in job
    assert f"kfold report {output}" in printed.stderr
    gpus = subprocess.run([*command, "--print-commands", "--nproc_per_node", "4"], capture_output=True, text=True)
    assert all("&& torchrun --nproc_per_node=4 -m monai.bundle" in line for line in gpus.stdout.splitlines())
    assert "multi_gpu_train.yaml" in gpus.stdout

    subprocess.run(["bash", "-c", jobs[0]], cwd=tmp_path, check=True, capture_output=True)  # "another machine"
    assert subprocess.run([*KFOLD, "report", str(output)], cwd=USER_CWD.name, capture_output=True).returncode == 0
    report = json.loads((output / "report.json").read_text())
    assert [fold["status"] for fold in report["folds"]] == ["finished", "not finished"]
    assert sorted(report["out_of_fold"]) == sorted(json.loads((output / "splits.json").read_text())[0]["val"])
    again = subprocess.run([*command, "--print-commands"], cwd=USER_CWD.name, capture_output=True, text=True)
    assert again.stdout.strip().splitlines() == [jobs[1]]  # the finished fold is not printed again


# --- files of an output folder are data: a damaged or planted one is named with its fix, never run --------------


def _refusal(argv: list[str]) -> str:
    """The one line `python -m custom_components.kfold ARGV` exits with (a SystemExit text: no traceback)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


RUN_AGAIN = (
    "delete it and start `python -m custom_components.kfold run` again with the options the run was started with"
)
SELECT_AGAIN = "delete it and start the same `python -m custom_components.kfold select` command again"


@pytest.fixture
def planned(tmp_path: Path) -> Path:
    """A K-fold output folder as `kfold run --print-commands` leaves it (kfold.json, cases.json, splits.json, no fold
    trained yet), of 4 tiny cases in ``tmp_path/data``."""
    dataset = write_dataset(tmp_path / "data", cases=4, seed=2, shape=(24, 24, 8))
    prepare(Bundle.find(REPO / "bundles/unet3d"), dataset, tmp_path / "cv", 2, 0, "auto", None, 1, {}, None)
    return tmp_path / "cv"


def test_a_cut_off_kfold_json_is_named_with_the_fix(planned: Path, tmp_path: Path) -> None:
    state = planned / "kfold.json"
    text = state.read_text()
    state.write_text(text[: len(text) // 2])  # a copy or a full disk cut it short
    report = subprocess.run([*KFOLD, "report", str(planned)], cwd=USER_CWD.name, capture_output=True, text=True)
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr[-3000:]
    image = tmp_path / "data" / "imagesTr" / "case_000.nii.gz"
    predicted = _refusal(["predict", str(planned), "--images", str(image), "--out", str(tmp_path / "out")])
    for message in (report.stderr, predicted):
        assert f"error: {state} is damaged (not JSON: " in message and RUN_AGAIN in message, message
        assert "(add --print-commands to rewrite it without training); finished folds are kept" in message
    assert not (tmp_path / "out").exists() and not (planned / "report.json").exists()


def test_kfold_json_values_are_checked_as_data_all_at_once(planned: Path) -> None:
    path = planned / "kfold.json"
    state = json.loads(path.read_text())
    marker = planned / "PWNED_class"
    damaged = {**state, "fold_count": "2", "max_epochs": None, "class_names": ["organ", f"$open({str(marker)!r}, 'w')"]}
    del damaged["dataset_dir"]
    path.write_text(json.dumps(damaged))
    message = _refusal(["report", str(planned)])
    problems = [
        'dataset_dir is missing; class_names ["organ", "$open(',
        "is not a list of class names (text, none starting with $, @ or %)",
        'max_epochs null is not a number of epochs; fold_count "2" is not a number of folds): ' + RUN_AGAIN,
    ]
    assert message.startswith(f"error: {path} is damaged ({problems[0]}"), message
    assert all(problem in message for problem in problems[1:]), message
    path.write_text(json.dumps({**state, "num_classes": 5}))  # each field right, but not together
    assert "(num_classes 5 is not 1 + the 2 class_names)" in _refusal(["report", str(planned)])
    assert not marker.exists() and not (planned / "report.json").exists()


def test_report_names_a_kfold_json_whose_classes_are_not_the_folds(
    cross_validation: SimpleNamespace, tmp_path: Path
) -> None:
    output = Path(shutil.copytree(cross_validation.output, tmp_path / "cv"))
    path = output / "kfold.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "class_names": ["organ", "tumour"]}))
    message = _refusal(["report", str(output)])
    differ = "class_names ['organ', 'tumour'] are not the classes the folds scored: fold_0/evaluation/evaluation.json"
    assert message.startswith(f"error: {path} is damaged ({differ} scores ['organ', 'lesion']; "), message
    assert RUN_AGAIN in message
    path.write_text(json.dumps(state))  # kfold.json restored: a fold's damaged scores are named next
    evaluation = output / "fold_1" / "evaluation" / "evaluation.json"
    evaluation.write_text(evaluation.read_text()[:100])
    message = _refusal(["report", str(output)])
    assert f"error: {evaluation} is damaged (not JSON: " in message and message.endswith(": the fold is scored again")
    assert (output / "report.json").read_bytes() == (cross_validation.output / "report.json").read_bytes()


def test_predict_refuses_a_planted_fold_model(cross_validation: SimpleNamespace, tmp_path: Path) -> None:
    output = Path(shutil.copytree(cross_validation.output, tmp_path / "cv"))
    marker = tmp_path / "executed"
    model = output / "fold_1" / "models" / "model.pt"
    torch.save({"model.0.conv.weight": Payload(marker)}, model)
    image = cross_validation.dataset / "imagesTr" / "case_000.nii.gz"
    message = _refusal(["predict", str(output), "--images", str(image), "--out", str(tmp_path / "out")])
    assert message == f"error: fold_1: {refusal(model)}use a models/model.pt that a training run wrote", message
    assert UNSAFE_ADVICE not in message and not marker.exists() and not (tmp_path / "out").exists()


def test_a_planted_plan_in_select_json_is_refused_not_run(dataset3d: Path, tmp_path: Path) -> None:
    """select.json's plans are handed to every fold's training: one that is not literal stops the selection,
    named, before anything is parsed or trained."""
    output = tmp_path / "selection"
    output.mkdir()
    marker = tmp_path / "PWNED_plan"
    planted = f"$__import__('pathlib').Path({str(marker)!r}).touch()"
    state = {  # what `kfold select --folds 2 --bundles unet3d` records, with a plan that would run code
        "bundles": {"unet3d": str((REPO / "bundles" / "unet3d").resolve())},
        "dataset_dir": str(dataset3d.resolve()),
        "folds": 2,
        "seed": 0,
        "overrides": {"all": {}},
        "time_budget_min": None,
        "memory_gb": 8.0,
        "plans": {"unet3d": {"spacing": [0.8, 0.8, 2.5], "data#description": planted}},
    }
    (output / "select.json").write_text(json.dumps(state))
    argv = ["select", "--dataset_dir", str(dataset3d), "--output", str(output), "--folds", "2", "--bundles", "unet3d"]
    message = _refusal(argv)
    assert message.startswith(
        f"error: {output / 'select.json'} is damaged (plans#unet3d#data#description is a MONAI expression, reference "
        "or macro ($, @ or % first), which the folds' training would run as code"
    ), message
    assert SELECT_AGAIN in message
    assert not marker.exists() and not (output / "unet3d").exists() and not (output / "splits.json").exists()


def test_damaged_selection_files_are_named_with_the_fix(tmp_path: Path) -> None:
    output = tmp_path / "selection"
    output.mkdir()
    (output / "select.json").write_text('{"bundles": {"unet3d": "/bund')  # cut short
    message = _refusal(["report", str(output)])
    assert f"error: {output / 'select.json'} is damaged (not JSON: " in message and SELECT_AGAIN in message
    marker = tmp_path / "PWNED_selection"
    selection = {
        "winner": "unet3d",
        "ranking": ["unet3d"],
        "configurations": {"unet3d": {"members": f"$open({str(marker)!r}, 'w')"}},
        "plans": {"unet3d": {}},
    }
    (output / "selection.json").write_text(json.dumps(selection))
    message = _refusal(["predict", str(output), "--images", str(tmp_path), "--out", str(tmp_path / "out")])
    assert message.startswith(f"error: {output / 'selection.json'} is damaged (configurations "), message
    assert message.endswith(
        f": run `python -m custom_components.kfold report {output}` to write it again from the folds"
    )
    assert not marker.exists() and not (tmp_path / "out").exists()
