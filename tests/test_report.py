"""report.html of a run folder and of a K-fold folder: self-contained, opened in a real browser (Debian's chromium)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from custom_components.report import REPORT_FILE, main, write_report
from custom_components.report_figures import case_planes, plot_case
from tests.conftest import USER_CWD

CHROMIUM = Path("/usr/bin/chromium")
HEAVY = shutil.ignore_patterns("*.pt", "events.out.tfevents.*")  # what a report never reads


@pytest.fixture(scope="module")
def scored_run(run3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``run3d``, which its training scored at the end (evaluation/ with the validation cases' label
    maps) and reported (report.html)."""
    return Path(shutil.copytree(run3d, tmp_path_factory.mktemp("report") / "run", ignore=HEAVY))


@pytest.fixture(scope="module")
def kfold_folder(scored_run: Path, run3d: Path, dataset3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A K-fold folder of two folds: fold_0 the scored run with its predictions and an evaluation.json of Dice only
    (files found in dataset.json and evaluation/predictions), fold_1 a run whose evaluation.json names its files,
    has HD95 and NSD (one HD95 null) and no prediction."""
    output = tmp_path_factory.mktemp("kfold") / "cv"
    output.mkdir()
    shutil.copytree(scored_run, output / "fold_0", ignore=HEAVY)
    old = output / "fold_0" / "evaluation" / "evaluation.json"  # as evaluations were: Dice only, no file paths
    evaluation = json.loads(old.read_text())
    evaluation["cases"] = {case: {k: v[k] for k in ("mean_dice", "dice")} for case, v in evaluation["cases"].items()}
    old.write_text(json.dumps({key: evaluation[key] for key in ("model_path", "mean_dice", "dice_per_class", "cases")}))
    shutil.copytree(run3d, output / "fold_1", ignore=HEAVY)
    fold0 = sorted(evaluation["cases"])
    fold1 = {"case_000": (0.9, 0.5), "case_001": (0.05, None)}  # (mean Dice, lesion HD95): the best and the worst
    cases = {}
    for case, (dice, hd95) in fold1.items():
        cases[case] = {
            "mean_dice": dice,
            "dice": {"organ": dice, "lesion": dice},
            "hd95": {"organ": 2.0 + dice, "lesion": hd95},
            "nsd": {"organ": dice, "lesion": dice / 2},
            "image": str(dataset3d / "imagesTr" / f"{case}.nii.gz"),
            "label": str(dataset3d / "labelsTr" / f"{case}.nii.gz"),
            "prediction": None,
        }
    evaluation = {"model_path": str(output / "fold_1" / "models" / "model.pt"), "space": "original image grid"}
    evaluation |= {"nsd_tolerance_mm": 2.0, "empty_policy": "skip", "mean_dice": 0.475, "cases": cases}
    (output / "fold_1" / "evaluation").mkdir(exist_ok=True)
    (output / "fold_1" / "evaluation" / "evaluation.json").write_text(json.dumps(evaluation))
    state = {"bundle": "bundles/unet3d", "dataset_dir": str(dataset3d), "folds": 2, "repeats": 1, "seed": 0}
    state |= {"stratify": "auto", "group": None, "splits_file": None, "overrides": {}, "max_epochs": 2}
    state |= {"class_names": ["organ", "lesion"], "fold_count": 2, "split_count": 2}
    (output / "kfold.json").write_text(json.dumps(state))
    splits = [{"train": sorted(fold1), "val": fold0}, {"train": fold0, "val": sorted(fold1)}]
    (output / "splits.json").write_text(json.dumps(splits))
    (output / "report.json").write_text(json.dumps({"verdict": {"text": "stable: <the folds agree>"}}))
    return output


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, driven by playwright (no browser download: the machine has no internet)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (`make install` does it when run as root)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


def _chosen(cases: dict[str, float]) -> dict[str, str]:
    """Best, median and worst case id by mean Dice, as the page picks them."""
    ranked = sorted((dice, case) for case, dice in cases.items())
    return {"best": ranked[-1][1], "median": ranked[len(ranked) // 2][1], "worst": ranked[0][1]}


def _evaluation(run: Path) -> dict:
    """The run's evaluation.json."""
    return json.loads((run / "evaluation" / "evaluation.json").read_text())


def _numbers(values: list[str]) -> list[float | None]:
    """The ``data-value`` of numeric cells as numbers, empty (a missing value) as None."""
    return [None if value == "" else float(value) for value in values]


def _sorted_with_nulls_last(values: list[float | None], descending: bool) -> list[float | None]:
    present = sorted((v for v in values if v is not None), reverse=descending)
    return present + [None] * (len(values) - len(present))


def _open(browser: Browser, page_file: Path) -> SimpleNamespace:
    """The page loaded from disk, with every console error and page error it emits collected."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_file.as_uri())
    page.wait_for_load_state("load")
    return SimpleNamespace(page=page, errors=errors)


def _assert_images_loaded(page: Page) -> int:
    """Every image of the page decoded (complete, with a width); returns how many there are."""
    images = page.eval_on_selector_all("img", "images => images.map(i => [i.complete, i.naturalWidth])")
    assert images and all(complete and width > 0 for complete, width in images), images
    return len(images)


def _column(page: Page, index: int) -> list[str]:
    """The ``data-value`` of column ``index`` of the per-case table, in the order the rows are shown."""
    script = f"rows => rows.map(row => row.cells[{index}].dataset.value)"
    return page.eval_on_selector_all("table.sortable tbody tr", script)


def _assert_sorts(page: Page, title: str) -> None:
    """Clicking the header ``title`` sorts the rows by its numbers ascending, then descending, nulls last both
    ways, each row kept whole."""
    headers = page.eval_on_selector_all("table.sortable thead th", "cells => cells.map(c => c.textContent)")
    index = headers.index(title)
    rows_before = set(zip(_column(page, 0), _column(page, index), strict=True))
    for descending in (False, True):
        page.click(f"table.sortable thead th:nth-child({index + 1}) button")
        values = _numbers(_column(page, index))
        assert values == _sorted_with_nulls_last(values, descending), (title, descending, values)
        expected = "descending" if descending else "ascending"
        assert page.get_attribute(f"table.sortable thead th:nth-child({index + 1})", "aria-sort") == expected
        assert set(zip(_column(page, 0), _column(page, index), strict=True)) == rows_before


def test_training_writes_its_report_which_opens_in_a_browser_with_images_and_a_sortable_table(
    run3d: Path, browser: Browser
) -> None:
    path = run3d / REPORT_FILE  # written by the training itself, after scoring its best model
    assert path.is_file() and (run3d / "evaluation" / "evaluation.json").is_file()
    opened = _open(browser, path)
    page = opened.page
    chosen = _chosen({c: s["mean_dice"] for c, s in _evaluation(run3d)["cases"].items()})
    assert _assert_images_loaded(page) == 1 + len(set(chosen.values()))  # the curves, one figure per chosen case
    cases = _column(page, 0)
    assert sorted(cases) == sorted(_evaluation(run3d)["cases"])
    _assert_sorts(page, "mean Dice")
    _assert_sorts(page, "Dice organ")
    page.click("table.sortable thead th:nth-child(1) button")  # text: natural order, then reversed
    assert _column(page, 0) == sorted(cases)
    page.click("table.sortable thead th:nth-child(1) button")
    assert _column(page, 0) == sorted(cases, reverse=True)
    assert not opened.errors


def test_run_report_is_self_contained_deterministic_and_names_the_chosen_cases(
    scored_run: Path, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "custom_components.report", str(scored_run), "--output", str(tmp_path / "a.html")]
    subprocess.run(command, cwd=USER_CWD.name, check=True, capture_output=True)  # the user's command
    first = (tmp_path / "a.html").read_bytes()
    second = write_report(scored_run, tmp_path / "b.html").read_bytes()
    assert first == second
    text = first.decode()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text)
    assert references and all(ref.startswith(("data:image/png;base64,", "#")) for ref in references), references
    assert "url(" not in text and "@import" not in text
    chosen = _chosen({c: s["mean_dice"] for c, s in _evaluation(scored_run)["cases"].items()})
    for role, case in chosen.items():
        assert re.search(rf"{role}[^<]*: {case}, mean Dice", text), (role, case)
    for section in ("Learning curves", "Per-class metrics", "Per-case metrics", "Settings", "Environment"):
        assert f">{section}</h2>" in text
    assert "Missing" not in text  # evaluation and predictions are all there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html"]  # no temporary file left


def test_kfold_report_shows_out_of_fold_scores_new_metrics_and_sorts_nulls_last(
    kfold_folder: Path, browser: Browser
) -> None:
    path = write_report(kfold_folder)
    text = path.read_text()
    assert ">HD95 (mm)</td>" in text and ">NSD</td>" in text  # rows of the per-class table
    assert "stable: &lt;the folds agree&gt;" in text  # report.json's verdict, escaped
    assert "no prediction" in text  # fold_1's cases have none: said, not a crash
    fold0 = _evaluation(kfold_folder / "fold_0")["cases"]
    means = {case: scores["mean_dice"] for case, scores in fold0.items()} | {"case_000": 0.9, "case_001": 0.05}
    chosen = _chosen(means)
    assert (chosen["best"], chosen["worst"]) == ("case_000", "case_001")
    for role, case in chosen.items():
        assert re.search(rf"{role}[^<]*: {case}, mean Dice", text), (role, case)

    opened = _open(browser, path)
    page = opened.page
    assert _assert_images_loaded(page) == 1 + len(set(chosen.values()))
    headers = page.eval_on_selector_all("table.sortable thead th", "cells => cells.map(c => c.textContent)")
    assert headers[:3] == ["case", "fold", "mean Dice"] and "HD95 lesion" in headers and "NSD organ" in headers
    folds = dict(zip(_column(page, 0), _column(page, 1), strict=True))
    assert folds == {**{case: "fold_0" for case in fold0}, "case_000": "fold_1", "case_001": "fold_1"}
    assert None in _numbers(_column(page, headers.index("HD95 lesion")))  # case_001's, and fold_0 has none
    _assert_sorts(page, "HD95 lesion")
    _assert_sorts(page, "mean Dice")
    assert not opened.errors


def test_a_run_without_evaluation_says_so_and_escapes_what_it_shows(run3d: Path, tmp_path: Path) -> None:
    unscored = shutil.ignore_patterns("*.pt", "events.out.tfevents.*", "evaluation", REPORT_FILE)
    run = Path(shutil.copytree(run3d, tmp_path / "run", ignore=unscored))
    config = run / "configs" / "train.yaml"
    config.write_text(config.read_text().replace("\n# Wiring:", '\nnote: "<script>alert(1)</script>"\n# Wiring:', 1))
    text = write_report(run).read_text()
    assert "no evaluation yet" in text and "no per-case scores" in text and "no case to show" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>alert" not in text
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['best_mean_dice']:.3f}" in text  # the headline from training's validation
    assert text.count("data:image/png;base64,") == 1  # the learning curves


def test_a_2d_case_is_drawn_in_one_plane(tmp_path: Path) -> None:
    image = (np.arange(40 * 30).reshape(30, 40) % 255).astype(np.uint8)  # rows, columns
    label = np.zeros((30, 40), np.uint8)
    label[5:15, 10:30] = 1
    for name, array in (("image", image), ("label", label), ("prediction", np.roll(label, 3, axis=1))):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
    case = {name: tmp_path / f"{name}.png" for name in ("image", "label", "prediction")}
    png, problems = plot_case(case, ["organ"])
    assert png is not None and not problems
    assert Image.open(io.BytesIO(png)).size[0] < 500  # one panel: a volume gets three side by side (1200 pixels)
    png, problems = plot_case({**case, "prediction": None}, ["organ"])
    assert png is not None and problems == ["no prediction (none in evaluation/predictions)"]


def test_volume_planes_keep_the_file_numbering_and_the_voxel_aspect() -> None:
    # voxel axes: 0 head-foot (2.5 mm), 1 front-to-back (0.8 mm, flipped), 2 left-right (1 mm), as DICOM can have
    affine = np.array([[0, 0, 1.0, 0], [0, -0.8, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])
    label = np.zeros((12, 30, 40), np.uint8)
    label[5, 20, 10:12] = 1
    planes = case_planes(np.zeros(label.shape, np.float32), label, None, affine)
    assert [plane.title for plane in planes] == ["axial, slice 5", "coronal, slice 20", "sagittal, slice 10"]
    assert [plane.image.shape for plane in planes] == [(40, 30), (40, 12), (30, 12)]  # (R, A), (R, S), (A, S)
    assert [plane.aspect for plane in planes] == pytest.approx([0.8 / 1.0, 2.5 / 1.0, 2.5 / 0.8])
    assert all(plane.reference.any() and plane.prediction is None for plane in planes)


def test_an_unknown_folder_is_one_line_naming_what_was_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert "configs/train.yaml and metrics.json" in error and "kfold.json and splits.json" in error
    assert main([str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
