"""The MONAI model zoo's own CI on every bundle this project makes: both source bundles (with untrained weights of
their own network, as the zoo's ``_produce_fake_weights`` writes them), a run folder and a folder ``publish`` wrote.

Written from github.com/Project-MONAI/model-zoo at dfae206df112837d817e78d3727c9f32b3b52e82, step by step with the
MONAI calls its scripts make: ``ci/verify_bundle.py`` (``verify`` in full mode: files, version and changelog, the
metadata against its schema, the apps' properties, ``verify_net_in_out``, ``ckpt_export`` and ``torch.jit.load``),
``ci/unit_tests/test_spleen_ct_segmentation.py`` (train, then ``[train, evaluate]`` merged as one "train" workflow,
then inference without its weights loader; each initialised, its properties checked, run and finalised, as
``ci/unit_tests/utils.py`` ``check_workflow`` does) and ``.pre-commit-config.yaml`` (the hooks, at their rev v4.6.0).
The zoo downloads the schema the metadata names: ``tests/data/meta_schema_20240725.json`` is that file (see
``tests/data/README.md``), copied to ``eval/schema.json`` as its ``ci/prepare_schema.py`` does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from monai.apps.utils import download_url
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from pre_commit_hooks import (
    check_yaml,
    detect_private_key,
    end_of_file_fixer,
    mixed_line_ending,
    pretty_format_json,
    trailing_whitespace_fixer,
)

from custom_components.config_text import freeze
from custom_components.data import case_id
from custom_components.publish import file_hash, main, publish
from tests.conftest import REPO, SMALL_2D, SMALL_3D

SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"
NECESSARY_FILES = ("configs/metadata.json", "LICENSE")  # verify_bundle.py necessary_files_list
PREFERRED_FILES = ("models/model.pt",)  # and an inference config of any suffix
MAX_KB = 1024  # the zoo's check-added-large-files --maxkb
WEIGHTS_URL = "https://example.org/unet3d_synthetic/model.pt"
# the bundle keys of the training runs the unit tests start: the small network and data of the suite, one epoch
QUICK = {"max_epochs": 1, "val_interval": 1, "report": False, "progress_bar": False, "num_workers": 0}
SOURCE_SETTINGS = {"unet3d": SMALL_3D, "unet2d": SMALL_2D}  # as the command line gives them


def _values(settings: dict[str, str]) -> dict[str, object]:
    """Command-line settings as the values a ConfigWorkflow override takes."""
    return {key: yaml.safe_load(value) for key, value in settings.items()}


def _on(dataset: Path) -> dict[str, object]:
    """The overrides of the unit tests' workflows: QUICK on ``dataset``, named as the data the model trains on (so
    that evaluate's ``cases: auto`` scores training's validation cases, as in a run folder)."""
    return {**QUICK, "dataset_dir": str(dataset), "training_dataset_dir": str(dataset)}


def _configs(bundle: Path, name: str) -> str:
    return str(bundle / "configs" / name)


def _produce_fake_weights(bundle: Path) -> None:
    """verify_bundle.py ``_produce_fake_weights``: the inference config's network, untrained, as models/model.pt."""
    parser = ConfigParser()
    parser.read_config(f=_configs(bundle, "inference.yaml"))
    parser.read_meta(f=_configs(bundle, "metadata.json"))
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")


def verify_bundle(bundle: Path) -> None:
    """verify_bundle.py ``verify(bundle, mode="full")``, each step with the zoo's own calls."""
    # verify_bundle_directory: the large files "downloaded" (download_url finds each in place and checks its hash),
    # then the necessary and the preferred files
    large_files = bundle / "large_files.yml"
    if large_files.is_file():
        parser = ConfigParser()
        parser.read_config(str(large_files))
        for entry in parser.get()["large_files"]:
            entry["fuzzy"] = True
            entry["filepath"] = str(bundle / entry.pop("path"))
            download_url(**entry)
    for name in (*NECESSARY_FILES, *PREFERRED_FILES):
        assert (bundle / name).is_file(), f"necessary file {name} is not existing."
    assert [p for p in (bundle / "configs").glob("inference.*")], "inference config file is not existing."
    # verify_version_changes (a new bundle: its name is not in the zoo's model_info.json)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    # verify_metadata_format, with the schema prepare_schema.py puts in eval/
    (bundle / "eval").mkdir(exist_ok=True)
    shutil.copyfile(SCHEMA, bundle / "eval" / "schema.json")
    verify_metadata(meta_file=_configs(bundle, "metadata.json"), filepath=str(bundle / "eval" / "schema.json"))
    # verify_bundle_properties: each supported app's bundle_properties.py; none is declared (docs/evaluation.md)
    assert metadata["supported_apps"] == {}
    # verify_data_shape and verify_torchscript
    shapes = {"net_id": "network_def", "meta_file": _configs(bundle, "metadata.json"), "bundle_root": str(bundle)}
    verify_net_in_out(config_file=_configs(bundle, "inference.yaml"), **shapes)
    exported = bundle / "models" / "verify_model.ts"
    ckpt_export(
        filepath=str(exported),
        ckpt_file=str(bundle / "models" / "model.pt"),
        config_file=_configs(bundle, "inference.yaml"),
        **shapes,
    )
    torch.jit.load(str(exported))


