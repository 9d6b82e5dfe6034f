"""Every setting checked before any work: the user's bad keys from the command line, a plan file, ``prepare plan
--set`` and ``kfold run --set`` stop at once with every problem (key, value, fix); booleans are booleans; nothing a
plan file plants is executed; ``python -m custom_components.settings BUNDLE`` lists every key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow

from custom_components import settings, settings_declarations
from custom_components.config_text import user_keys
from custom_components.kfold.__main__ import main as kfold_main
from custom_components.networks import UNetWithoutSkips
from custom_components.prepare import main as prepare_main
from custom_components.settings_values import run_settings
from tests.conftest import REPO, SMALL_3D, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"
BUNDLE_3D = REPO / "bundles/unet3d"
BUNDLE_2D = REPO / "bundles/unet2d"


def _keys(problems: list[settings.Problem]) -> list[str]:
    return [problem.key for problem in problems]


def _nothing_written(output_dir: Path) -> None:
    assert not (output_dir / "cache").exists() and not (output_dir / "models").exists()
    assert not (output_dir / "configs").exists() and not (output_dir / "metrics.json").exists()


# --- the user's command -------------------------------------------------------------------------------------------


def test_bad_settings_stop_the_run_before_any_data_with_every_key_named(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    bad = {"patch_size": "[0,0,0]", "spacing": "[1,1]", "norm": "foo", "learning_rate": "-1", "skip_connections": "no"}
    bad |= {"iterations_per_epoch": "2.5"}
    result = run_bundle(TRAIN_3D, {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, **bad}, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("error: 6 settings") :]
    lines = message.splitlines()[1:7]
    for key in bad:  # one line each: key = value: what is wrong; the fix
        line = next(line for line in lines if line.strip().startswith(f"{key} = "))
        assert "; give " in line, line
    assert "patch_size = [0, 0, 0]: entries 0, 1, 2 should be >= 1" in message
    assert "spacing = [1, 1]: has 2 values, needs 3" in message
    assert 'norm = "foo"' in message and "group_ws" in message  # the names it takes
    assert "learning_rate = -1: should be >= 0" in message
    assert 'skip_connections = "no": should be true or false' in message
    assert "iterations_per_epoch = 2.5: should be a valid integer; give an integer >= 1, or null" in message
    _nothing_written(out)


def test_a_misspelt_key_stops_the_run_naming_the_key_it_meant(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "patchsize": "[16,16,16]"}
    result = run_bundle(TRAIN_3D, overrides, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "patchsize = [16, 16, 16]: not a key of this bundle; did you mean `patch_size`?" in result.stderr
    assert f"python -m custom_components.settings {BUNDLE_3D}" in result.stderr  # where every key is listed
    _nothing_written(out)


def test_a_boolean_given_as_text_is_a_boolean(dataset3d: Path, tmp_path: Path) -> None:
    """`--skip_connections false` arrives from fire as the text "false", which is true: the ablation would keep its
    skips. The check makes it False before anything is built."""
    overrides = {k: yaml.safe_load(v) for k, v in SMALL_3D.items()}
    workflow = ConfigWorkflow(
        config_file=str(REPO / TRAIN_3D),
        workflow_type="train",
        logging_file=False,
        **{**overrides, "dataset_dir": str(dataset3d), "output_dir": str(tmp_path / "run")},
        skip_connections="false",
        amp="0",
    )
    workflow.initialize()
    assert workflow.parser["skip_connections"] is False and workflow.parser["amp"] is False
    assert isinstance(workflow.parser.get_parsed_content("network_def"), UNetWithoutSkips)
    _nothing_written(tmp_path / "run")


def test_an_expression_planted_in_a_plan_file_is_refused_and_not_run(dataset3d: Path, tmp_path: Path) -> None:
    marker = tmp_path / "planted"
    plan = tmp_path / "plan_3d.yaml"
    plan.write_text(yaml.safe_dump({"patch_size": f"$__import__('pathlib').Path('{marker}').touch()", "seed": 1}))
    workflow = ConfigWorkflow(
        config_file=[str(REPO / TRAIN_3D), str(plan)],
        workflow_type="train",
        logging_file=False,
        dataset_dir=str(dataset3d),
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(SystemExit) as stopped:
        workflow.initialize()
    message = str(stopped.value.code)
    assert message.startswith("error: 1 setting") and "patch_size = \"$__import__('pathlib')" in message
    assert "a MONAI expression, reference or macro, not run" in message and "give a literal value" in message
    assert not marker.exists()
    _nothing_written(tmp_path / "run")


def test_a_plan_file_is_read_as_data_and_the_command_line_wins(dataset3d: Path, tmp_path: Path) -> None:
    """`--plan_file`: the plan's values replace the bundle's defaults (a part of a key too), a key set on the command
    line is kept, and a value the check converts (a boolean as text) is converted."""
    plan = tmp_path / "plan_3d.yaml"
    plan.write_text(
        "patch_size: [32, 32, 16]\nseed: 7\nlearning_rate: 3e-3\nintensity#window: [-100, 200]\namp: 'false'\n"
    )
    workflow = ConfigWorkflow(
        config_file=str(REPO / TRAIN_3D),
        workflow_type="train",
        logging_file=False,
        **{**{k: yaml.safe_load(v) for k, v in SMALL_3D.items() if k != "patch_size"}, "seed": 2},
        dataset_dir=str(dataset3d),
        output_dir=str(tmp_path / "run"),
        plan_file=str(plan),
    )
    workflow.initialize()
    parsed = workflow.parser.get_parsed_content
    assert parsed("patch_size") == [32, 32, 16] and parsed("learning_rate") == 0.003  # from the plan
    assert parsed("intensity") == {"scheme": "ct_window", "window": [-100, 200], "mean": None, "std": None}
    assert parsed("amp") is False
    assert parsed("seed") == 2  # the command line's
    _nothing_written(tmp_path / "run")


def test_code_in_a_plan_file_never_runs(dataset3d: Path, tmp_path: Path) -> None:
    """A plan file that sets a wiring id, replaces `initialize` (which holds the settings check), sets a nested id
    of the wiring or puts an expression in a setting: every entry refused at once, naming the file, none run."""
    markers = [tmp_path / f"planted{i}" for i in range(4)]
    touch = [f"$__import__('pathlib').Path('{marker}').touch()" for marker in markers]
    plan = tmp_path / "plan_3d.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "network_in_channels": touch[0],
                "initialize": [touch[1]],
                "train#trainer#max_epochs": touch[2],
                "channels": touch[3],
                "spacing": [0.8, 0.8, 2.5],
            }
        )
    )
    out = tmp_path / "run"
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "plan_file": plan}
    result = run_bundle(TRAIN_3D, overrides, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("error: 4 settings") :]
    for id in ("network_in_channels", "initialize", "train#trainer#max_epochs"):
        assert f"{id} (in plan_file {plan}) = " in message and "is not a setting of this bundle" in message
    assert f"channels (in plan_file {plan}) = " in message and "a plan file is data; give a literal value" in message
    assert not any(marker.exists() for marker in markers)
    _nothing_written(out)


def test_the_check_stops_when_it_cannot_run() -> None:
    """A parser built by hand that evaluates `initialize`: the check cannot read the workflow's settings, so it stops
    the run saying so, rather than letting it go on unchecked."""
    parser = ConfigParser()
    parser.read_config(str(REPO / TRAIN_3D))
    parser["bundle_root"] = str(BUNDLE_3D)
    with pytest.raises(SystemExit, match="found no MONAI ConfigWorkflow running the config"):
        parser.get_parsed_content("initialize#0")


def test_the_settings_are_resolved_in_the_parser_running_the_config_or_not_at_all() -> None:
    """The run bundle's and MLflow's values come from the parser evaluating the config, by the names settings.yaml
    declares: the same values the config's own keys resolve to, and a stop outside a config, never an empty set."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles/unet3d/configs/evaluate.yaml"))
    parser["bundle_root"] = str(BUNDLE_3D)
    parser["params"] = f"$custom_components.settings_values.config_settings('{BUNDLE_3D}', 'evaluate')"
    params = parser.get_parsed_content("params")
    assert params["patch_size"] == [96, 96, 96] and params["tta"] is False and params["cases"] == "auto"
    written = set(user_keys((REPO / "bundles/unet3d/configs/evaluate.yaml").read_text())) - {"imports", "bundle_root"}
    assert set(params) == written  # every key at the top of evaluate.yaml, each declared
    assert {"sw_overlap", "previous_stage", "nsd_tolerance_mm"} <= set(params) and "learning_rate" not in params
    with pytest.raises(RuntimeError, match="read from the ConfigParser evaluating the config"):
        run_settings("unet3d")


