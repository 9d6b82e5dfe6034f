"""Training draws that do not depend on worker processes or interruptions: each epoch's order, and each item's random
transforms, drawn from (the run's seed, the epoch) alone, so a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.utils import MAX_SEED

from custom_components.handlers import epoch_seed


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
    ``EpochSeededDataset``, each epoch's drawn from its seed (``handlers.epoch_seed`` of ``seed`` and the epoch) alone.

    An epoch is ``iterations_per_epoch`` batches of ``batch_size`` per process (nnU-Net's fixed epoch, whatever the
    number of cases) or, without it, one pass over the dataset shared out between the ``num_replicas`` processes and
    rounded up to whole batches (a last partial batch would be completed with the next epoch's draws). An epoch's
    draws, all processes together, are permutations of the dataset end to end, the first one the whole of a
    one-process pass, so each case is drawn as often as any other, give or take one; process ``rank`` takes every
    ``num_replicas``-th from the ``rank``-th on (as torch's ``DistributedSampler``), so the processes train on
    different cases.

    Its length is one epoch of this process (the trainer's epoch length). Not ending, the loader's iterator lives
    across epochs (the trainer continues it), so the workers prepare the next epoch's first batches during this
    epoch's end and validation instead of after them. The order is not drawn from torch's global generator (as a
    shuffling ``DataLoader`` does), which the start of a loader's workers also draws from.
    """

    def __init__(
        self,
        dataset: EpochSeededDataset,
        seed: int,
        iterations_per_epoch: int | None = None,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
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
        draws = [
            (seed, first + index)
            for first in range(0, total, size)  # a pass over the dataset: its draws start at first
            for index in order.permutation(size).tolist()
        ]
        return draws[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in itertools.count(self.dataset.epoch):
            yield from self.epoch_draws(epoch)