def check_workflow(workflow: ConfigWorkflow) -> None:
    """ci/unit_tests/utils.py ``check_workflow(workflow, check_properties=True)``."""
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


def unit_tests(bundle: Path, override: dict[str, object], dataset: Path, tmp_path: Path) -> None:
    """test_spleen_ct_segmentation.py on ``bundle``: train; [train, evaluate] merged; inference."""
    files = {"logging_file": _configs(bundle, "logging.conf"), "meta_file": _configs(bundle, "metadata.json")}
    train_file, eval_file = _configs(bundle, "train.yaml"), _configs(bundle, "evaluate.yaml")
    run = tmp_path / "train"
    trainer = ConfigWorkflow(workflow_type="train", config_file=train_file, **files, **override, output_dir=str(run))
    check_workflow(trainer)
    validation = [case_id(str(item["image"])) for item in trainer.parser.get_parsed_content("data#val")]
    assert validation and (run / "models" / "model.pt").is_file()

    # evaluate.yaml after train.yaml, as one "train" workflow: the trained model scored on training's validation cases
    scores = tmp_path / "evaluation"
    validator = ConfigWorkflow(
        workflow_type="train",
        config_file=[train_file, eval_file],
        **files,
        **override,
        output_dir=str(scores),
        model_path=str(run / "models" / "model.pt"),
    )
    check_workflow(validator)
    assert sorted(json.loads((scores / "evaluation.json").read_text())["cases"]) == sorted(validation)

    image = sorted((dataset / "imagesTr").iterdir())[0]
    predictions = tmp_path / "predictions"
    inferrer = ConfigWorkflow(
        workflow_type="infer",
        config_file=_configs(bundle, "inference.yaml"),
        **files,
        **override,
        input_dir=str(image),
        output_dir=str(predictions),
        **{"handlers#0#_disabled_": True},  # do not load weights
    )
    check_workflow(inferrer)
    assert inferrer.bundle_root == str(bundle)  # found from the config file, whatever the working directory
    assert (predictions / f"{case_id(str(image))}_seg.nii.gz").is_file()


