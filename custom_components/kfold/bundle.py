"""A bundle folder as the K-fold tools see it: its configs, its repository root and its parsed keys."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser

from custom_components.kfold.splits import KFoldError
from custom_components.paths import working_directory

# Keys the K-fold run sets for every fold itself, and the option that sets them; `--set` may not override them.
RUN_KEYS = {
    "dataset_dir": "--dataset_dir",
    "output_dir": "--output",
    "fold": "--folds",
    "num_folds": "--folds",
    "splits_file": "--splits_file",
    "seed": "--seed",
}


@dataclass(frozen=True)
class Bundle:
    """A bundle folder ``<root>/bundles/<name>`` whose ``configs/`` hold train.yaml and its overlays."""

    path: Path

    @classmethod
    def find(cls, bundle: str | Path, overlays: tuple[str, ...] = ()) -> Bundle:
        """The bundle at ``bundle``, checked: train.yaml, the ``overlays`` and the shared configs exist."""
        found = cls(Path(bundle).resolve())
        for name in ("train", *overlays):
            if not found.config(name).is_file():
                raise KFoldError(
                    f"--bundle {bundle}: {found.config(name)} does not exist; pass a bundle folder such as "
                    f"bundles/unet3d whose configs/ hold train.yaml and {', '.join(f'{o}.yaml' for o in overlays)}"
                )
        if not (found.root / "bundles" / "common" / "configs").is_dir():
            raise KFoldError(f"--bundle {bundle}: {found.root}/bundles/common/configs is missing: keep the repo layout")
        return found

    @property
    def root(self) -> Path:
        """The repository root: the bundle configs' macros are relative to it, so every fold runs there."""
        return self.path.parents[1]

    def config(self, name: str) -> Path:
        """``configs/<name>.yaml`` of the bundle (train, evaluate, inference)."""
        return self.path / "configs" / f"{name}.yaml"

    def command(self, run_id: str, overrides: Mapping[str, str], overlays: tuple[str, ...] = ()) -> list[str]:
        """The user's ``python -m monai.bundle run`` command: train.yaml plus ``overlays``, ``--key value`` pairs."""
        configs = [str(self.config(name)) for name in ("train", *overlays)]
        config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
        args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file]
        for key, value in overrides.items():
            args += [f"--{key}", str(value)]
        return args

    def parser(self, overrides: Mapping[str, str], overlays: tuple[str, ...] = ()) -> ConfigParser:
        """A ConfigParser of train.yaml plus ``overlays`` with ``overrides`` parsed as the ``monai.bundle`` command
        line parses them; call ``get_parsed_content`` inside ``working_directory(self.root)``."""
        parser = ConfigParser()
        parser.read_config([str(self.config(name)) for name in ("train", *overlays)])
        parser.update({key: DefaultParseValue(str(value)) for key, value in overrides.items()})
        return parser

    def parsed(self, overrides: Mapping[str, str], ids: tuple[str, ...]) -> dict[str, Any]:
        """The parsed content of train.yaml ``ids`` with command-line style ``overrides``."""
        parser = self.parser(overrides)
        with working_directory(self.root):
            return {key: parser.get_parsed_content(key) for key in ids}


def parse_set(pairs: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs as a dict; the keys the run sets for each fold are refused with the option to use."""
    overrides: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KFoldError(f"--set {pair}: write KEY=VALUE, e.g. --set max_epochs=100")
        if key in RUN_KEYS:
            raise KFoldError(f"--set {key}: the K-fold run sets it for every fold; use {RUN_KEYS[key]} instead")
        overrides[key] = value
    return overrides
