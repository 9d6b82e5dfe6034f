"""A bundle folder as code sees it: where it is, and the ``python -m monai.bundle`` command that runs it.

A bundle's configs name files inside it relative to ``bundle_root`` (as in the model zoo). MONAI resolves no
``bundle_root`` by itself, so the configs set it to :func:`bundle_root`, which finds the folder of the config file
that MONAI's entry point was given: a bundle runs from any working directory and copied alone.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import yaml
from monai.bundle import ConfigWorkflow

T = TypeVar("T")
CONFIG_FILE_ARGUMENTS = ("config_file", "config_file_")  # names of the config file in MONAI's bundle functions


class BundleRootError(RuntimeError):
    """``bundle_root`` could not be found: the config was parsed outside MONAI's bundle entry points."""


def _config_folder(config_file: str | Sequence[str]) -> Path:
    first = config_file if isinstance(config_file, str) else config_file[0]
    if isinstance(first, str) and first.startswith("["):  # the command line's "['a.yaml','b.yaml']"
        first = first.strip("[]").split(",")[0].strip().strip("'\"")
    return Path(first).resolve().parent


def _frame_config_folder(frame: FrameType) -> Path | None:
    """The config folder a frame of MONAI's bundle code works on, if it is one of those frames."""
    owner = frame.f_locals.get("self")
    if isinstance(owner, ConfigWorkflow):
        return owner.config_root_path.resolve()
    if frame.f_globals.get("__name__", "").startswith("monai.bundle"):
        for name in CONFIG_FILE_ARGUMENTS:
            config_file = frame.f_locals.get(name)
            if isinstance(config_file, str | list | tuple) and config_file:
                return _config_folder(config_file)
    return None


def running(kind: type[T]) -> T | None:
    """The nearest object of ``kind`` whose method is on the call stack (MONAI's ``ConfigWorkflow`` or
    ``ConfigParser`` evaluating the calling config expression), or None."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            return owner
        frame = frame.f_back
    return None


def bundle_root() -> str:
    """The folder of the bundle being run: the parent of the ``configs/`` folder holding the first config file.

    Found from the call stack: MONAI's ``ConfigWorkflow`` (``run``, ``check_properties``) keeps the config folder,
    and ``verify_net_in_out`` / ``ckpt_export`` hold the ``config_file`` they were given. A parser built by hand
    must set ``bundle_root`` itself (``parser["bundle_root"] = ...``).
    """
    frame = inspect.currentframe()
    while frame is not None:
        folder = _frame_config_folder(frame)
        if folder is not None:
            return str(folder.parent if folder.name == "configs" else folder)
        frame = frame.f_back
    raise BundleRootError(
        "bundle_root: no MONAI bundle command is running this config, so its folder is unknown; pass "
        "--bundle_root BUNDLE_FOLDER (or set parser['bundle_root'] when parsing the config yourself)"
    )


def config_file_argument(configs: Sequence[str | Path]) -> str:
    """``--config_file`` as the command line takes it: one path, or a list that MONAI merges in order."""
    paths = [str(path) for path in configs]
    return paths[0] if len(paths) == 1 else json.dumps(paths, separators=(",", ":"))  # fire reads it as a list


def bundle_command(run_id: str, configs: Sequence[str | Path], overrides: Mapping[str, object] = ()) -> list[str]:
    """The user's ``python -m monai.bundle run RUN_ID --config_file ... --key value`` as an argument list.

    A ``str`` value is passed as written, as a user types it (fire reads ``"[16,32]"`` as a list, ``"True"`` as a
    bool); any other value (number, bool, None, list, dict, path) as :func:`command_line_value` writes it, so that
    the bundle receives that very value.
    """
    args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file_argument(configs)]
    for key, value in dict(overrides).items():
        args += [f"--{key}", value if isinstance(value, str) else command_line_value(value)]
    return args


MONAI_SIGILS = ("$", "@", "%")  # a config string starting so is an expression, a reference or a macro


def expression_ids(value: Any, id: str = "") -> list[str]:
    """The ids (``key#part#0``, under ``id``) of the strings in ``value`` that MONAI's config parser would evaluate,
    read as a reference or expand as a macro: those starting with ``$``, ``@`` or ``%``, at any depth."""
    if isinstance(value, str):
        return [id] if value[:1] in MONAI_SIGILS else []
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return []
    return [hit for key, item in items for hit in expression_ids(item, f"{id}#{key}" if id else str(key))]


class KeyValueError(ValueError):
    """A ``KEY=VALUE`` pair that cannot be used: no ``=``, a value that is not YAML, or a key the caller sets."""


class _ValueLoader(yaml.SafeLoader):
    """YAML as the configs are read, except that ``1e-3`` is a float (as in YAML 1.2 and on MONAI's command line),
    a bare ``None`` is null (as MONAI's command line reads it) and a date stays text."""


_ValueLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ValueLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)
_ValueLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])


