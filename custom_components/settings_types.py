"""What each declared key takes, as pydantic types built from its ``check`` declaration, and in words.

:func:`annotation` gives the type :func:`custom_components.settings.validate` checks a value against; :func:`describe`
says what a key takes in the messages and the listing.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal

import torch
from monai.networks.layers.factories import Norm
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    Strict,
    model_validator,
)
from pydantic_core import PydanticCustomError

from custom_components.norms import NORM_CHOICES
from custom_components.settings_declarations import Declaration
from custom_components.transforms import INTENSITY_SCHEMES

BOOLEANS = {"true": True, "True": True, "1": True, "false": False, "False": False, "0": False}
STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)


def show(value: Any, limit: int = 100) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def names_text(names: Iterable[Any]) -> str:
    return ", ".join(str(name) for name in names)


def list_length(reference: Any, resolved: Mapping[str, Any]) -> int | None:
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


# --- what a key takes: pydantic types built from the declarations ------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bounds_text(check: Mapping[str, Any]) -> str:
    signs = (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<"))
    text = " and ".join(f"{sign} {show(check[name])}" for name, sign in signs if name in check)
    if check.get("allow"):
        text += f" (or {', '.join(map(show, check['allow']))})"
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
            raise PydanticCustomError("choice", "should be one of: {names}", {"names": names_text(check["choices"])})
        return value

    return validate


def boolean(value: Any) -> Any:
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


def annotation(check: Mapping[str, Any], spatial_dims: int | None) -> Any:
    """The pydantic type of a declared key (null is handled before)."""
    kind = check.get("type", "any")
    bounded = AfterValidator(_bounded(check))
    if kind in ITEM_TYPES:
        return Annotated[ITEM_TYPES[kind], bounded]
    if kind == "bool":
        return Annotated[bool, BeforeValidator(boolean)]
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
        text = (
            f'one of {names_text(norm_names())}, or a MONAI norm with arguments such as ["group", {{"num_groups": 4}}]'
        )
    elif kind == "intensity":
        text = (
            f"{{scheme: {' | '.join(INTENSITY_SCHEMES)}, window: [low, high], mean, std}}: ct_window needs window, "
            "ct_zscore window, mean and std > 0"
        )
    elif kind == "list":
        reference = check.get("length")
        count = list_length(reference, values or {}) if reference is not None else None
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
        text = f"one of: {names_text(check['choices'])}"
    if "choices_from" in check:
        names = list(catalogue) if isinstance(catalogue, Mapping) else None
        text = f"an entry of `{check['choices_from']}`" + (f": {names_text(names)}" if names else "")
    if check.get("nullable"):
        text += ", or null"
    return text