@pytest.fixture(scope="module")
def published(run3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder ``publish`` writes for ``run3d``: the bundle to submit and its weights beside it."""
    out = tmp_path_factory.mktemp("published")
    assert main([str(run3d), str(out), "--name", "unet3d_synthetic", "--weights_url", WEIGHTS_URL]) == 0
    return out


def _text_files(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.rglob("*") if path.is_file() and path.suffix not in (".pt", ".png"))


@pytest.mark.parametrize("bundle", ["unet3d", "unet2d"])
def test_source_bundles_pass_the_model_zoo_ci(bundle: str, dataset3d: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(REPO / "bundles" / bundle, tmp_path / bundle))
    _produce_fake_weights(copy)
    verify_bundle(copy)
    unit_tests(copy, {**_values(SOURCE_SETTINGS[bundle]), **_on(dataset3d)}, dataset3d, tmp_path)


def test_a_run_folder_passes_the_model_zoo_ci(run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run3d, tmp_path / "run"))
    verify_bundle(copy)
    unit_tests(copy, _on(dataset3d), dataset3d, tmp_path)


def test_a_published_folder_passes_the_model_zoo_ci(published: Path, dataset3d: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(published / "unet3d_synthetic", tmp_path / "unet3d_synthetic"))
    shutil.copytree(published / "unet3d_synthetic.large_files", bundle, dirs_exist_ok=True)  # as the CI downloads it
    verify_bundle(bundle)
    unit_tests(bundle, _on(dataset3d), dataset3d, tmp_path)


def test_json_is_laid_out_as_the_zoo_pre_commit_hook_writes_it(run3d: Path, published: Path) -> None:
    """pretty-format-json --indent=4 --no-sort-keys (without --autofix: 0 when no file would change)."""
    files = [
        *(REPO / "bundles" / bundle / "configs" / "metadata.json" for bundle in SOURCE_SETTINGS),
        *(run3d / name for name in ("configs/metadata.json", "metrics.json", "evaluation/evaluation.json")),
        published / "unet3d_synthetic" / "configs" / "metadata.json",
    ]
    assert pretty_format_json.main(["--no-sort-keys", "--indent=4", *map(str, files)]) == 0


def test_the_published_bundle_passes_the_zoo_hooks_and_leaves_the_weights_beside_it(
    published: Path, run3d: Path, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(published / "unet3d_synthetic", tmp_path / "unet3d_synthetic"))  # hooks may fix
    files = _text_files(bundle)
    assert not (bundle / "models").exists() and all(Path(f).stat().st_size <= MAX_KB * 1024 for f in files)
    assert end_of_file_fixer.main(files) == trailing_whitespace_fixer.main(files) == mixed_line_ending.main(files) == 0
    assert check_yaml.main([f for f in files if f.endswith((".yaml", ".yml"))]) == detect_private_key.main(files) == 0
    weights = published / "unet3d_synthetic.large_files" / "models" / "model.pt"
    assert weights.read_bytes() == (run3d / "models" / "model.pt").read_bytes()
    (entry,) = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert entry == {
        "path": "models/model.pt",
        "url": WEIGHTS_URL,
        "hash_val": file_hash(weights),
        "hash_type": "sha256",
    }


def test_the_published_metadata_and_docs_state_the_measured_results(
    published: Path, run3d: Path, dataset3d: Path
) -> None:
    bundle = published / "unet3d_synthetic"
    evaluation = json.loads((run3d / "evaluation" / "evaluation.json").read_text())
    summary = evaluation["summary"]
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] == "0.1.0" and list(metadata["changelog"]) == ["0.1.0"]
    scores = metadata["eval_metrics"]
    assert scores["mean_dice"] == round(evaluation["mean_dice"], 4)
    assert scores["dice_organ"] == round(summary["dice"]["organ"]["mean"], 4)
    assert scores["hd95_lesion_mm"] == round(summary["hd95"]["lesion"]["mean"], 4)
    assert scores["nsd_lesion"] == round(summary["nsd"]["lesion"]["mean"], 4)
    readme = (bundle / "docs" / "README.md").read_text()
    assert all(case in readme for case in evaluation["cases"]) and f"{summary['dice']['organ']['mean']:.3f}" in readme
    assert "2 epochs" in readme and "trained on 6 cases, validated on 2" in readme
    # the configs look for the data where the zoo's bundles do; no folder of this machine goes public
    public = f"/workspace/data/{dataset3d.name}"
    assert yaml.safe_load((bundle / "configs" / "train.yaml").read_text())["dataset_dir"] == public
    evaluate = yaml.safe_load((bundle / "configs" / "evaluate.yaml").read_text())
    assert evaluate["dataset_dir"] == evaluate["training_dataset_dir"] == public
    for local in (str(dataset3d), str(run3d)):
        assert not [name for name in _text_files(bundle) if local in Path(name).read_text()], local


def test_publish_names_what_a_run_lacks_and_never_overwrites(run3d: Path, published: Path, tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run3d / "configs", unfinished / "configs")
    with pytest.raises(SystemExit) as stopped:
        main([str(unfinished), str(tmp_path / "out")])
    assert str(stopped.value.code) == (
        f"error: {unfinished} is not a finished training run folder: LICENSE, models/model.pt, metrics.json missing. "
        "Publish the output_dir of a training that ran (a run from before LICENSE was copied: copy its bundle's "
        "LICENSE into it)"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as stopped:
        main([str(run3d), str(published), "--name", "unet3d_synthetic"])
    assert str(stopped.value.code) == (
        f"error: {published / 'unet3d_synthetic'} exists: remove it or choose another OUT or --name"
    )
    with pytest.raises(SystemExit) as stopped:
        main([str(run3d), str(tmp_path / "out"), "--name", "../elsewhere"])
    assert "--name '../elsewhere': use letters, digits and underscores only" in str(stopped.value.code)
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()


def test_a_published_split_travels_inside_the_bundle(run3d: Path, dataset3d: Path, tmp_path: Path) -> None:
    """A run trained on a splits file (a K-fold fold) publishes it as configs/splits_final.json, which its configs
    read from the bundle's own folder: evaluation scores the split's validation cases."""
    run = Path(shutil.copytree(run3d, tmp_path / "fold_0", ignore=shutil.ignore_patterns("evaluation")))
    splits = tmp_path / "splits.json"
    cases = sorted(case_id(str(path)) for path in (dataset3d / "imagesTr").iterdir())
    splits.write_text(json.dumps([{"train": cases[2:], "val": cases[:2]}]))
    for name in ("train", "evaluate"):
        config = run / "configs" / f"{name}.yaml"
        config.write_text(freeze(config.read_text(), {"splits_file": str(splits)}))
    bundle = publish(run, tmp_path / "out", name="fold_0")
    assert (bundle / "configs" / "splits_final.json").read_bytes() == splits.read_bytes()
    parser = ConfigParser()
    parser.read_config(_configs(bundle, "evaluate.yaml"))
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(dataset3d), "training_dataset_dir": str(dataset3d)})
    assert [case_id(item["image"]) for item in parser.get_parsed_content("evaluation_data#cases")] == cases[:2]
