"""A bundle folder as the K-fold tools see it: its configs and the keys ``prepare`` reads from its train.yaml."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from custom_components.bundle import KeyValueError, parse_key_values
from custom_components.kfold.splits import KFoldError

# Keys the K-fold run sets for every fold itself, and the option that sets them; `--set` may not override them.
RUN_KEYS = {
    "dataset_dir": "--dataset_dir",
    "output_dir": "--output",
    "fold": "--folds",
    "num_folds": "--folds",
    "splits_file": "--splits_file",
    "seed": "--seed",
}
CONFIGS = ("train", "evaluate")  # what a fold runs: training, then scoring its run folder's own evaluate.yaml


@dataclass(frozen=True)
class Bundle:
    """A bundle folder whose ``configs/`` hold train.yaml and evaluate.yaml; anywhere, a copied one too."""

    path: Path

    @classmethod
    def find(cls, bundle: str | Path) -> Bundle:
        """The bundle at ``bundle``, checked: its ``configs/`` hold train.yaml and evaluate.yaml."""
        found = cls(Path(bundle).resolve())
        for name in CONFIGS:
            if not found.config(name).is_file():
                raise KFoldError(
                    f"--bundle {bundle}: {found.config(name)} does not exist; pass a bundle folder such as "
                    "bundles/unet3d whose configs/ hold train.yaml and evaluate.yaml"
                )
        return found

    def config(self, name: str) -> Path:
        """``configs/<name>.yaml`` of the bundle (train, evaluate)."""
        return self.path / "configs" / f"{name}.yaml"

    def parsed(self, overrides: Mapping[str, Any], ids: tuple[str, ...]) -> dict[str, Any]:
        """The parsed content of train.yaml ``ids`` with ``overrides`` (values as :func:`parse_key_values` gives
        them) set on top, as the fold's ``monai.bundle run training`` sees them."""
        parser = ConfigParser()
        parser.read_config(str(self.config("train")))
        parser["bundle_root"] = str(self.path)
        parser.update(dict(overrides))
        return {key: parser.get_parsed_content(key) for key in ids}


def parse_set(pairs: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as bundle keys and values (read as YAML, :func:`parse_key_values`); the keys the run
    sets for each fold are refused with the option to use."""
    refused = {key: f"the K-fold run sets it for every fold; use {option} instead" for key, option in RUN_KEYS.items()}
    try:
        return parse_key_values(pairs, refused)
    except KeyValueError as err:
        raise KFoldError(str(err)) from err
