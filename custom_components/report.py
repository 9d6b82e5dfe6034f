"""One self-contained report page, ``report.html``, of a training run folder, a K-fold output folder or a sweep.

    python -m custom_components.report RUN_DIR [--output FILE]

The page opens from disk with no server and no network: its images are embedded PNGs (``data:`` addresses), its
style and its script (sorting the per-case table) are inline. It shows the headline scores, the learning curves,
per-class and per-case metrics, the best, median and worst case drawn over their image, the settings and the
environment. What is not there yet (no evaluation, no predictions) is said on the page. Nothing read is executed:
configs are parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from custom_components.config_text import flow
from custom_components.kfold.layout import (
    METADATA_FILE,
)
from custom_components.report_figures import chosen_cases, plot_case, plot_curves
from custom_components.report_sources import METRICS, TRAIN_CONFIG, ReportError, Source, read_source, shown
from custom_components.run_files import atomic_write_bytes

REPORT_FILE = "report.html"
PACKAGES = ("torch", "monai", "numpy")  # versions in the environment section, besides Python's

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1.5rem 3rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
nav a { margin-right: 1rem; } .subtitle { color: #555; margin-top: 0; }
.notes { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5rem 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f3f3f3; }
table.sortable th button { all: unset; cursor: pointer; } table.sortable th button:focus { outline: 2px solid #48c; }
table.sortable th[aria-sort="ascending"] button::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"] button::after { content: " \\25BC"; }
img { max-width: 100%; height: auto; } figure { margin: 1rem 0; } figcaption { color: #555; font-size: 0.9rem; }
code { word-break: break-all; }
"""

# Sorts a table.sortable by the clicked column: numbers by value, text by natural order, empty cells last both ways.
SCRIPT = """
"use strict";
function sortRows(table, column, numeric, ascending) {
  const body = table.tBodies[0];
  const key = (row) => {
    const value = row.cells[column].dataset.value;
    if (value === "") return null;
    return numeric ? Number(value) : value;
  };
  const sign = ascending ? 1 : -1;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    if (numeric) return x < y ? -sign : x > y ? sign : 0;
    return sign * x.localeCompare(y, undefined, {numeric: true});
  });
  for (const row of rows) body.appendChild(row);
}
for (const table of document.querySelectorAll("table.sortable")) {
  const headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach((header, column) => {
    header.addEventListener("click", () => {
      const ascending = header.getAttribute("aria-sort") !== "ascending";
      for (const other of headers) other.removeAttribute("aria-sort");
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      sortRows(table, column, header.dataset.type === "number", ascending);
    });
  });
}
"""


def _e(value: Any) -> str:
    """``value`` as HTML text, every special character escaped (quotes too, for attributes)."""
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    """A number the sort can order (NaN, "not defined", sorts as missing)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _cell(value: Any, digits: int | None) -> str:
    """A table cell: numbers right-aligned with their full value in ``data-value`` (what the sort reads)."""
    if digits is None:
        return f'<td data-value="{_e("" if value is None else value)}">{_e(shown(value))}</td>'
    key = json.dumps(float(value)) if _is_number(value) else ""  # Infinity, as JavaScript's Number() reads it
    return f'<td class="number" data-value="{_e(key)}">{_e(shown(value, digits))}</td>'


def _table(columns: Sequence[tuple[str, int | None]], rows: Sequence[Sequence[Any]], sortable: bool = False) -> str:
    """A table of ``rows``; ``columns`` are (title, digits), digits None for text. A sortable table's headers are
    buttons that sort it (see SCRIPT)."""
    header = []
    for title, digits in columns:
        kind = "text" if digits is None else "number"
        label = f'<button type="button">{_e(title)}</button>' if sortable else _e(title)
        header.append(f'<th scope="col" data-type="{kind}">{label}</th>')
    body = ["<tr>" + "".join(_cell(v, d) for v, (_, d) in zip(row, columns, strict=True)) + "</tr>" for row in rows]
    attribute = ' class="sortable"' if sortable else ""
    return f"<table{attribute}><thead><tr>{''.join(header)}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _key_values(rows: Sequence[tuple[str, Any]], formatter: Any = str) -> str:
    """A two-column table of (key, value) rows, values written by ``formatter``."""
    return _table([("key", None), ("value", None)], [(key, formatter(value)) for key, value in rows])


def _image(png: bytes, alt: str) -> str:
    """A PNG embedded in the page itself, so that it opens from disk with nothing beside it."""
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_e(alt)}">'


def _section(anchor: str, title: str, body: str) -> str:
    """A section of the page, its ``anchor`` the target of the navigation links."""
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    """A highlighted paragraph: what is missing and how to get it."""
    return f'<p class="notes">{_e(text)}</p>'


def headline_section(source: Source) -> str:
    """Mean Dice over all classes, then each metric's mean per class, and where the numbers come from."""
    rows = []
    for metric, title, digits in METRICS:
        if metric in source.headline:
            values = [source.headline[metric].get(name) for name in source.class_names]
            overall = source.mean_dice if metric == "dice" else None
            rows.append([title, *(shown(value, digits) for value in (overall, *values))])
    if not rows:
        return _note("no scores yet: the run has not validated")
    columns = [("metric", None), ("all classes", None), *((name, None) for name in source.class_names)]
    return _table(columns, rows) + f"<p>{_e(source.headline_note)}</p>"


