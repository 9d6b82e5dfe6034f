"""Inference over a folder that may hold unreadable files: each is reported and skipped, the others are written.

MONAI's ``Dataset`` raises on the first image it cannot load and the whole run stops. Here the dataset returns a
:class:`SkippedCase` for it, the collate function passes that through, and :class:`SkippingEvaluator` records it
instead of running the network, then ends the run non-zero with the list once every other case is written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ignite.engine import Engine, Events
from monai.data import Dataset, list_data_collate
from monai.engines import SupervisedEvaluator

from custom_components.data import DatasetError, image_spatial_dims

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedCase:
    """An input that could not be read or preprocessed, and why."""

    image: str
    error: str


class ReadableDataset(Dataset):
    """A MONAI ``Dataset`` that returns a :class:`SkippedCase` for an item whose transform fails."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:  # a corrupt file fails in nibabel, zlib, PIL or ITK, each with its own type
            cause = err.__cause__ or err  # MONAI wraps the reader's error in a RuntimeError naming the transform
            return SkippedCase(str(self.data[index]["image"]), f"{type(cause).__name__}: {cause}".splitlines()[0])


def volume_inputs(items: Sequence[dict[str, Any]]) -> bool:
    """Whether the inputs are volumes (3D) rather than 2D images, from the first one that can be read."""
    for item in items:
        try:
            return image_spatial_dims(item["image"]) == 3
        except DatasetError:
            continue  # reported when the dataset reaches it
    return True


def collate_readable(items: Sequence[Any]) -> Any:
    """MONAI's ``list_data_collate``, except that skipped cases are passed on as a list of them."""
    skipped = [item for item in items if isinstance(item, SkippedCase)]
    return skipped if skipped else list_data_collate(items)


class SkippingEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` that skips :class:`SkippedCase` batches and fails at the end if there were any."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: list[SkippedCase] = []
        self.add_event_handler(Events.STARTED, lambda _: self.skipped.clear())
        self.add_event_handler(Events.COMPLETED, self._report)

    def _iteration(self, engine: SupervisedEvaluator, batchdata: Any) -> dict:
        if isinstance(batchdata, list) and batchdata and isinstance(batchdata[0], SkippedCase):
            for case in batchdata:
                logger.error("skipped %s: %s", case.image, case.error)
            self.skipped += batchdata
            return {}
        return super()._iteration(engine, batchdata)

    def _report(self, _engine: Engine) -> None:
        if self.skipped:
            listing = "\n".join(f"  {case.image}: {case.error}" for case in self.skipped)
            sys.exit(
                f"error: {len(self.skipped)} input(s) could not be read and were skipped (the others are written):\n"
                f"{listing}\nre-export them (NIfTI, PNG or TIFF) and run again on them"
            )
