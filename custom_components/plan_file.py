"""A plan file read as data: ``--plan_file plan_3d.yaml`` (``prepare plan``), a sweep's ``best.yaml``, or any YAML
mapping of a bundle's settings.

A config file given to ``--config_file`` is code: MONAI evaluates its ``$`` expressions and builds its
``_target_`` components. A plan file is not merged so. It is loaded with a safe YAML loader and may hold only
settings the bundle declares (``patch_size``, or a part of one such as ``intensity#window``) with literal values; a
value MONAI would evaluate (``$``, ``@``, ``%`` first), a wiring id (``train#trainer#max_epochs``, ``initialize``)
or anything else is a problem named with the file and the fix. :func:`custom_components.settings.check_workflow`
then sets the plan's values in place of the bundle's defaults, keeps every key the user set otherwise, and checks
them with every other setting.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from custom_components.bundle import expression_ids, load_value_yaml

PLAN_KEY = "plan_file"  # the setting that names the plan file


@dataclass
class Plan:
    """What a plan file gives: its settings (MONAI ids to literal values) and every problem, as
    ``(id, value, problem, fix)``."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[str, Any, str, str]] = field(default_factory=list)


def read_plan(path: str | Path, settings: Collection[str], listing: str) -> Plan:
    """The plan file at ``path`` as data: its top-level ids whose first part is one of ``settings`` (the keys the
    bundle's config declares), with literal values; every other entry is a problem (``listing``: the command that
    lists the settings)."""
    plan = Plan(Path(path))
    where = f"{PLAN_KEY} {plan.path}"
    fix = "pass the plan_3d.yaml or plan_2d.yaml that `prepare plan` wrote, a sweep's best.yaml, or plan_file null"
    try:
        content = load_value_yaml(plan.path.read_text())
    except FileNotFoundError:
        plan.problems.append((where, str(path), "does not exist", fix))
        return plan
    except (OSError, UnicodeDecodeError) as err:
        plan.problems.append((where, str(path), f"cannot be read ({err})", fix))
        return plan
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        plan.problems.append((where, str(path), f"is not YAML ({problem})", "fix the syntax, or " + fix))
        return plan
    if content is None:
        return plan  # an empty plan changes nothing
    if not isinstance(content, dict):
        plan.problems.append((where, str(path), "does not hold a mapping of settings to values", fix))
        return plan
    for key, value in content.items():
        id = str(key).replace("::", "#")
        root = id.split("#")[0]
        if root not in settings or root == PLAN_KEY:
            plan.problems.append(
                (
                    f"{id} (in {where})",
                    value,
                    "is not a setting of this bundle: a plan file holds settings only, read as data",
                    "remove it; wiring belongs in a config file given to --config_file, which is code (every "
                    f"setting: {listing})",
                )
            )
            continue
        planted = expression_ids(value, id)
        if planted:
            plan.problems.append(
                (
                    f"{id} (in {where})",
                    value,
                    f"{', '.join(planted)} would be run by MONAI's parser (a $ expression, @ reference or % macro): a "
                    "plan file is data",
                    "give a literal value",
                )
            )
            continue
        plan.values[id] = value
    return plan
