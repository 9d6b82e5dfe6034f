"""The resolved value of every user key of the running config, for the components that write or log them all: the
run folder's configs (:class:`custom_components.run_bundle.RunBundle`) and MLflow's run parameters
(:class:`custom_components.tracking.MLflowTracking`).

They are read from the ``ConfigParser`` evaluating the config, by the key names ``settings.yaml`` declares, so the
configs need not list their keys a second time. Called from a config expression; anywhere else it stops with what
is missing rather than return nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from custom_components.bundle import running
from custom_components.settings_declarations import BundleConfigs, declarations, run_sources


def active_parser() -> ConfigParser:
    """The ``ConfigParser`` evaluating the calling config expression (MONAI's entry points and a parser built by hand
    alike)."""
    parser = running(ConfigParser)
    if parser is None:
        raise RuntimeError(
            "the bundle's settings are read from the ConfigParser evaluating the config: call this "
            "from a config expression, or give the values"
        )
    return parser


def resolved(sources: Mapping[str, str], parser: ConfigParser | None = None) -> dict[str, Any]:
    """Each key of ``sources`` with the resolved value of the config id it names."""
    parser = parser or active_parser()
    return {key: parser.get_parsed_content(source) for key, source in sources.items()}


def bundle_kind(bundle_root: str | Path) -> str:
    """Which declared bundle (``unet3d``, ``unet2d``) the bundle or run folder at ``bundle_root`` is."""
    return BundleConfigs.read(bundle_root).kind("train")


def run_settings(kind: str, frozen: bool | str = True) -> dict[str, Any]:
    """The values a run folder of bundle ``kind`` writes as ``frozen`` says
    (:func:`custom_components.settings_declarations.run_sources`), resolved in the running training config."""
    return resolved(run_sources(kind, frozen))


def config_settings(bundle_root: str | Path, config: str) -> dict[str, Any]:
    """Every key at the top of ``config`` (train, evaluate, inference) of the bundle at ``bundle_root``, resolved."""
    kind = BundleConfigs.read(bundle_root).kind(config)
    return resolved({key: key for key, declared in declarations(kind).items() if config in declared.configs})
