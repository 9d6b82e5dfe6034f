"""Where this repository lives: its bundles, their template and the planning code's bundle configs."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
