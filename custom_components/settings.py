"""Every key a user sets, checked before any work: ``check(values, bundle, config)`` and the bundles' hook.

Each key is declared once, in ``custom_components/settings.yaml`` (shipped with the package, so a bundle copied alone
is checked too): its default, meaning and, under ``check``, what it takes. :func:`check` validates a mapping of keys
to values against those declarations with pydantic, and returns every problem at once, each with the key, the value
and the fix:

- a key that is neither declared nor a top-level id of the bundle's own configs (nor one MONAI's ``--tracking``
  adds) is unknown, with the closest known key ("did you mean `patch_size`?");
- types and ranges; booleans take ``true/false/True/False/1/0`` only (fire passes ``--skip_connections false`` as
  the text "false") and are converted to real booleans;
- lists have one value per axis, ``patch_size`` fits the network's total downsampling, names (``norm``, ``loss``,
  ``optimizer``, ``lr_scheduler``, the ``intensity`` scheme) are among the known ones;
- a MONAI expression, reference or macro (``$``, ``@``, ``%`` first) in a declared key is refused unless it is the
  value the bundle's own config files write for that key: nothing planted in a plan file or passed on the command
  line is executed. Derived keys (``num_classes`` from dataset.json, ...) written so are not checked further.

Every workflow of the bundles calls :func:`check_workflow` first in its ``initialize`` list, before any data is read;
``prepare plan --set`` and ``kfold run --set`` call :func:`check`. ``python -m custom_components.settings BUNDLE``
lists every key with its default, what it takes and its meaning.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import torch
import yaml
from monai.bundle import DEFAULT_MLFLOW_SETTINGS, ConfigParser, ConfigWorkflow
from monai.bundle.utils import ID_SEP_KEY
from monai.networks.layers.factories import Norm
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    Strict,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from custom_components.bundle import expression_ids, running
from custom_components.config_text import flow
from custom_components.norms import NORM_CHOICES, resolve_norm
from custom_components.plan_file import PLAN_KEY, Plan, read_plan
from custom_components.transforms import INTENSITY_SCHEMES

logger = logging.getLogger(__name__)

DECLARATIONS = Path(__file__).with_name("settings.yaml")  # every key, declared once (render.py writes the configs)
CONFIGS = ("train", "evaluate", "inference")  # the workflows whose keys settings.yaml declares
# Top-level keys MONAI's `--tracking mlflow` adds to a config (its settings' configs that are not handlers), and the
# metadata's key
TRACKING_KEYS = tuple(
    key for key in DEFAULT_MLFLOW_SETTINGS["configs"] if key not in DEFAULT_MLFLOW_SETTINGS["handlers_id"]
)
META_KEY = "_meta_"
# MLflow opens no file store (a file:// URI or a path) unless this variable is true: a tracking_uri so stops the run
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
BOOLEANS = {"true": True, "True": True, "1": True, "false": False, "False": False, "0": False}
LISTING = "python -m custom_components.settings"
STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)
# keys one `architecture` builds alone: that architecture, and the value that leaves the key out of the other one
ARCHITECTURE_ONLY = {
    "skip_connections": ("unet", True),
    "kernel_sizes": ("dynunet", None),
    "deep_supervision": ("dynunet", False),
}
DYNUNET_MIN_LEVELS = 3  # MONAI's DynUNet builds at least three resolution levels


# --- the declarations ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Declaration:
    """One key of one bundle (``unet3d``, ``unet2d``) as settings.yaml declares it."""

    key: str
    section: str
    configs: tuple[str, ...]
    help: Mapping[str, str]  # config -> meaning
    check: Mapping[str, Any]

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
            )
    return found


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
        return [*written, *(_as_parsed(key, value) for value in written)]

    def kind(self, config: str) -> str:
        """Which declared bundle this one is (a copy or a run folder of ``unet3d`` or ``unet2d``): the one whose
        declared keys its config holds best."""
        written = set(self.values(config)) or self.ids()

        def fit(kind: str) -> tuple[int, int]:
            keys = {k for k, d in declarations(kind).items() if config in d.configs}
            return len(keys & written) - len(keys - written), -len(keys)

        return max(bundle_kinds(), key=fit)


# --- what a key takes: pydantic types built from the declarations ------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bounds_text(check: Mapping[str, Any]) -> str:
    signs = (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<"))
    text = " and ".join(f"{sign} {_show(check[name])}" for name, sign in signs if name in check)
    if check.get("allow"):
        text += f" (or {', '.join(map(_show, check['allow']))})"
    return text


def _in_bounds(check: Mapping[str, Any], value: Any) -> bool:
    if value in check.get("allow", ()):
        return True
    return all(
        name not in check or test(value, check[name])
        for name, test in (
            ("min", lambda v, b: v >= b),
            ("gt", lambda v, b: v > b),
            ("max", lambda v, b: v <= b),
            ("lt", lambda v, b: v < b),
        )
    )


def _bounded(check: Mapping[str, Any]) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if _number(value) and not _in_bounds(check, value):
            raise PydanticCustomError("range", "should be {bounds}", {"bounds": _bounds_text(check)})
        if "choices" in check and value not in check["choices"]:
            raise PydanticCustomError("choice", "should be one of: {names}", {"names": _names(check["choices"])})
        return value

    return validate


def _boolean(value: Any) -> Any:
    """``true/false/True/False/1/0`` (text, as fire passes ``--key false``, or YAML) as a bool; nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value in BOOLEANS:
        return BOOLEANS[value]
    raise PydanticCustomError("boolean", "should be true or false (True/False/1/0 are taken too)")


