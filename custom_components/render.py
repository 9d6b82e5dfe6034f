"""Render the bundles from their one template: ``python -m custom_components.render [--check]``.

What the 2D and 3D bundles share is written once: ``custom_components/settings.yaml`` declares every key a user
sets (default, meaning, which configs use it, what it takes; shipped with the package, which checks the keys when a
run starts) and ``bundles/template/configs/*.j2`` the wiring, with ``{% if dims == 2 %}`` where the bundles differ.
Rendering writes complete, self-contained configs into each bundle's ``configs/``, as MONAI's Auto3DSeg fills its
algorithm templates, so a bundle runs from any folder and copied alone. ``--check``
(run by the tests) fails when a committed config differs from a fresh render.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from custom_components.config_text import flow
from custom_components.paths import REPO_ROOT
from custom_components.settings_declarations import CONFIGS, DECLARATIONS, declared_field

TEMPLATE = REPO_ROOT / "bundles" / "template"
BUNDLES = {"unet3d": 3, "unet2d": 2}  # bundle folder -> spatial dimensions
LINE_LENGTH = 120


@dataclass(frozen=True)
class Setting:
    """One user key as one bundle's config declares it."""

    key: str
    section: str
    value: Any
    help: str
    frozen: bool | str  # True: every run config; "train": the run's training configs only; False: never
    path: bool
    source: str  # the training key whose value a run folder writes here (the key itself, or its `from`)

    def line(self) -> str:
        """``key: value  # help``, the help above the key when the line would be too long."""
        text = f"{self.key}: {flow(self.value)}"
        if len(text) + len(self.help) + 4 <= LINE_LENGTH:
            return f"{text}  # {self.help}"
        comment = textwrap.wrap(self.help, LINE_LENGTH - 2)
        return "\n".join([*(f"# {line}" for line in comment), text])


def load_settings(bundle: str, config: str) -> list[Setting]:
    """The keys of ``settings.yaml`` that ``config`` of ``bundle`` uses, in declaration order."""
    declared = yaml.safe_load(DECLARATIONS.read_text())
    settings = []
    for section, entries in declared.items():
        for key, entry in entries.items():
            if bundle not in entry.get("bundles", BUNDLES) or config not in entry.get("configs", ["train"]):
                continue
            settings.append(
                Setting(
                    key=key,
                    section=section,
                    value=declared_field(entry, bundle, config, "default"),
                    help=" ".join(str(declared_field(entry, bundle, config, "help", "")).split()),
                    frozen=entry.get("frozen", True),
                    path=bool(entry.get("path", False)),
                    source=entry.get("from", key),
                )
            )
    return settings


class Renderer:
    """Jinja2 over ``bundles/template/configs`` for one bundle; templates call ``settings(...)`` for key blocks."""

    def __init__(self, bundle: str) -> None:
        self.bundle = bundle
        self.dims = BUNDLES[bundle]
        self.environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATE),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )

    def settings(self, config: str, *sections: str) -> str:
        """The key lines of ``sections`` (all when none) for ``config``, each section under a ruled heading."""
        chosen = [s for s in load_settings(self.bundle, config) if not sections or s.section in sections]
        blocks = []
        for section in dict.fromkeys(s.section for s in chosen):
            heading = f"# --- {section} "
            lines = [s.line() for s in chosen if s.section == section]
            blocks.append("\n".join([heading + "-" * (LINE_LENGTH - len(heading)), *lines]))
        return "\n\n".join(blocks)

    def path_settings(self) -> list[str]:
        """Keys written as absolute paths into a run folder."""
        return sorted({s.key for config in CONFIGS for s in load_settings(self.bundle, config) if s.path})

    def render(self, name: str) -> str:
        template = self.environment.get_template(f"configs/{name}.j2")
        return template.render(
            bundle=self.bundle,
            dims=self.dims,
            settings=self.settings,
            path_settings=self.path_settings,
            flow=flow,
        )


def rendered_files() -> Iterator[tuple[Path, str]]:
    """Every file the template writes: (path in the repository, content)."""
    for bundle in BUNDLES:
        renderer = Renderer(bundle)
        for template in sorted((TEMPLATE / "configs").glob("*.j2")):
            name = template.name.removesuffix(".j2")
            yield REPO_ROOT / "bundles" / bundle / "configs" / name, renderer.render(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom_components.render", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed config differs from a render")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered_files():
        if path.is_file() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path.relative_to(REPO_ROOT))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    if stale:
        print(
            "these configs differ from bundles/template: edit the template and run `make render`\n  "
            + "\n  ".join(map(str, stale)),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
