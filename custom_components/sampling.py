"""Training draws that do not depend on worker processes or interruptions: each epoch's order, and each item's random
transforms, drawn from (the run's seed, the epoch) alone, so a resumed run draws what an uninterrupted one would; and
how often each case is drawn (``case_sampling``, dataset.json's ``sampling_weight``)."""

from __future__ import annotations

import collections
import itertools
import logging
import math
import multiprocessing
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.utils import MAX_SEED

from custom_components.checkpoint import epoch_seed
from custom_components.dataset_check import SAMPLING_WEIGHT, DatasetError, case_classes

logger = logging.getLogger(__name__)

CASE_SAMPLING = ("uniform", "balanced")  # the `case_sampling` key's choices


class EpochSeededDataset(torch.utils.data.Dataset):
    """``dataset`` whose random transforms draw each item from a seed of (the epoch's seed, the item's draw).

    Which worker process loads an item, when, and whether the workers live across epochs then changes no random
    draw: an epoch draws the same patches and augmentations in a resumed run as in an uninterrupted one. An index
    from :class:`EpochSeededSampler` is a pair (the epoch's seed, the draw), so a worker may load the next epoch's
    items while this one ends. The draw is the item's index in an epoch's first pass over the dataset and
    ``pass * len(dataset) + index`` in a later one (an epoch of ``iterations_per_epoch`` longer than the dataset),
    so a case drawn twice in an epoch gets other patches and augmentations the second time. A plain index (a
    sampler of MONAI's, such as ``DistributedSampler``) takes the current epoch's seed, set in the main process
    (``set_random_state``, which ``ResumableCheckpoint`` reaches through MONAI's ``set_rnd`` at every epoch start,
    with the epoch through ``set_epoch``) and read by the workers from shared memory; a worker's own seeding
    (MONAI's ``worker_init_fn``) is ignored.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self._epoch_seed = multiprocessing.RawValue("q", 0)  # shared with forked (or spawned) workers
        self.epoch = 1  # the trainer's current epoch: where an EpochSeededSampler starts

    @property
    def epoch_seed(self) -> int:
        return int(self._epoch_seed.value)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Any:
        if torch.utils.data.get_worker_info() is None:
            self._epoch_seed.value = int(seed or 0)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        seed, draw = index if isinstance(index, tuple) else (self.epoch_seed, index)
        item_seed = int(np.random.SeedSequence([seed, 0, int(draw)]).generate_state(1)[0])
        set_rnd(self.dataset, item_seed % MAX_SEED)
        return self.dataset[int(draw) % len(self)]


class EpochSeededSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Epoch after epoch without end, from the trainer's current epoch: (the epoch's seed, draw) pairs of an
    ``EpochSeededDataset``, each epoch's drawn from its seed (``epoch_seed`` of ``seed`` and the epoch) alone.

    An epoch is ``iterations_per_epoch`` batches of ``batch_size`` per process (nnU-Net's fixed epoch, whatever the
    number of cases) or, without it, one pass over the dataset shared out between the ``num_replicas`` processes and
    rounded up to whole batches (a last partial batch would be completed with the next epoch's draws). An epoch's
    draws, all processes together, are permutations of the dataset end to end, the first one the whole of a
    one-process pass, so each case is drawn as often as any other, give or take one; process ``rank`` takes every
    ``num_replicas``-th from the ``rank``-th on (as torch's ``DistributedSampler``), so the processes train on
    different cases.

    With ``weights`` (one per case, from :func:`case_weights`) an epoch's draws, all processes together, are as many
    cases drawn in proportion to them by systematic sampling (one random offset, then evenly spaced points on the
    cumulative weights: each case drawn ``total * weight`` times rounded down or up, never more or less, the least
    spread any draw by weight has), in an order drawn from the epoch's seed; a case's ``k``-th draw in the epoch is
    numbered ``k * len(dataset) + case``, so that each gets its own patches. Without them (uniform, the default),
    the permutations above (equal weights draw each case as often, in other orders).

    Its length is one epoch of this process (the trainer's epoch length). Not ending, the loader's iterator lives
    across epochs (the trainer continues it), so the workers (on ``data_device``'s device path, the thread of MONAI's
    ``ThreadDataLoader``) prepare the next epoch's first batches during this epoch's end and validation instead of
    after them. The order is not drawn from torch's global generator (as a shuffling ``DataLoader`` does), which the
    start of a loader's workers also draws from.
    """

    def __init__(
        self,
        dataset: EpochSeededDataset,
        seed: int,
        iterations_per_epoch: int | None = None,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        if weights is not None and (len(weights) != len(dataset) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights must be {len(dataset)} numbers >= 0, not all 0, one per case; got {weights}")
        self.cumulative = None if weights is None else np.cumsum(np.asarray(weights, dtype=float))
        if iterations_per_epoch is None:
            batches = math.ceil(len(dataset) / (self.num_replicas * batch_size))
        else:
            batches = int(iterations_per_epoch)
        self.epoch_length = batches * int(batch_size)  # draws per epoch of this process

    def __len__(self) -> int:
        return self.epoch_length

    def epoch_draws(self, epoch: int) -> list[tuple[int, int]]:
        """This process's (the epoch's seed, draw) pairs of ``epoch``, in the order it trains on them."""
        seed, size = epoch_seed(self.seed, epoch), len(self.dataset)
        total = self.epoch_length * self.num_replicas
        order = np.random.default_rng([seed, 1])
        if self.cumulative is None:
            draws = [
                (seed, first + index)
                for first in range(0, total, size)  # a pass over the dataset: its draws start at first
                for index in order.permutation(size).tolist()
            ]
        else:
            points = (order.random() + np.arange(total)) / total  # evenly spaced in [0, 1), one random offset
            cases = np.searchsorted(self.cumulative / self.cumulative[-1], points, side="right")
            drawn: collections.Counter[int] = collections.Counter()
            draws = []
            for case in order.permutation(cases).tolist():
                draws.append((seed, drawn[case] * size + case))
                drawn[case] += 1
        return draws[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in itertools.count(self.dataset.epoch):
            yield from self.epoch_draws(epoch)


def balanced_weights(classes: Sequence[Collection[int]]) -> np.ndarray:
    """Per case, the probability of drawing it when a class is picked uniformly among the ``K`` classes the cases
    hold, background included, and then one of the ``n_c`` cases holding class ``c`` uniformly:

        w_i = (1 / K) * sum over the classes c of case i of 1 / n_c        (sum over cases: 1)

    So every class is the one picked in 1/K of the draws, a class held by 2 of 12 cases as often as one held by all
    12; as background is in (nearly) every case, each case keeps at least about 1/K of its uniform share, so none is
    left out. ``classes``: the class values each case holds (``dataset_check.case_classes``)."""
    held = collections.Counter(value for case in classes for value in set(case))
    return np.array([sum(1 / held[value] for value in set(case)) / len(held) for case in classes])


def case_weights(cases: Sequence[Mapping[str, Any]], case_sampling: str) -> list[float] | None:
    """How often each training case is drawn, for :class:`EpochSeededSampler`: ``uniform`` each as often (None, the
    sampler's permutations), ``balanced`` by :func:`balanced_weights` of the classes the dataset check found in each
    label map; a ``sampling_weight`` in the cases' dataset.json entries (the check has made it a number >= 0 in every
    entry or in none) multiplies either. Normalised to sum 1. A fold whose cases all weigh 0 is a ``DatasetError``."""
    if case_sampling not in CASE_SAMPLING:
        raise ValueError(f"case_sampling {case_sampling!r} is not one of {list(CASE_SAMPLING)}")
    given = [item.get(SAMPLING_WEIGHT) for item in cases]
    if case_sampling == "uniform" and None in given:
        return None
    weights = np.ones(len(cases)) if None in given else np.asarray(given, dtype=float)
    if weights.sum() <= 0:
        raise DatasetError(
            f"every training case of this fold has {SAMPLING_WEIGHT} 0: give some of them a weight > 0 in dataset.json"
        )
    if case_sampling == "balanced":
        classes = case_classes([str(item["label"]) for item in cases])
        weights = weights * balanced_weights(classes)
        _log_class_shares(classes, weights)
    return (weights / weights.sum()).tolist()


def _log_class_shares(classes: Sequence[Collection[int]], weights: np.ndarray) -> None:
    """For each class, the share of draws that hold it: drawn uniformly and drawn with ``weights``."""
    shares = []
    for value in sorted({value for case in classes for value in case}):
        holds = np.array([value in case for case in classes])
        shares.append(f"class {value} {holds.mean():.0%} -> {weights[holds].sum() / weights.sum():.0%}")
    logger.info("case_sampling: share of the draws holding each class, uniform -> weighted: %s", ", ".join(shares))


def read_case_weights(cases: Sequence[Mapping[str, Any]], case_sampling: str) -> list[float] | None:
    """:func:`case_weights` for the bundle configs: a ``DatasetError`` ends the program with its message."""
    try:
        return case_weights(cases, case_sampling)
    except DatasetError as err:
        logger.error("%s", err)
        sys.exit(f"error: {err}")