def _path(value: Any) -> Any:
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
        return value
    raise PydanticCustomError("path", "should be a file or folder path")


def _device(value: Any) -> Any:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            torch.device(value)
            return value
        except (RuntimeError, ValueError):
            pass
    raise PydanticCustomError("device", "should be a torch device such as cpu, cuda or cuda:0")


def norm_names() -> list[str]:
    """``norm`` names: the bundles' choices, then MONAI's norm layers (its factory, with ``group_auto`` registered)."""
    monai = [name.lower() for name in Norm.names if name.lower() not in NORM_CHOICES]
    return [*NORM_CHOICES, *monai]


def _norm(value: Any) -> Any:
    names = norm_names()
    if isinstance(value, str) and value.lower() in names:
        return value
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and value[0].lower() in names
        and isinstance(value[1], Mapping)
    ):
        return value
    raise PydanticCustomError("norm", "is not a normalisation the network knows")


def _stride(check: Mapping[str, Any], spatial_dims: int | None) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        axes = value if isinstance(value, list | tuple) else [value]
        per_axis = isinstance(value, list | tuple)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in axes) or (
            per_axis and spatial_dims is not None and len(axes) != spatial_dims
        ):
            raise PydanticCustomError(
                "stride", "should be an integer or a list of {n} integers (one per axis)", {"n": spatial_dims or "N"}
            )
        if not all(_in_bounds(check, v) for v in axes):
            raise PydanticCustomError("range", "should be {bounds}", {"bounds": _bounds_text(check)})
        return value

    return validate


def _window(value: Any) -> Any:
    if value is None or (
        isinstance(value, list | tuple) and len(value) == 2 and all(map(_number, value)) and value[0] < value[1]
    ):
        return value
    raise PydanticCustomError("window", "should be [low, high], two numbers with low < high")


def _optional_number(positive: bool) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if value is None or (_number(value) and math.isfinite(value) and (not positive or value > 0)):
            return value
        raise PydanticCustomError("number", "should be a number > 0" if positive else "should be a number")

    return validate


