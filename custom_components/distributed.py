"""Which process of a distributed run (``torchrun``, ``multi_gpu_train.yaml``) this is, and rank 0's values shared.

Outside a distributed run every function answers as the one process of a run would.
"""

from __future__ import annotations

from typing import Any

import torch


def is_distributed() -> bool:
    """Whether this process is one of a distributed run's (its process group is set up)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def process_rank() -> int:
    """This process's rank in the distributed run; 0 outside one."""
    return torch.distributed.get_rank() if is_distributed() else 0


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` in every process of a distributed run (e.g. one timestamped output folder for all)."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