# --- prepare plan --set, kfold run --set -----------------------------------------------------------------------


def test_prepare_plan_set_is_checked_before_the_dataset_is_read(tmp_path: Path, capsys) -> None:
    never_read = tmp_path / "no_dataset_here"
    argv = [
        "plan",
        str(never_read),
        "--set",
        "patchsize=[16,16,16]",
        "--set",
        "norm=foo",
        "--set",
        "channels=[8,16,32,64,128]",
    ]
    assert prepare_main(argv) == 1
    err = capsys.readouterr().err
    assert "error: 2 settings of --set" in err and "did you mean `patch_size`?" in err and 'norm = "foo"' in err
    assert "channels" not in err.split("cannot be used")[1]  # a valid key is not reported
    assert "dataset" not in err.split("cannot be used")[1] and not never_read.exists()


def test_kfold_run_set_is_checked_before_any_fold(tmp_path: Path) -> None:
    output = tmp_path / "cv"
    argv = ["run", "--bundle", str(BUNDLE_3D), "--dataset_dir", str(tmp_path / "none"), "--folds", "2"]
    argv += ["--output", str(output), "--set", "norm=foo", "learning_rate=-0.1", "intensity#scheme=mri"]
    with pytest.raises(SystemExit) as stopped:
        kfold_main(argv)
    message = str(stopped.value.code)
    assert message.startswith("error: 3 settings of --set for train.yaml of the bundle")
    assert 'norm = "foo"' in message and "learning_rate = -0.1: should be >= 0" in message
    assert "intensity = " in message and "scheme should be 'ct_window', 'ct_zscore' or 'zscore'" in message
    assert not output.exists()


