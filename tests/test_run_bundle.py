"""Bundles as MONAI and the model zoo see them: from any folder, copied alone, rendered from one template, and
every training run a bundle of its own that predicts, evaluates and exports with nothing repeated by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow, verify_net_in_out

from custom_components import render
from custom_components.run_bundle import run_values
from tests.conftest import REPO, SMALL_3D, read_metrics, run_bundle

BUNDLES = ("unet3d", "unet2d")


def _config(folder: Path, name: str) -> Path:
    return folder / "configs" / f"{name}.yaml"


def _top_level(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_committed_configs_are_the_template_rendered() -> None:
    assert render.main(["--check"]) == 0, "run `make render` after editing bundles/template"


def test_bundles_hold_no_path_outside_themselves() -> None:
    for bundle in BUNDLES:
        for config in (REPO / "bundles" / bundle / "configs").glob("*.yaml"):
            assert "%" not in "".join(
                line.split("#")[0] for line in config.read_text().splitlines() if line.lstrip().startswith(("-", "%"))
            ), config
            assert "bundles/common" not in config.read_text(), config


def test_run_folder_is_a_bundle_with_the_values_it_trained_with(run3d: Path, dataset3d: Path) -> None:
    for name in ("train", "inference", "evaluate", "multi_gpu_train"):
        assert _config(run3d, name).is_file(), name
    for name in ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "models/model.pt", "LICENSE"):
        assert (run3d / name).is_file(), name
    train = _top_level(_config(run3d, "train"))
    assert train["patch_size"] == [32, 32, 16] and train["channels"] == [16, 32, 64] and train["strides"] == [2, 2]
    # what training derived from dataset.json is written as the value it had
    assert train["num_classes"] == 3 and train["class_names"] == ["organ", "lesion"] and train["image_dims"] == 3
    assert train["in_channels"] == 1 and train["modality"] == {"0": "CT"}
    assert train["dataset_dir"] == str(dataset3d) and train["output_dir"] == "$@bundle_root"
    assert train["device"].startswith("$")  # the machine's choice, not the model's
    inference = _top_level(_config(run3d, "inference"))
    assert inference["spacing"] == [0.8, 0.8, 2.5] and inference["patch_size"] == [32, 32, 16]
    assert inference["num_classes"] == 3 and inference["intensity"]["scheme"] == "ct_window"
    assert inference["dataset_dir"] == "@input_dir"  # wiring below the user keys is never frozen
    evaluate = _top_level(_config(run3d, "evaluate"))
    assert evaluate["dataset_dir"] == evaluate["training_dataset_dir"] == str(dataset3d) and evaluate["num_folds"] == 4
    meta = json.loads((run3d / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["8*n"] * 3  # 2 strides of 2
    assert meta["eval_metrics"]["mean_dice"] == pytest.approx(read_metrics(run3d)["best_mean_dice"], abs=1e-4)
    readme = (run3d / "docs" / "README.md").read_text()
    assert str(dataset3d) in readme and "configs/inference.yaml" in readme


def _workflow(config: Path, workflow_type: str, **overrides: object) -> ConfigWorkflow:
    workflow = ConfigWorkflow(config_file=str(config), workflow_type=workflow_type, **overrides)
    workflow.initialize()
    return workflow


def test_run_folder_has_the_train_infer_and_eval_properties(run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    assert _workflow(_config(run3d, "train"), "train").check_properties() == []
    infer = _workflow(_config(run3d, "inference"), "infer", input_dir=str(dataset3d / "imagesTr"))
    assert infer.check_properties() == []
    evaluate = _workflow(_config(run3d, "evaluate"), "eval", output_dir=str(tmp_path / "evaluation"))
    assert evaluate.check_properties() == []


def test_run_folder_exports_to_torchscript_with_the_same_output(run3d: Path, tmp_path: Path) -> None:
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(run3d / "configs/metadata.json"),
        config_file=str(_config(run3d, "inference")),
    )
    exported = tmp_path / "model.ts"
    run = [
        "ckpt_export", "network_def", "--filepath", exported, "--ckpt_file", run3d / "models/model.pt",
        "--meta_file", run3d / "configs/metadata.json", "--config_file", _config(run3d, "inference"),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *map(str, run)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scripted = torch.jit.load(str(exported))
    parser = ConfigParser()
    parser.read_config(str(_config(run3d, "inference")))
    parser["bundle_root"] = str(run3d)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(run3d / "models/model.pt", weights_only=True))
    network.eval()
    image = torch.rand(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), network(image))


def test_a_bundle_copied_alone_trains_from_its_own_folder(dataset3d: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(REPO / "bundles" / "unet3d", tmp_path / "elsewhere" / "my_bundle"))
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": "runs/copied", "max_epochs": 1, "val_interval": 1}
    run_bundle("my_bundle/configs/train.yaml", overrides, cwd=copy.parent)  # a relative path, the copy's folder
    out = copy.parent / "runs" / "copied"  # relative output_dir: under the user's working directory
    assert read_metrics(out)["epochs"] == 1
    assert (out / "configs" / "inference.yaml").read_text().startswith("# Segment new images")


def test_a_value_the_run_configs_would_evaluate_is_never_written() -> None:
    """The last guard before a run folder's configs are written: resolved values are data, so one that MONAI's
    parser would evaluate there (whatever let it through) stops the run, naming where it sits."""
    values = {"class_names": ["organ", "$print('ran')"], "modality": {"0": "@network_def"}, "spacing": [1, 1, 2]}
    with pytest.raises(SystemExit) as stopped:
        run_values(values)
    message = str(stopped.value.code)
    assert "class_names#1 = " in message and "modality#0 = " in message and "spacing" not in message
    assert run_values({"class_names": ["organ", "lesion $1"]}) == {"class_names": ["organ", "lesion $1"]}