def load_value_yaml(text: str) -> Any:
    """YAML text as data, read as ``--set`` values are (a safe loader; ``1e-3`` a float, ``None`` null)."""
    return yaml.load(text, Loader=_ValueLoader)  # noqa: S506 (a SafeLoader)


def parse_key_values(
    pairs: Iterable[str] | None, refused: Mapping[str, str] | None = None, option: str = "--set"
) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--set`` of ``kfold run`` and ``prepare plan``) as a dict of bundle keys to values.

    The value is read as YAML, as in a config file: ``channels=[16,32,64]`` is a list, ``norm=batch`` a string,
    ``amp=false`` a bool, ``class_weights=null`` (or ``None``) None, ``learning_rate=1e-3`` a float; quote it to
    keep it text (``name='1.0'``). A value starting with ``$``, ``@`` or ``%`` (MONAI's expression, reference and
    macro) is kept as text, as MONAI's command line passes it. A key may be nested (``intensity#window=[864,1264]``).
    ``refused`` maps the keys the caller sets itself to the fix named in the error. Pass the values on to a
    ``monai.bundle`` command with :func:`command_line_value`, which writes each so that the bundle gets it back.
    """
    values: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, text = pair.partition("=")
        key = key.strip()
        if not separator or not key:
            raise KeyValueError(f"{option} {pair!r}: write KEY=VALUE, e.g. {option} channels=[16,32,64]")
        if refused and key in refused:
            raise KeyValueError(f"{option} {key}: {refused[key]}")
        if text.lstrip()[:1] in MONAI_SIGILS:  # not YAML unquoted; the bundle reads it as MONAI does
            values[key] = text.strip()
            continue
        try:
            values[key] = load_value_yaml(text)
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise KeyValueError(
                f"{option} {pair!r}: {text!r} is not a YAML value ({problem}); quote it, e.g. {key}='{text}'"
            ) from err
    return values


def command_line_value(value: Any) -> str:
    """``value`` written as a ``--key`` argument of ``python -m monai.bundle run`` that fire parses back to it.

    A string fire reads back as that string is written as is (``batch``, a path); any other string is quoted (fire
    reads ``True``, ``1.0`` or ``a#b`` unquoted as something else). Numbers, bools, None, lists and dicts are
    Python literals (infinities ``1e999``); NaN has no such form and is refused.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and not value.startswith("-") and _fire_reads(value) == (str, value):
        return value
    return _literal(value)


def _fire_reads(text: str) -> tuple[type, Any]:
    """What fire (MONAI's command line) makes of ``text`` given as a ``--key`` value, with its type."""
    from fire.parser import DefaultParseValue  # MONAI's bundle command line is built on fire

    value = DefaultParseValue(text)
    return type(value), value


def _literal(value: Any) -> str:
    """``value`` as a Python literal fire's parser evaluates back to it."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if value is None or isinstance(value, bool | str):
        return repr(value)
    if isinstance(value, numbers.Integral):
        return repr(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            raise KeyValueError("NaN cannot be passed on the command line: give a number")
        return repr(number) if math.isfinite(number) else ("1e999" if number > 0 else "-1e999")
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_literal(key)}: {_literal(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    raise KeyValueError(f"{value!r} ({type(value).__name__}) cannot be passed on the command line")


def changed_options(
    previous: Mapping[str, Any],
    now: Mapping[str, Any],
    keys: Iterable[str],
    describe: Callable[[str, Any], str],
    label: Callable[[str], str] = lambda key: "",
) -> list[str]:
    """``label(key)describe(key, recorded) (now describe(key, given))`` for each of ``keys`` whose value a run folder
    or study recorded differs from the one given now: what a resumed ``kfold run`` or ``sweep run`` names when it
    refuses to go on."""
    return [
        f"{label(key)}{describe(key, previous.get(key))} (now {describe(key, now[key])})"
        for key in keys
        if previous.get(key) != now[key]
    ]