def per_class_section(source: Source) -> str:
    """Mean, median and SD over cases of every metric and class the evaluation holds."""
    rows = [
        [title, name, *(stats.get(key) for key in ("mean", "median", "sd")), stats.get("n")]
        for metric, title, _ in METRICS
        for name, stats in source.summary.get(metric, {}).items()
    ]
    if not rows:
        return _note("no per-class metrics: nothing was evaluated yet")
    columns = [("metric", None), ("class", None), ("mean", 3), ("median", 3), ("SD", 3), ("cases", None)]
    caption = "<p>Over cases; <em>cases</em> counts those with a value. SD: the sample standard deviation.</p>"
    return _table(columns, rows) + caption


def case_columns(source: Source) -> list[tuple[str, str, str | None, int | None]]:
    """The per-case table's columns: (title, key in a case's row, class or None, digits or None for text)."""
    columns: list[tuple[str, str, str | None, int | None]] = [("case", "case", None, None)]
    if source.folds:
        columns.append(("fold", "fold", None, None))
    columns.append(("mean Dice", "mean_dice", None, 3))
    for metric, title, digits in METRICS:
        if any(case.get(metric) for case in source.cases.values()):
            columns += [(f"{title.split(' ')[0]} {name}", metric, name, digits) for name in source.class_names]
    return columns


def per_case_section(source: Source) -> str:
    """One row per case, sortable by any column (click its header)."""
    if not source.cases:
        return _note("no per-case scores: nothing was evaluated yet")
    columns = case_columns(source)
    rows = []
    for case, scores in source.cases.items():
        row = []
        for _, metric, name, _ in columns:
            if metric == "case":
                row.append(case)
            else:
                row.append(scores.get(metric) if name is None else (scores.get(metric) or {}).get(name))
        rows.append(row)
    units = " HD95 in mm." if any(metric == "hd95" for _, metric, _, _ in columns) else ""
    hint = f"<p>Click a column header to sort by it (again to reverse); empty cells stay last.{units}</p>"
    return hint + _table([(title, digits) for title, _, _, digits in columns], rows, sortable=True)


def overlays_section(source: Source) -> str:
    """The best, median and worst case by mean Dice drawn over their image, with what is missing for each."""
    chosen = chosen_cases(source.cases)
    if not chosen:
        return _note("no case to show: nothing was evaluated yet")
    parts = [
        "<p>Reference contours solid, prediction contours dashed, one colour per class; each plane on its slice with "
        "the most foreground (reference, or prediction where the reference is empty), in the voxels' aspect ratio, "
        "grey levels from the image's 1st to 99th percentile.</p>"
    ]
    for case, roles in chosen:
        scores = source.cases[case]
        title = f"{' / '.join(roles)}: {case}, mean Dice {shown(scores.get('mean_dice'))}"
        if scores.get("fold"):
            title += f" ({scores['fold']})"
        png, problems = plot_case(scores, source.class_names)
        body = _image(png, title) if png is not None else ""
        missing = f"<br>Missing: {_e('; '.join(problems))}" if problems else ""
        parts.append(f'<figure data-case="{_e(case)}">{body}<figcaption>{_e(title)}{missing}</figcaption></figure>')
    return "\n".join(parts)


