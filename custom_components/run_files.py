"""A run folder's files written whole, and weights and checkpoints read safely.

Every file a run writes goes through :func:`atomic_write_bytes` (a temporary file beside it, flushed to disk, then
renamed over it, with the permissions the umask gives): a failed write (a full disk) leaves the previous file as it
was, and :func:`remove_stale_temporaries` removes what a killed write left. Every weights or checkpoint file is read
through :func:`read_checkpoint`: tensors and plain values only, nothing in it executed; :func:`load_weights` puts
a ``models/model.pt`` into its network, naming the keys and shapes that differ when it does not fit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from custom_components.networks import unwrap

# what tempfile.mkstemp(prefix=".NAME.") makes for a file a run writes (or the output_dir check's probe); other
# dot-files (a `--output_dir ~` holds many) are never matched
TEMPORARY_NAME = re.compile(r"^\.(?:.+\.(?:json|csv|png|pt|yaml|conf|md)|write-check)\.[a-z0-9_]{8}$")
RUN_FOLDERS = (".", "models", "configs", "docs")  # where a run writes atomically


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the /proc reading first)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so a reader never sees half a file.

    The file gets the permissions of any file the user creates (``0o666`` less the umask; ``mkstemp`` alone gives
    ``0o600``) and is flushed to disk before it replaces ``path``. On any failure (a full disk, an interrupt) the
    temporary file is removed and ``path`` keeps its previous content; a temporary file left by a killed process
    (``.NAME.XXXXXXXX``) is removed when the next training starts (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # a failed write: name it
            kept = "its previous content is kept" if path.exists() else "no file was written"
            raise OSError(err.errno, f"{err.strerror} ({kept})", str(path)) from err
        raise
    with contextlib.suppress(OSError):  # the rename itself on disk, so a power cut does not bring the old file back
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write_bytes` left in a run folder and return them.

    Only names ``mkstemp`` makes with the ``.NAME.`` prefix are touched, in the run folder, ``models/``,
    ``configs/`` and ``docs/``. Call it once the run folder is this process's (after the run-folder lock).
    """
    removed = []
    for folder in RUN_FOLDERS:
        directory = Path(output_dir) / folder
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if TEMPORARY_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a truncated checkpoint behind."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """``obj`` as JSON, laid out as the model zoo's pre-commit hook ``pretty-format-json --indent=4 --no-sort-keys``
    writes it (4-space indent, non-ASCII escaped, keys in their order, a final newline): a run folder's files go into
    a model zoo pull request unchanged."""
    atomic_write_bytes(path, (json.dumps(obj, indent=4, ensure_ascii=True) + "\n").encode())


class CheckpointError(ValueError):
    """A weights or checkpoint file that cannot be loaded as tensors and plain values; the message says why and the
    fix."""


CHECKPOINT_FIX = "delete it or start a new output_dir"  # a run folder's models/checkpoint_last.pt: train it anew
# where a file that may be loaded comes from, named with every refusal instead of PyTorch's own advice
TRUSTED_ORIGIN = "weights and checkpoints come from a training run (its models/model.pt and models/checkpoint_last.pt)"
PICKLED_CALLABLE = re.compile(r"GLOBAL ([\w.]+)")  # the callable a refused pickle names, in PyTorch's message


def read_checkpoint(path: str | Path, map_location: Any = "cpu", fix: str = CHECKPOINT_FIX) -> Any:
    """``path`` loaded as tensors and plain values only (``weights_only=True``): nothing in it is executed. Every
    weights or checkpoint file is read through here (``models/model.pt`` by :func:`load_weights`).

    Raises :class:`CheckpointError` naming the file, where such files come from, and ``fix``: a pickle that needs
    other objects (it may execute code) or a file that is not a checkpoint at all. PyTorch's own message is left out:
    it advises loading the file with ``weights_only=False``, which runs the payload. A zip checkpoint (what
    ``torch.save`` writes) is memory-mapped, so a check before training costs little.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says what matters
            return torch.load(path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        named = PICKLED_CALLABLE.search(str(err))
        holds = f"it calls {named.group(1)}" if named else "it holds pickled objects that are not tensors"
        reason = f"is not a weights or checkpoint file of tensors and plain values ({holds}): it may execute code"
    except Exception as err:  # zip, pickle and torch raise several types for files that are not checkpoints
        first = (str(err).strip().splitlines() or [""])[0][:200]
        reason = f"cannot be read as a weights or checkpoint file ({type(err).__name__}: {first})"
    raise CheckpointError(f"{path} {reason}, so it was not loaded; {TRUSTED_ORIGIN}: {fix}")


class ModelError(ValueError):
    """A weights file that is missing or does not fit the network; the message says which keys differ."""


def state_dict_differences(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], shown: int = 5) -> list[str]:
    """What differs between a network's state_dict and a loaded one: missing and unexpected keys, other shapes."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [
        f"{key} {tuple(found[key].shape)} (network: {tuple(value.shape)})"
        for key, value in expected.items()
        if key in found and hasattr(found[key], "shape") and tuple(found[key].shape) != tuple(value.shape)
    ]
    differences = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)):
        if items:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            differences.append(f"{len(items)} {title}: {', '.join(items[:shown])}{more}")
    return differences


def load_weights(network: torch.nn.Module, path: str | Path, device: Any = "cpu") -> torch.nn.Module:
    """Load a plain state_dict (``models/model.pt``) into ``network``, read as tensors only (:func:`read_checkpoint`:
    nothing executed).

    Raises :class:`ModelError` naming the file: one that is not tensors (it may execute code), or, for a network of
    other settings, the keys and shapes that differ, instead of PyTorch's traceback through every parameter.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"model_path {path} does not exist: train into this run folder first (models/model.pt is written at the "
            "first validation) or pass --model_path with a weights file"
        )
    try:
        state = read_checkpoint(path, device, fix="use a models/model.pt that a training run wrote")
    except CheckpointError as err:
        raise ModelError(str(err)) from None
    target = unwrap(network)
    differences = state_dict_differences(target.state_dict(), state) if isinstance(state, Mapping) else ["not a dict"]
    if differences:
        raise ModelError(
            f"model_path {path} does not fit the network these settings build ({'; '.join(differences)}): use the "
            "configs of the run folder that trained it (RUN/configs/inference.yaml), or the same network keys "
            "(architecture, channels, strides, kernel_sizes, num_res_units, norm, skip_connections, deep_supervision, "
            "in_channels, num_classes, context_slices)"
        )
    target.load_state_dict(state)
    return network
