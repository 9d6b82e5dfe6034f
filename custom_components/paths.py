"""Where the bundles live, and running code from there: their ``%bundles/...`` macros are relative to the cwd."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run a block in ``path`` (``contextlib.chdir`` of Python 3.11, for 3.10 too)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
