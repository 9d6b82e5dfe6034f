"""The files of a ``kfold select`` output folder: their names, and ``select.json`` and ``selection.json`` read as
data, every field checked (:func:`custom_components.kfold.layout.read_record`), a damaged one named with the fix.

``select.json`` holds each bundle's plan, which every fold's training takes on its command line: a value MONAI would
evaluate there is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from custom_components.bundle import expression_ids
from custom_components.kfold.layout import (
    Field,
    is_mapping,
    is_name,
    is_names,
    is_number,
    is_positive,
    is_text,
    is_whole,
    optional,
    read_record,
)

SELECT_STATE = "select.json"  # the options of the selection and each bundle's plan (data: read back as --set values)
SELECTION_FILE = "selection.json"
NOT_A_SELECTION = "pass the --output folder of `python -m custom_components.kfold select`"
# What restores a damaged file of a selection folder: the same `kfold select` command writes it again.
SELECT_AGAIN = "start the same `python -m custom_components.kfold select` command again"
SELECT_FIX = f"delete it and {SELECT_AGAIN}: the bundles are planned anew (or select into a new --output)"
BUNDLE_FIX = f"delete it and {SELECT_AGAIN}: it is written again; finished folds are kept"
SELECT_SPLITS_FIX = f"delete it and {SELECT_AGAIN}: it is made again, as before, from dataset.json and --seed"


def _bundle_names(value: Any) -> bool:
    return (
        isinstance(value, dict) and bool(value) and all(is_name(key) and is_text(path) for key, path in value.items())
    )


def _plans(value: Any) -> bool:
    return isinstance(value, dict) and all(is_name(key) and is_mapping(plan) for key, plan in value.items())


def _configurations(value: Any) -> bool:
    return isinstance(value, dict) and all(
        is_name(key) and is_mapping(c) and is_names(c.get("members")) for key, c in value.items()
    )


# each bundle's plan, held by select.json (handed to its folds) and selection.json (read by `kfold predict`)
PLANS_FIELD: Field = ("an object of bundle names to their planned keys", _plans)
# select.json: the selection's options (compared on a restart) and each bundle's plan
SELECT_FIELDS: dict[str, Field] = {
    "bundles": ("an object of bundle names to folders", _bundle_names),
    "dataset_dir": ("a folder path", is_text),
    "folds": ("a number of folds", is_positive),
    "seed": ("a whole number", is_whole),
    "overrides": ("an object of --set keys", is_mapping),
    "time_budget_min": ("minutes or null", optional(is_number)),
    "memory_gb": ("gigabytes", is_number),
    "plans": PLANS_FIELD,
}
# selection.json: what `kfold predict` reads of it
SELECTION_FIELDS: dict[str, Field] = {
    "winner": ("a configuration name", is_name),
    "ranking": ("a list of configuration names", is_names),
    "configurations": ("an object of configuration names to their members", _configurations),
    "plans": PLANS_FIELD,
}


def _literal_plans(state: dict[str, Any]) -> list[str]:
    """A plan holds the literal values ``prepare plan`` chose; each fold's command line gets them, and MONAI would run
    an expression, reference or macro there as code."""
    return [
        f"plans#{id} is a MONAI expression, reference or macro ($, @ or % first), which the folds' training would run "
        "as code; a plan holds literal values only"
        for id in expression_ids(state["plans"])
    ]


def _members_planned(selection: dict[str, Any]) -> list[str]:
    """Each configuration's members are planned bundles (folders of the selection), and the winner is one of them."""
    problems = [
        f"configurations#{configuration}#members names {member}, which has no plan"
        for configuration, entry in selection["configurations"].items()
        for member in entry["members"]
        if member not in selection["plans"]
    ]
    if selection["winner"] not in selection["configurations"]:
        problems.append(f"winner {selection['winner']} is not one of its configurations")
    return problems


def read_select_state(output: Path, missing: str = NOT_A_SELECTION) -> dict[str, Any]:
    """The selection's ``select.json``, its fields checked and its plans literal (:data:`SELECT_FIELDS`)."""
    return read_record(output / SELECT_STATE, SELECT_FIELDS, missing, SELECT_FIX, [_literal_plans])


def read_selection(output: Path) -> dict[str, Any]:
    """The selection's ``selection.json`` as ``kfold predict`` reads it, its fields checked."""
    rewrite = f"run `python -m custom_components.kfold report {output}` to write it again from the folds"
    missing = "run `python -m custom_components.kfold select` to the end first"
    return read_record(output / SELECTION_FILE, SELECTION_FIELDS, missing, rewrite, [_members_planned])
