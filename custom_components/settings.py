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
  ``optimizer``, ``lr_scheduler``, the ``intensity`` scheme) are among the known ones, ``resolution: coarse`` has a
  plan to choose its spacing (``plan: auto``) or a ``spacing`` and ``patch_size`` set;
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
import logging
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from monai.bundle import DEFAULT_MLFLOW_SETTINGS, ConfigWorkflow
from pydantic import (
    ValidationError,
    create_model,
)

from custom_components.bundle import expression_ids, running
from custom_components.config_text import flow
from custom_components.networks import total_downsampling
from custom_components.plan_file import PLAN_KEY, Plan, read_plan
from custom_components.settings_declarations import CONFIGS, BundleConfigs, bundle_kinds, declarations
from custom_components.settings_rules import (
    Problem,
    architecture_problems,
    resolution_problems,
    stage_input_problems,
    stage_problems,
)
from custom_components.settings_types import STRICT, annotation, boolean, describe, list_length, names_text, show

logger = logging.getLogger(__name__)

# Top-level keys MONAI's `--tracking mlflow` adds to a config (its settings' configs that are not handlers), and the
# metadata's key
TRACKING_KEYS = tuple(
    key for key in DEFAULT_MLFLOW_SETTINGS["configs"] if key not in DEFAULT_MLFLOW_SETTINGS["handlers_id"]
)
META_KEY = "_meta_"
# MLflow opens no file store (a file:// URI or a path) unless this variable is true: a tracking_uri so stops the run
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
LISTING = "python -m custom_components.settings"
YAML_WORDS = {False: "off", True: "on"}  # what YAML 1.1 (PyYAML, MONAI's parser) turns these words into


# --- the check ----------------------------------------------------------------------------------------------------


@dataclass
class Checked:
    """The outcome of :func:`validate`: every problem, and the values converted (booleans given as text or 0/1)."""

    problems: list[Problem] = field(default_factory=list)
    converted: dict[str, Any] = field(default_factory=dict)


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
    owners = [kind for kind in bundle_kinds() if key in declarations(kind)]
    if owners:  # declared for another bundle alone (the cascade's keys are the 3D bundle's)
        owner = " and ".join(f"bundles/{kind}" for kind in owners)
        return Problem(key, value, f"a key of {owner} only", f"train with {owner}, or leave the key out")
    close = difflib.get_close_matches(key, list(preferred), n=1) or difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return Problem(key, value, "not a key of this bundle", f"{hint}(every key: {listing})")


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
                        "give a literal value" + (f" such as {show(literal)}" if literal is not None else ""),
                    )
                )
            continue  # a value the bundle computes (num_classes from dataset.json): checked where it is used
        if value is None:
            if declaration.check.get("nullable"):
                resolved[key] = None
            elif key in given and declaration.type not in ("any",):
                problems.append(Problem(key, value, "should not be null", f"give {describe(declaration, effective)}"))
            continue
        word = YAML_WORDS.get(value) if isinstance(value, bool) and declaration.type == "str" else None
        if word in declaration.check.get("choices", ()):  # YAML reads `off` as false: `--set plan=off` means "off"
            value = word
            if key in given:
                checked.converted[key] = word
        to_validate[key] = value

    # types and ranges, every key at once (pydantic)
    spatial_dims = effective.get("spatial_dims")
    spatial_dims = spatial_dims if isinstance(spatial_dims, int) and spatial_dims in (2, 3) else None
    fields = {key: (annotation(declared[key].check, spatial_dims), ...) for key in to_validate}
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
        converted = boolean(value) if declared[key].type == "bool" else value
        if key in given and declared[key].type == "bool" and not isinstance(value, bool):
            checked.converted[key] = converted
        resolved[key] = converted

    # rules across keys: lengths, the patch against the strides, catalogue names, the architecture's and the
    # resolution's keys
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
            n = list_length(reference, resolved)
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
            total = total_downsampling(strides, len(patch)) if isinstance(patch, list) else None
            if total and applies(key, other) and any(p % t or p < t for p, t in zip(patch, total, strict=True)):
                fit = [max(t, round(p / t) * t) for p, t in zip(patch, total, strict=True)]
                problems.append(
                    Problem(
                        key,
                        patch,
                        f"does not fit the network: its {other} {show(strides)} downsample each axis by "
                        f"{show(total)}, so each value must be a multiple of that (and at least it)",
                        f"give e.g. {show(fit)}, or change {other}",
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
                        f"give one of: {names_text(catalogue)} (or add an entry to `{section}` in train.yaml)",
                    )
                )
    problems.extend(architecture_problems(resolved, applies))
    problems.extend(resolution_problems(resolved, configs, excluded))
    problems.extend(stage_input_problems(resolved, configs, applies))
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
    problems += stage_problems({**values, **applied, **checked.converted}, config)
    if problems:
        message = report(problems, root, config)
        logger.error("%s", message)
        sys.exit(f"error: {message}")
    if config == "train":  # `plan: auto` fits the planned keys still at the bundle's defaults
        from custom_components.auto_plan import PLAN_MODE_KEY, PLANNED_ID, AutoPlanError, planned_values
        from custom_components.data import DatasetError

        try:
            device = functools.partial(workflow.parser.get_parsed_content, "device")
            from_file = {id.split("#")[0] for id in applied}  # a plan file's keys are set, even at a default
            planned = planned_values({**values, **applied, **checked.converted}, root, device, from_file)
        except (AutoPlanError, DatasetError) as err:
            logger.error("%s", err)
            sys.exit(f"error: {err}")
        problems = validate({**values, **applied, **checked.converted, **planned}, root, config).problems
        if problems:  # a plan's values are the bundle's own kind: a problem here is a bug, named as such
            message = report(problems, root, config, f"{PLAN_MODE_KEY} auto's plan")
            logger.error("%s", message)
            sys.exit(f"error: {message}")
        applied.update(planned)
        workflow.parser[PLANNED_ID] = planned
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