class Intensity(BaseModel):
    """The ``intensity`` key: what :func:`custom_components.transforms.intensity_transform` takes, and its rules."""

    model_config = ConfigDict(strict=True, extra="forbid")

    scheme: Literal[INTENSITY_SCHEMES] = "ct_window"  # type: ignore[valid-type]
    window: Annotated[Any, PlainValidator(_window)] = (-160.0, 240.0)
    mean: Annotated[Any, PlainValidator(_optional_number(False))] = None
    std: Annotated[Any, PlainValidator(_optional_number(True))] = None

    @model_validator(mode="after")
    def _scheme_has_what_it_needs(self) -> Intensity:
        if self.scheme in ("ct_window", "ct_zscore") and self.window is None:
            raise PydanticCustomError("intensity", "scheme {scheme} needs window", {"scheme": self.scheme})
        if self.scheme == "ct_zscore" and (self.mean is None or self.std is None):
            raise PydanticCustomError("intensity", "scheme ct_zscore needs mean and std (see `prepare plan`)")
        return self


ITEM_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


def _annotation(check: Mapping[str, Any], spatial_dims: int | None) -> Any:
    """The pydantic type of a declared key (null is handled before)."""
    kind = check.get("type", "any")
    bounded = AfterValidator(_bounded(check))
    if kind in ITEM_TYPES:
        return Annotated[ITEM_TYPES[kind], bounded]
    if kind == "bool":
        return Annotated[bool, BeforeValidator(_boolean)]
    if kind == "list":
        items = check.get("items", "any")
        if items == "stride":
            item = Annotated[Any, PlainValidator(_stride(check, spatial_dims))]
        else:
            item = Annotated[ITEM_TYPES.get(items, Any), bounded]
        return Annotated[list[item], Strict(False)]  # a tuple from Python is a list too
    if kind == "dict":
        return dict[str, Any]
    if kind == "intensity":
        return Intensity
    special = {"path": _path, "device": _device, "norm": _norm}
    if kind in special:
        return Annotated[Any, PlainValidator(special[kind])]
    return Any


# --- descriptions: what a key takes, in words ---------------------------------------------------------------------

ITEM_WORDS = {
    "int": "integers",
    "float": "numbers",
    "str": "names",
    "stride": "integers or lists of one integer per axis",
}


def describe(declaration: Declaration, values: Mapping[str, Any] | None = None, catalogue: Any = None) -> str:
    """What ``declaration``'s key takes, in words; ``values`` (the other keys) give a list its length."""
    check = declaration.check
    kind = declaration.type
    bounds = _bounds_text(check)
    if kind == "int":
        text = "an integer" + (f" {bounds}" if bounds else "")
    elif kind == "float":
        text = "a number" + (f" {bounds}" if bounds else "")
    elif kind == "bool":
        text = "true or false"
    elif kind == "str":
        text = "a name"
    elif kind == "path":
        text = "a file or folder path"
    elif kind == "device":
        text = "a torch device: cpu, cuda or cuda:N"
    elif kind == "dict":
        text = "a mapping"
    elif kind == "norm":
        text = f'one of {_names(norm_names())}, or a MONAI norm with arguments such as ["group", {{"num_groups": 4}}]'
    elif kind == "intensity":
        text = (
            f"{{scheme: {' | '.join(INTENSITY_SCHEMES)}, window: [low, high], mean, std}}: ct_window needs window, "
            "ct_zscore window, mean and std > 0"
        )
    elif kind == "list":
        reference = check.get("length")
        count = _length(reference, values or {}) if reference is not None else None
        items = ITEM_WORDS.get(check.get("items"), "values")
        if count is not None:
            text = f"a list of {count} {items}"
        elif reference is not None:
            text = f"a list of {items}, as many as {reference}"
        else:
            text = f"a list of {items}"
        if "min_length" in check:
            text += f" (at least {check['min_length']})"
        if bounds:
            text += f", each {bounds}"
        if "divisible_by" in check:
            text += f", multiples of the network's total downsampling (the product of `{check['divisible_by']}`)"
    else:
        text = "any value"
    if "choices" in check:
        text = f"one of: {_names(check['choices'])}"
    if "choices_from" in check:
        names = list(catalogue) if isinstance(catalogue, Mapping) else None
        text = f"an entry of `{check['choices_from']}`" + (f": {_names(names)}" if names else "")
    if check.get("nullable"):
        text += ", or null"
    return text


