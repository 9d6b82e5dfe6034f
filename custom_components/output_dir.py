"""The run folder before any case is cached: writable, with room for the network's checkpoints, temporary files of a
killed write removed; otherwise a clean exit naming the folder and the space needed and free."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from custom_components.run_files import remove_stale_temporaries
from custom_components.runlock import not_a_folder

logger = logging.getLogger(__name__)


class OutputDirError(ValueError):
    """An ``output_dir`` that cannot hold the run: not writable, or without room for the checkpoints."""


OPTIMIZER_MOMENTS = 2  # tensors per parameter an optimiser keeps (Adam, AdamW: two; SGD, RMSprop: fewer)
SPACE_MARGIN = 1.25  # on top of the estimate: pickling overhead, the report's history, a larger optimiser state
REPORT_BYTES = 64 * 2**20  # learning curve, metrics.json, configs, docs, TensorBoard events, log


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def checkpoint_space(network: Any, output_dir: str | Path | None = None) -> int:
    """Bytes of disk a run of ``network`` needs for its checkpoints, with a margin.

    ``models/model.pt`` holds the weights, ``models/checkpoint_last.pt`` the weights and the optimiser's moments,
    and each is written to a temporary file before it replaces the previous one, so the checkpoint is on disk twice
    for a moment. What a previous run already wrote into ``output_dir`` (a resumed run) is counted as present.
    """
    weights = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)
    checkpoint = weights + OPTIMIZER_MOMENTS * trained
    needed = SPACE_MARGIN * (weights + 2 * checkpoint) + REPORT_BYTES
    if output_dir is not None:
        for name in ("model.pt", "checkpoint_last.pt"):
            existing = Path(output_dir) / "models" / name
            needed -= existing.stat().st_size if existing.is_file() else 0
    return int(max(needed, SPACE_MARGIN * checkpoint + REPORT_BYTES))


def check_output_dir(output_dir: str | Path, network: Any | None = None) -> None:
    """``output_dir`` (created if missing) is a folder that can be written and, given a ``network`` (training), has
    room for its checkpoints.

    Writability is tried, not read from the permission bits (which do not stop root, and miss read-only mounts):
    a temporary file is created and removed. Raises :class:`OutputDirError` naming the folder and the fix.
    """
    path = Path(output_dir)
    if problem := not_a_folder(path):
        raise OutputDirError(problem)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(
            f"output_dir {path} cannot be written ({err.strerror or err}): pass --output_dir with a folder you can "
            "write to"
        ) from err
    if network is None:
        return
    needed = checkpoint_space(network, path)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OutputDirError(
            f"output_dir {path} has {_size(free)} free but the checkpoints need about {_size(needed)} "
            "(models/model.pt and models/checkpoint_last.pt with the optimiser state, each written next to the "
            "previous one before replacing it): free some space or pass --output_dir on another disk"
        )


def prepare_output_dir(output_dir: str | Path, network: Any | None = None, clean: bool = True) -> str:
    """For the bundle configs, before the dataset cache is filled or the first case is written:
    :func:`check_output_dir`, a clean exit with its message if it fails, then (``clean``: the training process that
    writes) the temporary files a killed write left removed."""
    try:
        check_output_dir(output_dir, network)
    except OutputDirError as err:
        logger.error("%s", err)
        sys.exit(f"error: {err}")
    if clean:
        for path in remove_stale_temporaries(output_dir):
            logger.warning("removed %s, left by a write that was killed", path)
    return str(output_dir)
