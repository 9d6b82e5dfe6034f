"""MONAI's ``--tracking mlflow`` on the bundles: the run's keys as MLflow parameters, loss and Dice per class per epoch,
in a local SQLite store, from a working directory outside the repository as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import torch
from monai.utils import path_to_sqlite_uri

from custom_components import settings
from custom_components.tracking import attached_mlflow_handlers, scalar_metrics
from tests.conftest import REPO

TRAIN = {
    "spacing": "[0.8,0.8,2.5]",
    "patch_size": "[32,32,16]",
    "channels": "[16,32,64]",
    "strides": "[2,2]",
    "norm": "group_auto",
    "learning_rate": "0.003",
    "num_workers": "0",
    "num_folds": "3",
    "max_epochs": "2",
    "val_interval": "1",
    "progress_bar": "False",
    "log_every_iteration": "False",
}


TRAIN_CONFIG = REPO / "bundles" / "unet3d" / "configs" / "train.yaml"


def _bundle(
    cwd: Path, run_id: str, config_file: Path, overrides: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(config_file)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}  # no user store
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**env, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0 or not check, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _only_run(store: Path) -> tuple[mlflow.MlflowClient, mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(store)))
    (run,) = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    return client, run


def _steps(client: mlflow.MlflowClient, run: mlflow.entities.Run, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run.info.run_id, key))


def test_tracking_mlflow_records_keys_loss_and_dice_per_class(tmp_path: Path, dataset3d: Path) -> None:
    output_dir = tmp_path / "run"
    overrides = {"dataset_dir": str(dataset3d), "output_dir": str(output_dir), **TRAIN, "tracking": "mlflow"}
    _bundle(tmp_path, "training", REPO / "bundles" / "unet3d" / "configs" / "train.yaml", overrides)

    client, run = _only_run(output_dir / "mlruns.db")
    params = run.data.params
    assert params["patch_size"] == "[32, 32, 16]" and params["learning_rate"] == "0.003"
    assert params["norm"] == "group_auto" and params["class_names"] == "[organ, lesion]"
    assert params["max_epochs"] == "2" and params["loss"] == "dice_focal" and params["num_workers"] == "0"
    assert params["dataset_dir"] == str(dataset3d) and params["output_dir"] == str(output_dir)
    for key in ("val_mean_dice", "val_dice_organ", "val_dice_lesion"):
        assert _steps(client, run, key) == [1, 2], key  # one value per epoch
    assert _steps(client, run, "train_loss")  # MONAI's per-iteration loss
    assert not [key for key in run.data.metrics if "per_class" in key]
    assert run.info.status == "FINISHED"

    # the run folder's evaluate.yaml under --tracking mlflow: its own store beside evaluation.json
    evaluate = {"num_workers": "0", "progress_bar": "False", "tracking": "mlflow"}
    _bundle(tmp_path, "evaluating", output_dir / "configs" / "evaluate.yaml", evaluate)
    client, run = _only_run(output_dir / "evaluation" / "mlruns.db")
    assert run.data.params["model_path"] == str(output_dir / "models" / "model.pt")
    assert run.data.params["patch_size"] == "[32, 32, 16]" and run.data.params["cases"] == "auto"
    for key in ("val_mean_dice", "val_dice_organ", "val_dice_lesion"):
        assert _steps(client, run, key) == [1], key


def test_vector_metrics_become_one_scalar_per_class() -> None:
    metrics = {"val_mean_dice": 0.5, "val_dice_per_class": torch.tensor([0.25, 0.75]), "other": [1.0, 2.0]}
    assert scalar_metrics(metrics, ["organ", "lesion"]) == {
        "val_mean_dice": 0.5,
        "val_dice_organ": 0.25,
        "val_dice_lesion": 0.75,
        "other_0": 1.0,
        "other_1": 2.0,
    }


def test_the_mlflow_handler_on_an_engine_is_found(tmp_path: Path) -> None:
    """attached_mlflow_handlers reads ignite's private Engine._event_handlers (ignite lists no engine's handlers):
    this fails the day ignite changes it, and so would the parameters' logging."""
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

    engine = Engine(lambda engine, batch: None)
    handler = MLFlowHandler(tracking_uri=path_to_sqlite_uri(str(tmp_path / "mlruns.db")))
    handler.attach(engine)
    assert attached_mlflow_handlers(engine) == [handler]


def test_a_file_store_tracking_uri_stops_before_training(tmp_path: Path, dataset3d: Path) -> None:
    """MLflow opens no file store any more: the run stops at the settings check, not in MONAI's traceback."""
    output_dir, store = tmp_path / "run", (tmp_path / "mlruns").as_uri()
    overrides = {"dataset_dir": str(dataset3d), "output_dir": str(output_dir), "tracking": "mlflow"}
    result = _bundle(tmp_path, "training", TRAIN_CONFIG, {**overrides, "tracking_uri": store}, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        f'tracking_uri = "{store}": an MLflow file store, which MLflow refuses (unless MLFLOW_ALLOW_FILE_STORE=true); '
        "give a SQLite URI such as sqlite:////abs/path/mlruns.db, or leave it out: the default is "
        "<output_dir>/mlruns.db"
    ) in result.stderr
    assert not output_dir.exists() and not (tmp_path / "mlruns").exists()


def test_only_file_store_tracking_uris_are_refused() -> None:
    bundle = REPO / "bundles" / "unet3d"
    refused = settings.check({"tracking_uri": "mlruns"}, bundle)  # a path is a file store too
    assert [problem.key for problem in refused] == ["tracking_uri"]
    for uri in ("sqlite:////tmp/run/mlruns.db", "http://localhost:5000", "$@output_dir + '/x'"):
        assert settings.check({"tracking_uri": uri}, bundle) == [], uri