# --- the check ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One setting that cannot be used: the key, the value given, what is wrong and how to fix it."""

    key: str
    value: Any
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key} = {_show(self.value)}: {self.problem}; {self.fix}"


@dataclass
class Checked:
    """The outcome of :func:`validate`: every problem, and the values converted (booleans given as text or 0/1)."""

    problems: list[Problem] = field(default_factory=list)
    converted: dict[str, Any] = field(default_factory=dict)


def _show(value: Any, limit: int = 100) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: Iterable[Any]) -> str:
    return ", ".join(str(name) for name in names)


def _as_parsed(id: str, value: Any) -> Any:
    """``value`` at ``id`` as MONAI's ``ConfigParser.parse`` rewrites it (relative ids made absolute, ``::``)."""
    if isinstance(value, str):
        return ConfigParser.resolve_relative_ids(id, value)
    if isinstance(value, Mapping):
        return {k: _as_parsed(f"{id}{ID_SEP_KEY}{k}", item) for k, item in value.items()}
    if isinstance(value, list):
        return [_as_parsed(f"{id}{ID_SEP_KEY}{i}", item) for i, item in enumerate(value)]
    return value


def _set_nested(base: Any, path: Sequence[str], value: Any) -> Any:
    """``base`` with ``value`` at ``path`` (MONAI's ``a#b#0``), or None when ``base`` has no such place."""
    node = base
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            return None
    return base


def _unknown(key: str, value: Any, known: Iterable[str], preferred: Iterable[str], listing: str) -> Problem:
    if key in ("help", "h"):
        return Problem(f"--{key}", value, "MONAI's command line reads it as a key", f"list every key with {listing}")
    close = difflib.get_close_matches(key, list(preferred), n=1) or difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return Problem(key, value, "not a key of this bundle", f"{hint}(every key: {listing})")


def _length(reference: Any, resolved: Mapping[str, Any]) -> int | None:
    """A declared ``length``: a number, a key (its value, or its length for a list), or ``KEY - N``."""
    if isinstance(reference, int):
        return reference
    match = re.fullmatch(r"\s*([a-z_]+)\s*(?:([-+])\s*(\d+))?\s*", str(reference))
    if not match or match.group(1) not in resolved:
        return None
    value = resolved[match.group(1)]
    base = len(value) if isinstance(value, list | tuple) else value if isinstance(value, int) else None
    if base is None or isinstance(base, bool):
        return None
    offset = int(match.group(3) or 0) * (-1 if match.group(2) == "-" else 1)
    return base + offset


def _downsampling(strides: Sequence[Any], axes: int) -> list[int] | None:
    """The network's total downsampling along each of ``axes`` axes: the product of the strides."""
    total = [1] * axes
    for stride in strides:
        per_axis = list(stride) if isinstance(stride, list | tuple) else [stride] * axes
        if len(per_axis) != axes:
            return None
        total = [t * s for t, s in zip(total, per_axis, strict=True)]
    return total