# --- the rules, in-process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", [BUNDLE_3D, BUNDLE_2D])
@pytest.mark.parametrize(
    "configs",
    [["train"], ["train", "multi_gpu_train"], ["evaluate"], ["inference"]],
    ids=["train", "multi_gpu", "evaluate", "inference"],
)
def test_every_config_of_both_bundles_passes_its_own_check(bundle: Path, configs: list[str]) -> None:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f"{name}.yaml") for name in configs])
    parser.parse()  # as a workflow holds it when `initialize` runs (relative ids resolved)
    checked = settings.validate(parser.get(), bundle, configs[0])
    assert checked.problems == [] and checked.converted == {}


def test_types_ranges_and_names() -> None:
    problems = settings.check(
        {
            "max_epochs": 2.5,
            "iterations_per_epoch": 0,
            "batch_size": True,
            "cache_rate": 1.5,
            "dropout": 1,
            "loss": "dice_foca",
            "optimizer": "adagrad",
            "lr_scheduler": "cosine",  # fine
            "cases": "some",
            "norm": ["group", {"num_groups": 4}],  # any MONAI norm spec: fine
            "num_workers": 0,  # fine
            "class_weights": None,  # nullable: fine
            "num_res_units": None,
        },
        BUNDLE_3D,
    )
    by_key = {problem.key: problem for problem in problems}
    assert sorted(by_key) == sorted(
        [
            "max_epochs",
            "iterations_per_epoch",
            "batch_size",
            "cache_rate",
            "dropout",
            "loss",
            "optimizer",
            "cases",
            "num_res_units",
        ]
    )
    assert by_key["max_epochs"].fix == "give an integer >= 1"
    assert by_key["iterations_per_epoch"].problem == "should be >= 1"
    assert by_key["cache_rate"].problem == "should be >= 0 and <= 1"
    assert by_key["loss"].problem == "not an entry of `losses`" and "dice_focal, dice_ce" in by_key["loss"].fix
    assert str(by_key["optimizer"]).startswith(
        'optimizer = "adagrad": not an entry of `optimizers`; give one of: adamw'
    )
    assert by_key["num_res_units"].problem == "should not be null"


def test_booleans_take_true_false_and_1_0_only() -> None:
    for given, expected in [("false", False), ("False", False), ("0", False), (0, False), ("True", True), (1, True)]:
        checked = settings.validate({"skip_connections": given, "progress_bar": True}, BUNDLE_3D)
        assert checked.problems == [] and checked.converted == {"skip_connections": expected}, given
    for given in ("no", "FALSE", "yes", 2, 0.0, "", [True]):
        assert _keys(settings.check({"skip_connections": given}, BUNDLE_3D)) == ["skip_connections"], given


def test_lists_have_one_value_per_axis_and_the_patch_fits_the_network() -> None:
    small = {"channels": [16, 32, 64], "strides": [2, 2]}
    assert settings.check({**small, "spacing": [0.8, 0.8, -1], "patch_size": [32, 32, 16]}, BUNDLE_3D) == []
    (problem,) = settings.check({**small, "patch_size": [30, 32, 4]}, BUNDLE_3D)
    assert problem.key == "patch_size" and "downsample each axis by [4, 4, 4]" in problem.problem
    assert problem.fix == "give e.g. [32, 32, 4], or change strides"
    # per-axis strides: [2, 2, 1] twice downsamples z by 1
    assert settings.check({**small, "patch_size": [32, 32, 5], "strides": [[2, 2, 1], [2, 2, 1]]}, BUNDLE_3D) == []
    # the default patch (96) does not fit six strides of 2 (64): the strides given are held against it
    assert _keys(settings.check({"channels": [8] * 7, "strides": [2] * 6}, BUNDLE_3D)) == ["patch_size"]
    assert _keys(settings.check({"strides": [2, 2, 2]}, BUNDLE_3D)) == ["strides"]  # one fewer than the channels
    assert _keys(settings.check({"strides": [[2, 2], 2, 2, 2]}, BUNDLE_3D)) == ["strides"]  # per axis: 3 values
    assert _keys(settings.check({"channels": [16]}, BUNDLE_3D)) == ["channels"]  # at least two levels
    # the 2D bundle: patches in the slice plane, spacing still x, y, z
    assert settings.check({"patch_size": [32, 32], "spacing": [0.8, 0.8, -1]}, BUNDLE_2D) == []
    assert _keys(settings.check({"patch_size": [32, 32, 16], "spacing": [0.8, 0.8]}, BUNDLE_2D)) == [
        "spacing",
        "patch_size",
    ]
    assert _keys(settings.check({"class_weights": [1.0, 2.0], "num_classes": 3}, BUNDLE_3D)) == ["class_weights"]


