"""The keys a user sets, as ``custom_components/settings.yaml`` declares them, and a bundle's own configs as written.

settings.yaml ships with the package, so a bundle copied alone is checked too; :class:`BundleConfigs` reads a bundle
folder's ``configs/*.yaml`` as data (never evaluated): its ids and the values it writes itself.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from monai.bundle import ConfigParser
from monai.bundle.utils import ID_SEP_KEY

DECLARATIONS = Path(__file__).with_name("settings.yaml")  # every key, declared once (render.py writes the configs)
CONFIGS = ("train", "evaluate", "inference")  # the workflows whose keys settings.yaml declares


# --- the declarations ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Declaration:
    """One key of one bundle (``unet3d``, ``unet2d``) as settings.yaml declares it."""

    key: str
    section: str
    configs: tuple[str, ...]
    help: Mapping[str, str]  # config -> meaning
    check: Mapping[str, Any]
    frozen: bool | str = True  # True: a run folder writes its value into every config; "train": its training configs
    source: str = ""  # the training key whose value a run folder writes for it (its `from`; the key itself if empty)

    @property
    def type(self) -> str:
        return self.check.get("type", "any")


def declared_field(entry: Mapping[str, Any], bundle: str, config: str, name: str, default: Any = None) -> Any:
    """A field of a settings.yaml entry: the bundle's value for this config first, the general value last."""
    layers = (entry.get(bundle, {}), entry)
    for layer in layers:
        if f"{name}_{config}" in layer:
            return layer[f"{name}_{config}"]
    for layer in layers:
        if name in layer:
            return layer[name]
    return default


@functools.cache
def _declared() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(DECLARATIONS.read_text())


def bundle_kinds() -> tuple[str, ...]:
    """The bundles settings.yaml declares keys for (``unet3d``, ``unet2d``)."""
    kinds: dict[str, None] = {}
    for entries in _declared().values():
        for entry in entries.values():
            kinds.update(dict.fromkeys(entry.get("bundles", ())))
            kinds.update(dict.fromkeys(name for name in entry if re.fullmatch(r"unet\dd", name)))
    return tuple(kinds)


@functools.cache
def declarations(kind: str) -> dict[str, Declaration]:
    """The keys of bundle ``kind``, in declaration order."""
    found = {}
    for section, entries in _declared().items():
        for key, entry in entries.items():
            if "bundles" in entry and kind not in entry["bundles"]:
                continue
            configs = tuple(entry.get("configs", ["train"]))
            found[key] = Declaration(
                key=key,
                section=section,
                configs=configs,
                help={c: " ".join(str(declared_field(entry, kind, c, "help", "")).split()) for c in CONFIGS},
                check={**entry.get("check", {}), **entry.get(kind, {}).get("check", {})},
                frozen=entry.get("frozen", True),
                source=entry.get("from", key),
            )
    return found


def run_sources(kind: str, frozen: bool | str = True) -> dict[str, str]:
    """The keys whose value a run folder of bundle ``kind`` writes as ``frozen`` says (True: into all its configs,
    "train": into its training configs, False: none, the machine's keys), each with the training key it takes the
    value of; ``output_dir`` apart (a run folder is its own output)."""
    declared = declarations(kind)
    return {
        key: d.source
        for key, d in declared.items()
        if d.frozen == frozen and key != "output_dir" and "train" in declared.get(d.source, d).configs
    }


# --- a bundle's own configs ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _read_config(file: Path, mtime_ns: int) -> Any:
    """A config file's content as written (read again when it changes; never modified by the callers)."""
    if file.suffix == ".json":
        return json.loads(file.read_text())
    return yaml.load(file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (safe)


@dataclass
class BundleConfigs:
    """The raw content of a bundle's ``configs/*.yaml``: its known ids and the values it writes itself."""

    root: Path
    folder: Path
    files: dict[str, dict[str, Any]]  # config name (train, evaluate, ...) -> top-level content as written

    @classmethod
    def read(cls, bundle: str | Path) -> BundleConfigs:
        path = Path(bundle).resolve()
        if (path / "configs").is_dir():
            root, folder = path, path / "configs"
        elif path.name == "configs":
            root, folder = path.parent, path
        else:
            root, folder = path, path
        files = {}
        for file in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml"), *folder.glob("*.json")]):
            content = _read_config(file, file.stat().st_mtime_ns) if file.name != "metadata.json" else None
            if isinstance(content, dict):
                files[file.stem] = content
        return cls(root, folder, files)

    def ids(self) -> set[str]:
        return {str(key) for content in self.files.values() for key in content}

    def values(self, config: str) -> dict[str, Any]:
        """The top-level content of ``config`` (train.yaml's for a config the bundle lacks)."""
        return dict(self.files.get(config, self.files.get("train", {})))

    def own(self, key: str) -> list[Any]:
        """Every value the bundle's configs write for ``key``: as written, and as MONAI's parser holds it once
        parsed (relative ids resolved, ``#`` written ``::``)."""
        written = [content[key] for content in self.files.values() if key in content]
        return [*written, *(as_parsed(key, value) for value in written)]

    def kind(self, config: str) -> str:
        """Which declared bundle this one is (a copy or a run folder of ``unet3d`` or ``unet2d``): the one whose
        declared keys its config holds best."""
        written = set(self.values(config)) or self.ids()

        def fit(kind: str) -> tuple[int, int]:
            keys = {k for k, d in declarations(kind).items() if config in d.configs}
            return len(keys & written) - len(keys - written), -len(keys)

        return max(bundle_kinds(), key=fit)


def as_parsed(id: str, value: Any) -> Any:
    """``value`` at ``id`` as MONAI's ``ConfigParser.parse`` rewrites it (relative ids made absolute, ``::``)."""
    if isinstance(value, str):
        return ConfigParser.resolve_relative_ids(id, value)
    if isinstance(value, Mapping):
        return {k: as_parsed(f"{id}{ID_SEP_KEY}{k}", item) for k, item in value.items()}
    if isinstance(value, list):
        return [as_parsed(f"{id}{ID_SEP_KEY}{i}", item) for i, item in enumerate(value)]
    return value