def _error_texts(errors: Sequence[Mapping[str, Any]]) -> str:
    """pydantic's errors of one key as one text: ``entries 0, 2 should be >= 1; window should be ...``."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for error in errors:
        message = str(error["msg"]).removeprefix("Value error, ")
        message = re.sub(r"^Input should", "should", message)
        message = message.replace("Extra inputs are not permitted", "is not a field (scheme, window, mean, std)")
        path = list(error["loc"][1:])
        entry = path.pop() if path and isinstance(path[-1], int) else None
        where = " ".join(str(part) if isinstance(part, str) else f"entry {part}" for part in path)
        grouped.setdefault((where, message), []).extend([] if entry is None else [entry])
    texts = []
    for (where, message), entries in grouped.items():
        if entries:
            where = f"{where} {'entry' if len(entries) == 1 else 'entries'} {', '.join(map(str, entries))}".strip()
        texts.append(f"{where} {message}".strip())
    return "; ".join(texts)


def _architecture_problems(resolved: Mapping[str, Any], applies: Callable[..., bool]) -> list[Problem]:
    """The network keys that do not fit the ``architecture``: a key of the other architecture set, or what MONAI's
    DynUNet cannot build (fewer than three levels, weight-standardised convolutions, even kernels)."""
    architecture = resolved.get("architecture")
    if architecture is None:
        return []
    problems = []
    for key, (owner, neutral) in ARCHITECTURE_ONLY.items():
        if architecture != owner and resolved.get(key, neutral) != neutral and applies(key, "architecture"):
            problems.append(
                Problem(
                    key,
                    resolved[key],
                    f"is built by architecture {owner} only, and the architecture is {architecture}",
                    f"set {key} to {_show(neutral)}, or architecture to {owner}",
                )
            )
    if architecture != "dynunet":
        return problems
    channels, norm, kernels = resolved.get("channels"), resolved.get("norm"), resolved.get("kernel_sizes")
    if isinstance(channels, list) and len(channels) < DYNUNET_MIN_LEVELS and applies("channels", "architecture"):
        fix = f"give at least {DYNUNET_MIN_LEVELS} channels (and strides one fewer), or architecture unet"
        problems.append(Problem("channels", channels, "has fewer levels than dynunet builds", fix))
    if isinstance(norm, str) and resolve_norm(norm)[1] and applies("norm", "architecture"):
        fix = "give group_auto (the same GroupNorm without it), or architecture unet"
        problems.append(Problem("norm", norm, "weight-standardised convolutions are built for unet only", fix))
    if isinstance(kernels, list) and applies("kernel_sizes", "architecture"):
        even = [i for i, k in enumerate(kernels) if any(n % 2 == 0 for n in (k if isinstance(k, list) else [k]))]
        if even:
            where = f"entry {even[0]} is" if len(even) == 1 else f"entries {', '.join(map(str, even))} are"
            fix = "give odd kernels (3, or 1 along a coarse axis)"
            problems.append(Problem("kernel_sizes", kernels, f"{where} even: the sizes would shift", fix))
    return problems


def validate(
    values: Mapping[str, Any], bundle: str | Path, config: str = "train", exclude: Iterable[str] = ()
) -> Checked:
    """Check ``values`` (top-level keys, or MONAI's ``a#b`` ids, to values) for ``config`` of the bundle folder
    ``bundle``: every problem, and the booleans converted. ``exclude``: keys decided elsewhere (a plan decides the
    patch), whose values in the bundle's config are not held against the keys given."""
    configs = BundleConfigs.read(bundle)
    kind = configs.kind(config)
    declared = declarations(kind)
    known = set(declared) | configs.ids() | set(TRACKING_KEYS) | {META_KEY}
    listing = f"{LISTING} {configs.root} --config {config}"
    file_values = configs.values(config)
    checked = Checked()
    problems = checked.problems

    # keys: unknown ones stop here; nested ids (intensity#window) are set into the value they change
    given: dict[str, Any] = {}
    nested = []
    for key, value in values.items():
        path = str(key).replace("::", "#").split("#")
        if path[0] not in known:
            problems.append(
                _unknown(path[0], value, known, [k for k, d in declared.items() if config in d.configs], listing)
            )
        elif len(path) == 1:
            given[path[0]] = value
        else:
            nested.append((path, value))
    uri = given.get("tracking_uri")
    if isinstance(uri, str) and not expression_ids(uri) and urlparse(uri).scheme in ("", "file"):
        if os.environ.get(FILE_STORE_OPT_IN, "").lower() not in ("true", "1"):
            problems.append(
                Problem(
                    "tracking_uri",
                    uri,
                    f"an MLflow file store, which MLflow refuses (unless {FILE_STORE_OPT_IN}=true)",
                    "give a SQLite URI such as sqlite:////abs/path/mlruns.db, or leave it out: the default is "
                    "<output_dir>/mlruns.db",
                )
            )
    for path, value in nested:
        base = copy.deepcopy(given.get(path[0], file_values.get(path[0])))
        if path[0] in declared and isinstance(base, dict | list):
            changed = _set_nested(base, path[1:], value)
            if changed is not None:
                given[path[0]] = changed

    effective = {**file_values, **given}
    resolved: dict[str, Any] = {}  # declared keys whose value is known and valid (or a literal of the bundle's file)
    to_validate: dict[str, Any] = {}
    for key, declaration in declared.items():
        if key not in effective:
            continue
        value = effective[key]
        if expression_ids(value):
            if key in given and not any(value == own for own in configs.own(key)):
                literal = next((own for own in configs.own(key) if not expression_ids(own)), None)
                problems.append(
                    Problem(
                        key,
                        value,
                        "a MONAI expression, reference or macro, not run: only the bundle's own configs may compute "
                        "this key",
                        "give a literal value" + (f" such as {_show(literal)}" if literal is not None else ""),
                    )
                )
            continue  # a value the bundle computes (num_classes from dataset.json): checked where it is used
        if value is None:
            if declaration.check.get("nullable"):
                resolved[key] = None
            elif key in given and declaration.type not in ("any",):
                problems.append(Problem(key, value, "should not be null", f"give {describe(declaration, effective)}"))
            continue
        to_validate[key] = value

    # types and ranges, every key at once (pydantic)
    spatial_dims = effective.get("spatial_dims")
    spatial_dims = spatial_dims if isinstance(spatial_dims, int) and spatial_dims in (2, 3) else None
    fields = {key: (_annotation(declared[key].check, spatial_dims), ...) for key in to_validate}
    model = create_model("Settings", __config__=STRICT, **fields)  # type: ignore[call-overload]
    errors: dict[str, list[Any]] = {}
    try:
        model.model_validate(to_validate)
    except ValidationError as err:
        for error in err.errors():
            errors.setdefault(str(error["loc"][0]), []).append(error)
    for key, value in to_validate.items():
        if key in errors:
            if key in given:
                problems.append(
                    Problem(key, value, _error_texts(errors[key]), f"give {describe(declared[key], effective)}")
                )
            continue
        converted = _boolean(value) if declared[key].type == "bool" else value
        if key in given and declared[key].type == "bool" and not isinstance(value, bool):
            checked.converted[key] = converted
        resolved[key] = converted

    # rules across keys: lengths, the patch against the strides, catalogue names
    excluded = set(exclude) - set(given)

    def applies(*keys: str) -> bool:
        return any(k in given for k in keys) and not any(k in excluded for k in keys)

    for key, declaration in declared.items():
        check, value = declaration.check, resolved.get(key)
        if key not in resolved or not isinstance(value, list):
            continue
        if "length" in check:
            reference = check["length"]
            other = re.match(r"[a-z_]+", str(reference))
            others = [other.group(0)] if other else []
            n = _length(reference, resolved)
            if n is not None and len(value) != n and applies(key, *others):
                why = "" if isinstance(reference, int) else f" ({reference} = {n})"
                fix = f"give {describe(declaration, resolved)}" + "".join(f", or change {o}" for o in others)
                problems.append(Problem(key, value, f"has {len(value)} values, needs {n}{why}", fix))
                resolved.pop(key)
                continue
        if "min_length" in check and len(value) < check["min_length"] and applies(key):
            problems.append(Problem(key, value, f"has {len(value)} values", f"give {describe(declaration, resolved)}"))
            resolved.pop(key)
    for key, declaration in declared.items():
        check = declaration.check
        if "divisible_by" in check and key in resolved and check["divisible_by"] in resolved:
            other = check["divisible_by"]
            patch, strides = resolved[key], resolved[other]
            total = _downsampling(strides, len(patch)) if isinstance(patch, list) else None
            if total and applies(key, other) and any(p % t or p < t for p, t in zip(patch, total, strict=True)):
                fit = [max(t, round(p / t) * t) for p, t in zip(patch, total, strict=True)]
                problems.append(
                    Problem(
                        key,
                        patch,
                        f"does not fit the network: its {other} {_show(strides)} downsample each axis by "
                        f"{_show(total)}, so each value must be a multiple of that (and at least it)",
                        f"give e.g. {_show(fit)}, or change {other}",
                    )
                )
        section = check.get("choices_from")
        if section and key in resolved and applies(key, section):
            catalogue = effective.get(section)
            if not isinstance(catalogue, Mapping):
                catalogue = configs.values("train").get(section)
            if isinstance(catalogue, Mapping) and resolved[key] not in catalogue:
                problems.append(
                    Problem(
                        key,
                        resolved[key],
                        f"not an entry of `{section}`",
                        f"give one of: {_names(catalogue)} (or add an entry to `{section}` in train.yaml)",
                    )
                )
    problems.extend(_architecture_problems(resolved, applies))
    order = {key: i for i, key in enumerate(declared)}  # unknown keys first, then as train.yaml lists the keys
    problems.sort(key=lambda problem: order.get(problem.key, -1))
    return checked


def check(
    values: Mapping[str, Any], bundle: str | Path, config: str = "train", exclude: Iterable[str] = ()
) -> list[Problem]:
    """Every problem of ``values`` for ``config`` of the bundle folder ``bundle`` (see :func:`validate`)."""
    return validate(values, bundle, config, exclude).problems


def report(problems: Sequence[Problem], bundle: str | Path, config: str, option: str = "") -> str:
    """The message naming every problem, one a line (``option``: where the values came from, e.g. ``--set``)."""
    count = f"{len(problems)} setting{'s' if len(problems) > 1 else ''}" + (f" of {option}" if option else "")
    head = f"{count} for {config}.yaml of the bundle {bundle} cannot be used; nothing was read or written:"
    return "\n  ".join([head, *map(str, problems)])


# --- the hook every workflow runs first ---------------------------------------------------------------------------


def check_workflow(config: str) -> None:
    """Check the running workflow's settings before any data is read (first of every bundle config's
    ``initialize``): on problems, log them and exit with all of them, no traceback; booleans given as text are
    written back as booleans. A ``plan_file`` is read as data (:mod:`custom_components.plan_file`) and its values
    replace the bundle's defaults: a key the user set otherwise (command line, a later config file) is kept."""
    workflow = running(ConfigWorkflow)  # MONAI's workflow evaluating this config
    if workflow is None:  # never skipped: a check that cannot run stops the run
        message = (
            f"the settings check of {config}.yaml found no MONAI ConfigWorkflow running the config, so it cannot "
            "read the settings; run the bundle with `python -m monai.bundle run` or monai.bundle.ConfigWorkflow (a "
            "parser built by hand checks its values with custom_components.settings.check and does not evaluate "
            "`initialize`)"
        )
        logger.error("%s", message)
        sys.exit(f"error: {message}")
    folder = workflow.config_root_path.resolve()
    root = folder.parent if folder.name == "configs" else folder
    values = workflow.parser.get()
    plan, applied = _plan_values(values, root, config)
    checked = validate({**values, **applied}, root, config)
    problems = checked.problems
    if plan is not None:
        from_plan = {id.split("#")[0] for id in applied}
        where = f" (from {PLAN_KEY} {plan.path})"
        problems = [
            *(Problem(*problem) for problem in plan.problems),
            *(
                dataclasses.replace(problem, key=problem.key + where) if problem.key in from_plan else problem
                for problem in problems
            ),
        ]
    if problems:
        message = report(problems, root, config)
        logger.error("%s", message)
        sys.exit(f"error: {message}")
    for id, value in applied.items():
        workflow.parser[id] = value
    for key, value in checked.converted.items():
        workflow.parser[key] = value


def _plan_values(values: Mapping[str, Any], bundle: Path, config: str) -> tuple[Plan | None, dict[str, Any]]:
    """The plan file that ``values`` name (None without one) and the values it sets: those of the keys the user
    left at the bundle's own value (a key set on the command line or in a later config file wins)."""
    path = values.get(PLAN_KEY)
    if path is None or expression_ids(path):
        return None, {}  # no plan; a planted expression in plan_file itself is refused by validate
    configs = BundleConfigs.read(bundle)
    settings = [key for key, d in declarations(configs.kind(config)).items() if config in d.configs]
    plan = read_plan(path, settings, f"{LISTING} {configs.root}")
    applied, kept = {}, []
    for id, value in plan.values.items():
        key = id.split("#")[0]
        if key not in values or any(values[key] == own for own in configs.own(key)):
            applied[id] = value
        else:
            kept.append(key)
    if not plan.problems:
        logger.info(
            "%s %s: %s from the plan%s",
            PLAN_KEY,
            plan.path,
            ", ".join(applied) or "no key",
            f"; {', '.join(dict.fromkeys(kept))} set otherwise (kept)" if kept else "",
        )
    return plan, applied


# --- the listing --------------------------------------------------------------------------------------------------


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, 116, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False)


