"""A bundle's config files as text: values on one YAML line, and the user keys above the ``# Wiring:`` line.

The rendered configs hold every user key at the top, one entry each with its comment, and what the keys build
below ``# Wiring:``. A run folder's configs are the source configs with those entries set to the values the run
used (:func:`freeze`), so that they read as the source does; the report and the resume check read them back
(:func:`user_keys`, :func:`user_text`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][\w]*):")
WIRING = "# Wiring:"  # the rendered configs' user keys stand above this line, what they build below it


def flow(value: Any) -> str:
    """A value on one YAML line: expressions and references double-quoted, lists and mappings in flow style."""
    if isinstance(value, str) and value[:1] in "$@%":
        return json.dumps(value)
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n...\n").strip()


def plain(value: Any) -> Any:
    """A resolved config value as plain YAML data: tuples as lists, numpy and torch scalars as numbers."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, np.generic | torch.Tensor):
        return plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{type(value).__name__} is not plain data")


def _entries(lines: Sequence[str]) -> list[tuple[str, int, int]]:
    """Top-level entries of a YAML text: (key, first line, end line), the block being the indented lines after it."""
    entries = []
    for index, line in enumerate(lines):
        match = TOP_LEVEL_KEY.match(line)
        if match:
            end = index + 1
            while end < len(lines) and lines[end][:1] in (" ", "-"):
                end += 1
            entries.append((match.group(1), index, end))
    return entries


def _comment(line: str) -> str:
    """The trailing ``# comment`` of a one-line ``key: value`` entry, or ''."""
    try:
        (_, value), *_ = yaml.compose(line).value
    except (yaml.YAMLError, ValueError, AttributeError):
        return ""
    rest = line[value.end_mark.column :].strip()
    return rest if rest.startswith("#") else ""


def freeze(text: str, values: Mapping[str, Any]) -> str:
    """``text`` (a config) with each of its user keys found in ``values`` set to that value on one line, its comment
    kept. User keys are the top-level keys above the ``# Wiring:`` line (all of them in a file without one)."""
    lines = text.splitlines()
    wiring = _wiring_line(lines)
    for key, start, end in reversed(_entries(lines)):
        if key in values and start < wiring:
            comment = _comment(lines[start]) if end == start + 1 else ""
            lines[start:end] = [f"{key}: {flow(values[key])}" + (f"  {comment}" if comment else "")]
    return "\n".join(lines) + "\n"


def _wiring_line(lines: Sequence[str]) -> int:
    """The index of the ``# Wiring:`` line (the end of the text without one)."""
    return next((index for index, line in enumerate(lines) if line.startswith(WIRING)), len(lines))


def user_text(text: str) -> str:
    """The part of a config that holds its user keys: the lines above ``# Wiring:``."""
    lines = text.splitlines()
    return "\n".join(lines[: _wiring_line(lines)])


def user_keys(text: str) -> list[str]:
    """The user keys of a config: its top-level keys above the ``# Wiring:`` line."""
    lines = text.splitlines()
    wiring = _wiring_line(lines)
    return [key for key, start, _ in _entries(lines) if start < wiring]
