"""`kfold select` on thin slabs of thick slices whose squares are drawn anew in every slice: the 2D bundle wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_select import check_selection, select_on_new_data


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_names_2d_on_slabs(seed: int, tmp_path: Path) -> None:
    check_selection(select_on_new_data("slabs", seed, tmp_path), "slabs")
