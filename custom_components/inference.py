"""Inference over a folder that may hold unreadable files, and flip test-time augmentation.

Before any case: the inputs' dimensions (read from their headers) must fit the network, and ``output_dir`` must be
a folder that can be written. Both are known before any work is done, so either stops the run at once with one
message naming the files or the folder (inputs of the wrong kind mostly mean the wrong run or the wrong folder).

Unreadable files: each is reported and skipped, the others are written.

MONAI's ``Dataset`` raises on the first image it cannot load and the whole run stops. Here the dataset returns a
:class:`SkippedCase` for it, the collate function passes that through, and :class:`SkippingEvaluator` records it
instead of running the network, then ends the run non-zero with the list once every other case is written.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import Dataset, list_data_collate
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer

from custom_components.data import DatasetError, image_spatial_dims, read_images
from custom_components.output_dir import prepare_output_dir

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


def _header_dims(items: Sequence[dict[str, Any]]) -> Iterator[tuple[str, int]]:
    """Each input whose header can be read, with its spatial dimensions (an unreadable one is reported and skipped
    when the dataset reaches it)."""
    for item in items:
        try:
            yield item["image"], image_spatial_dims(item["image"])
        except DatasetError:
            continue


def volume_inputs(items: Sequence[dict[str, Any]]) -> bool:
    """Whether the inputs are volumes (3D) rather than 2D images, from the first one that can be read."""
    return next((dims for _, dims in _header_dims(items)), 3) == 3


def input_dims_problem(
    input_dir: str | Path, items: Sequence[dict[str, Any]], spatial_dims: int, context_slices: int = 0
) -> str | None:
    """Why the inputs do not fit the network (None when they do), naming the files: a 3D network (``spatial_dims``
    3) and a 2.5D one (``context_slices`` > 0: neighbouring slices as channels) take volumes only; a 2D network takes
    volumes slice by slice or 2D images as they are, one kind a run (the first readable input's)."""
    found = list(_header_dims(items))
    if not found:
        return None
    first, first_dims = found[0]
    expected = 3 if spatial_dims == 3 or context_slices > 0 else first_dims
    wrong = [path for path, dims in found if dims != expected]
    if not wrong:
        return None
    shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
    if spatial_dims == 3:
        return (
            f"input_dir {input_dir}: the 3D network segments volumes, not 2D images: {shown}; segment 2D images with "
            "a run of the 2D bundle (bundles/unet2d), or pass --input_dir with volumes only"
        )
    if context_slices > 0:
        return (
            f"input_dir {input_dir}: the network takes context_slices {context_slices} neighbouring slices as "
            f"channels, which 2D images lack: {shown}; pass --input_dir with volumes only"
        )
    kinds = {3: "volume", 2: "2D image"}
    return (
        f"input_dir {input_dir} mixes volumes and 2D images, and a run segments one kind (the first, {first}, is a "
        f"{kinds[first_dims]}): {shown}; put each kind in a folder of its own and run once on each"
    )


def read_inputs(input_dir: str | Path, spatial_dims: int, context_slices: int = 0) -> list[dict[str, str]]:
    """For the inference config: the images of ``input_dir`` (:func:`custom_components.data.read_images`), whose
    dimensions :func:`input_dims_problem` finds fit for the network, else a clean exit naming the files."""
    items = read_images(input_dir)
    problem = input_dims_problem(input_dir, items, spatial_dims, context_slices)
    if problem:
        logger.error("%s", problem)
        sys.exit(f"error: {problem}")
    return items


class WritableOutputDir:
    """Evaluator handler: when the run starts, before the first case, ``output_dir`` must be a folder that can be
    written (:func:`custom_components.output_dir.prepare_output_dir`, created if missing), else a clean exit naming it
    rather than the image writer's traceback at the first case."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: prepare_output_dir(self.output_dir, clean=False))


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


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` to flip together, the empty one (no flip) first: 2**len(axes) passes."""
    return [combo for size in range(len(axes) + 1) for combo in itertools.combinations(axes, size)]


class FlipTTAInferer(Inferer):
    """Test-time augmentation by flips: ``inferer`` runs on every combination of flips of ``axes`` (spatial axes of
    the image), each output is flipped back, and the softmax probabilities are averaged.

    It returns ``log`` of the averaged probabilities: logits whose softmax is that average, so the configs'
    postprocessing (softmax, argmax) is the same with and without it.
    """

    def __init__(self, inferer: Callable[..., torch.Tensor], axes: Sequence[int]) -> None:
        super().__init__()
        self.inferer = inferer
        self.flips = flip_combinations(sorted(set(axes)))

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        total = torch.zeros(())
        for combo in self.flips:
            dims = [2 + axis for axis in combo]  # after the batch and channel dimensions
            flipped = torch.flip(inputs, dims) if dims else inputs
            output = self.inferer(flipped, network, *args, **kwargs)
            probabilities = torch.softmax(torch.flip(output, dims) if dims else output, dim=1)
            total = total + probabilities
        return torch.log((total / len(self.flips)).clamp_min(torch.finfo(total.dtype).tiny))


def flip_tta(
    inferer: Callable[..., torch.Tensor],
    enabled: bool,
    axes: Sequence[int] | None,
    image_dims: int,
    slice_axis: int | None = None,
) -> Callable[..., torch.Tensor]:
    """``inferer`` itself, or with flip TTA over ``axes`` (None: every spatial axis of the ``image_dims``-D images).

    ``slice_axis``: the axis a 2D network slides along over a volume; its neighbouring slices are channels
    (2.5D), whose order a flip along it would reverse, so it is never flipped. A bad axis stops the run, named.
    """
    if not enabled:
        return inferer
    allowed = [axis for axis in range(image_dims) if axis != slice_axis]
    chosen = allowed if axes is None else list(axes)
    wrong = [axis for axis in chosen if axis not in allowed]
    if wrong:
        why = f" (the slice axis {slice_axis} is never flipped: 2.5D context)" if slice_axis in wrong else ""
        sys.exit(f"error: tta_axes {list(axes or [])}: {wrong} not among the flippable axes {allowed}{why}")
    return FlipTTAInferer(inferer, chosen)