def _version(package: str) -> str:
    """The installed version of ``package`` (its distribution's metadata: nothing is imported)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_section(source: Source) -> str:
    """This machine's Python, torch, MONAI and numpy versions, platform and CPUs; the run's recorded versions."""
    here = [("python", platform.python_version()), *((package, _version(package)) for package in PACKAGES)]
    here += [("platform", platform.platform()), ("CPU count", os.cpu_count())]
    body = "<p>Where this report was written:</p>" + _key_values(here)
    recorded = []
    for key, value in source.metadata.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        recorded += [(f"{key} {name}".strip(), version) for name, version in items]
    if recorded:
        body += f"<p>What the run recorded ({METADATA_FILE}):</p>" + _key_values(recorded)
    else:
        body += _note(f"the run has no {METADATA_FILE}: its versions are unknown")
    return body


def settings_section(source: Source) -> str:
    """The settings of the run as key/value tables, values as one line of YAML."""
    if not source.settings:
        return _note(f"no {TRAIN_CONFIG} found")
    return "\n".join(f"<p>{_e(title)}</p>" + _key_values(rows, flow) for title, rows in source.settings)


def overview_section(source: Source) -> str:
    """What the folder is and, for a K-fold folder, its folds."""
    body = _key_values(source.overview)
    if source.folds:
        columns = [("fold", None), ("cases scored", None), ("epochs", None), ("best epoch", None), ("mean Dice", 3)]
        body += _table(columns, source.folds)
    return body


def curves_section(source: Source) -> str:
    """The learning-curve figure with its caption, or what is missing."""
    if not any(source.curves.values()):
        return _note("no learning curve yet: no epoch has finished")
    caption = "One line per fold." if len(source.curves) > 1 else "Validation Dice: mean and per class."
    return _image(plot_curves(source), f"learning curves. {caption}") + f"<p>{_e(caption)}</p>"


def trials_section(source: Source) -> str:
    """A sweep's trials, ranked and sortable, and Optuna's plots."""
    columns = [("rank", 0), ("trial", 0), ("state", None), ("Dice", 3), ("settings", None), ("time [s]", 1)]
    body = _table([*columns, ("note", None)], source.trials, sortable=True)
    return body + "".join(_image(png, name.removesuffix(".png").replace("_", " ")) for name, png in source.figures)


def render(source: Source) -> str:
    """The whole page as HTML text: every value escaped, every image embedded, no outside reference."""
    trials = [("trials", "Trials", trials_section(source))] if source.trials else []
    sections = [
        ("overview", "Overview", overview_section(source)),
        *trials,
        ("headline", "Headline numbers", headline_section(source)),
        ("curves", "Learning curves", curves_section(source)),
        ("per-class", "Per-class metrics", per_class_section(source)),
        ("per-case", "Per-case metrics", per_case_section(source)),
        ("overlays", "Best, median and worst case", overlays_section(source)),
        ("settings", "Settings", settings_section(source)),
        ("environment", "Environment", environment_section(source)),
    ]
    nav = " ".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in sections)
    notes = "".join(f"<li>{_e(note)}</li>" for note in source.notes)
    missing = f'<div class="notes" id="missing"><strong>Missing</strong><ul>{notes}</ul></div>' if notes else ""
    title = f"{source.folder.name}: {source.kind}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>",
            "<body>",
            f'<header><h1>{_e(title)}</h1><p class="subtitle">{_e(source.folder)}</p><nav>{nav}</nav></header>',
            missing,
            *(_section(anchor, heading, body) for anchor, heading, body in sections),
            f"<script>{SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report page of ``run_dir`` (a training run, K-fold or sweep folder) to ``output`` (default
    ``RUN_DIR/report.html``) atomically, and return its path. Raises :class:`ReportError` for any other folder."""
    source = read_source(run_dir)
    path = Path(output) if output is not None else source.folder / REPORT_FILE
    atomic_write_bytes(path, render(source).encode())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: write the page and print its path; a folder of another kind is one line of error."""
    parser = argparse.ArgumentParser(prog="python -m custom_components.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a training run folder, a K-fold output folder or a sweep folder")
    parser.add_argument("--output", help=f"where to write the page (default RUN_DIR/{REPORT_FILE})")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.output)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
