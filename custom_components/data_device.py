"""Where the training data are cached and augmented: the ``data_device`` key (``auto``, ``cpu``, ``cuda``).

- ``cpu``: the cache in RAM, the random crops and augmentations in ``num_workers`` worker processes, each batch
  copied to the GPU by the trainer.
- ``cuda``: MONAI's fast-training pattern (Project-MONAI/tutorials, ``acceleration/fast_model_training_guide.md``):
  the cache holds the deterministic transforms' output on the GPU (``ToDeviced`` after them), the random crops and
  augmentations run there on device tensors, and one thread of the training process prepares the next batch while
  the step runs (MONAI's ``ThreadDataLoader``; worker processes cannot share the cache's CUDA tensors). Validation
  cases are cached on the GPU too, so the sliding window, the argmax and the metrics never leave it.
- ``auto``: ``cuda`` when training on a GPU with every case cached (``cache_rate`` 1) and the cache, estimated from
  the image headers (``data.estimate_cache_bytes``), takes at most ``GPU_CACHE_SHARE`` of the GPU's free memory;
  else ``cpu``. The decision and its reason are logged.

The device path takes a ``torch.device``, the CPU included, so that tests run it on machines without a GPU.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from custom_components.data import estimate_cache_bytes
from custom_components.step_measure import gib

logger = logging.getLogger(__name__)

DATA_DEVICES = ("auto", "cpu", "cuda")  # the `data_device` key's choices
# `auto` caches on the GPU when the cache takes at most this share of the GPU's free memory when training starts:
# the plan lets a training step take `plan_memory_share` (half) of the GPU, and validation's whole volumes with
# their class scores need room beside it
GPU_CACHE_SHARE = 0.3


class DataDeviceError(ValueError):
    """``data_device`` cannot be honoured; the message names the key and the fix."""


@dataclass(frozen=True)
class Placement:
    """Where the cache lives and the random transforms run: ``device`` (the device path), or None (worker
    processes, the cache in RAM); ``reason`` says why."""

    device: torch.device | None
    reason: str


def data_device_problem(data_device: str, device: str | torch.device) -> str | None:
    """What stops ``data_device: cuda`` on this machine (no GPU, or training on the CPU), with the fix; None if
    nothing does."""
    if data_device != "cuda":
        return None
    fix = "set data_device to auto (the GPU when it is there and the cache fits) or cpu"
    if not torch.cuda.is_available():
        return f"data_device = cuda: this machine has no GPU that torch can use; {fix}"
    if torch.device(device).type != "cuda":
        return f"data_device = cuda: device is {device}, so training runs on the CPU; {fix}, or device to cuda"
    return None


def check_data_device(data_device: str, device: str | torch.device) -> None:
    """For the bundle configs' ``initialize``, before any data is read: :func:`data_device_problem` ends the program
    with its message."""
    problem = data_device_problem(data_device, device)
    if problem is not None:
        logger.error("%s", problem)
        sys.exit(f"error: {problem}")


def decide(
    data_device: str, device: str | torch.device, cache_bytes: float, cache_rate: float, free_bytes: int | None
) -> Placement:
    """Where the cache of about ``cache_bytes`` (``cache_rate`` of the cases) lives, for ``data_device`` and the
    training ``device`` with ``free_bytes`` of free memory (None: not a GPU). ``cuda`` with a ``device`` that is not a
    GPU, or whose free memory the cache exceeds, is a :class:`DataDeviceError`."""
    if data_device not in DATA_DEVICES:
        raise DataDeviceError(f"data_device = {data_device!r}: not one of {list(DATA_DEVICES)}")
    device = torch.device(device)
    if data_device == "cpu":
        return Placement(None, "as set")
    if data_device == "cuda":
        if device.type != "cuda":
            raise DataDeviceError(f"data_device = cuda: device is {device}; set data_device to auto or cpu")
        if free_bytes is not None and cache_bytes > free_bytes:
            raise DataDeviceError(
                f"data_device = cuda: the cache needs about {gib(cache_bytes)}, more than the {gib(free_bytes)} "
                f"free on {device}; lower cache_rate, or set data_device to auto or cpu (cache in RAM)"
            )
        return Placement(device, "as set")
    if device.type != "cuda":
        return Placement(None, f"training on {device}")
    if cache_rate < 1:
        return Placement(None, f"cache_rate {cache_rate:g} < 1: the uncached cases would be read by one thread")
    limit = GPU_CACHE_SHARE * (free_bytes or 0)
    fits = cache_bytes <= limit
    verdict = "within" if fits else "over"
    reason = f"the cache, about {gib(cache_bytes)}, is {verdict} {GPU_CACHE_SHARE:.0%} of {gib(free_bytes or 0)} free"
    return Placement(device if fits else None, reason)


def read_data_device(
    data_device: str,
    device: str | torch.device,
    cases: Sequence[Sequence[Mapping[str, Any]]],
    spacing: Sequence[float] | None,
    cache_rate: float,
) -> torch.device | None:
    """For the bundle configs: the device the cache of ``cases`` (training and validation) lives on under
    ``data_device``, or None for the worker processes' path; the decision is logged with its reason, a
    :class:`DataDeviceError` ends the program with its message."""
    device = torch.device(device)
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    cache_bytes = 0.0
    if on_gpu and (data_device == "cuda" or (data_device == "auto" and cache_rate >= 1)):
        cache_bytes = estimate_cache_bytes([case for part in cases for case in part], spacing) * cache_rate
    free_bytes = torch.cuda.mem_get_info(device)[0] if on_gpu else None
    try:
        placement = decide(data_device, device, cache_bytes, cache_rate, free_bytes)
    except DataDeviceError as err:
        logger.error("%s", err)
        sys.exit(f"error: {err}")
    where = "cache in RAM, batches from worker processes"
    if placement.device is not None:
        where = f"cache, patch sampling and augmentation on {placement.device}, batches from a thread"
    logger.info("data_device %s: %s (%s)", data_device, where, placement.reason)
    return placement.device