def listing(bundle: str | Path, config: str = "train") -> str:
    """Every key of ``config`` of ``bundle``: its default as the bundle's config writes it, what it takes, its
    meaning; then the other top-level ids."""
    configs = BundleConfigs.read(bundle)
    file_values = configs.values(config)
    declared = declarations(configs.kind(config))
    lines = [
        f"Keys of {configs.folder / (config + '.yaml')}: set any with --KEY VALUE on the command line, as KEY: VALUE "
        "in a config merged after it, or with --set KEY=VALUE (prepare plan, kfold run).",
    ]
    section = None
    for key, declaration in declared.items():
        if key not in file_values and config not in declaration.configs:
            continue
        if declaration.section != section:
            section = declaration.section
            lines += ["", f"--- {section} ---"]
        default = flow(file_values[key]) if key in file_values else "(not in this config)"
        meaning = declaration.help.get(config) or declaration.help.get("train", "")
        catalogue = file_values.get(declaration.check.get("choices_from", ""))
        if not isinstance(catalogue, Mapping):
            catalogue = configs.values("train").get(declaration.check.get("choices_from", ""))
        takes = describe(declaration, file_values, catalogue)
        lines += [f"{key}: {default}", *_wrapped(f"takes: {takes}"), *_wrapped(meaning)]
    wiring = [key for key in file_values if key not in declared]
    lines += ["", "Other ids (the wiring; override a part with --ID#PART VALUE): " + ", ".join(wiring)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=LISTING, description="every key of a bundle: default, what it takes, meaning")
    parser.add_argument("bundle", help="bundle folder (bundles/unet3d, a copy, or a run folder)")
    parser.add_argument("--config", default="train", choices=CONFIGS, help="the workflow's config (default: train)")
    args = parser.parse_args(argv)
    folder = Path(args.bundle)
    if not (folder / "configs" / f"{args.config}.yaml").is_file() and not (folder / f"{args.config}.yaml").is_file():
        print(f"error: {folder} holds no configs/{args.config}.yaml: pass a bundle folder", file=sys.stderr)
        return 1
    print(listing(folder, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