def test_intensity_follows_the_rules_of_its_scheme() -> None:
    assert settings.check({"intensity": {"scheme": "zscore"}}, BUNDLE_3D) == []
    assert settings.check({"intensity#window": [864, 1264]}, BUNDLE_3D) == []  # a nested id changes the default
    ok = {"scheme": "ct_zscore", "window": [-100, 300], "mean": 50.0, "std": 40.0}
    assert settings.check({"intensity": ok}, BUNDLE_3D) == []
    (problem,) = settings.check({"intensity#scheme": "ct_zscore"}, BUNDLE_3D)
    assert problem.key == "intensity" and "needs mean and std" in problem.problem
    (problem,) = settings.check({"intensity": {**ok, "std": 0, "window": [300, -100], "level": 1}}, BUNDLE_3D)
    assert "window should be [low, high]" in problem.problem and "std should be a number > 0" in problem.problem
    assert "level is not a field" in problem.problem


def test_unknown_keys_name_the_closest_and_help_names_the_listing() -> None:
    (problem,) = settings.check({"learningrate": 0.1}, BUNDLE_3D)
    assert problem.fix.startswith("did you mean `learning_rate`?")
    (problem,) = settings.check({"help": True}, BUNDLE_3D)
    assert problem.key == "--help" and f"python -m custom_components.settings {BUNDLE_3D}" in problem.fix
    # wiring ids, nested ids and the keys MONAI's --tracking adds are known
    keys = {"network_def#act": "relu", "train#trainer#max_epochs": 2, "tracking_uri": "sqlite:///x.db", "run_name": "r"}
    assert settings.check(keys, BUNDLE_3D) == []
    assert _keys(settings.check({"input_dirr": "x"}, BUNDLE_3D, "inference")) == ["input_dirr"]


def test_expressions_are_taken_only_as_the_bundle_writes_them(tmp_path: Path) -> None:
    train = yaml.safe_load((BUNDLE_3D / "configs/train.yaml").read_text())
    assert settings.check({"num_classes": train["num_classes"], "output_dir": train["output_dir"]}, BUNDLE_3D) == []
    for key, value in {"num_classes": "$3", "patch_size": "@crop_size", "norm": "%other.yaml#norm"}.items():
        assert _keys(settings.check({key: value}, BUNDLE_3D)) == [key], key
    assert _keys(settings.check({"intensity": {"scheme": "zscore", "mean": "$1"}}, BUNDLE_3D)) == ["intensity"]


def test_a_copied_bundle_is_checked_without_the_repository(tmp_path: Path) -> None:
    copy = Path(shutil.copytree(BUNDLE_2D, tmp_path / "my_unet2d"))
    assert _keys(settings.check({"norm": "foo", "slice_axis": 3}, copy)) == ["slice_axis", "norm"]
    assert settings.check({"patch_size": [64, 64]}, copy) == []


def test_the_listing_names_every_key_with_its_default(capsys) -> None:
    assert settings.main([str(BUNDLE_3D)]) == 0
    listing = capsys.readouterr().out
    train = yaml.safe_load((BUNDLE_3D / "configs/train.yaml").read_text())
    declared = settings_declarations.declarations("unet3d")
    keys = [key for key in train if key in declared]
    assert len(keys) == len([k for k, d in declared.items() if "train" in d.configs]) >= 50
    lines = listing.splitlines()
    for key in keys:
        (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{key}: ")]
        assert lines[index + 1].startswith("    takes: "), key  # what it takes, then its meaning
    assert "patch_size: [96, 96, 96]" in lines and "    takes: a list of 3 integers, each >= 1" in listing
    assert "norm: instance" in lines and "loss: dice_focal" in lines
    assert settings.main([str(BUNDLE_2D), "--config", "inference"]) == 0
    assert "input_dir: images" in capsys.readouterr().out.splitlines()
