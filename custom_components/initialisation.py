"""Weight initialisation, the ``init`` key: He (Kaiming) or Xavier (Glorot) for every convolution and transposed
convolution, zero biases, normalisation layers at weight 1 and bias 0; ``default`` keeps the network's own.

He et al. 2015 ("Delving Deep into Rectifiers") draw a convolution's weights from N(0, gain^2 / fan) with gain
sqrt(2 / (1 + a^2)) for a leaky ReLU of slope ``a``, so that the signal keeps its variance through rectifier layers;
``kaiming`` is nnU-Net's ``InitWeights_He``: ``kaiming_normal_`` with a = 0.01 (DynUNet's leaky ReLU slope) and the
fan-in, which keeps the forward signal's variance from layer to layer (the fan-out keeps the gradient's; He et al.
show that either one keeps both within bounds, and nnU-Net uses the fan-in). PyTorch takes a transposed
convolution's fan-in from its weight's second axis (output channels times the kernel), as nnU-Net uses it. Glorot &
Bengio 2010 ("Understanding the difficulty of training deep feedforward neural networks") balance both directions:
``xavier`` draws N(0, 2 / (fan_in + fan_out)). ``default`` is, for ``unet``, PyTorch's ``kaiming_uniform_`` with
a = sqrt(5) (a variance a sixth of He's, biases drawn too); MONAI's DynUNet draws He's weights itself (nnU-Net's,
``DynUNet.initialize_weights``), so for ``dynunet`` ``kaiming`` draws other numbers of the same law.

The draws come from torch's global generator: the bundles build the network right after seeding it with ``seed``,
so the same seed gives the same weights. A checkpoint or weights file loaded later (a resumed run, fine-tuning,
evaluation) replaces them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

KAIMING_SLOPE = 1e-2  # nnU-Net's InitWeights_He(neg_slope=1e-2), DynUNet's leaky ReLU slope


def _kaiming(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, a=KAIMING_SLOPE, mode="fan_in")


def _xavier(weight: torch.Tensor) -> None:
    nn.init.xavier_normal_(weight)


# the `init` key's choices: how a convolution's weight is drawn (None: the network's own init left as it is)
INITS: dict[str, Callable[[torch.Tensor], None] | None] = {"default": None, "kaiming": _kaiming, "xavier": _xavier}
# torch's public classes (their common bases, _ConvNd and _NormBase, are private)
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
)  # fmt: skip


def initialise(network: nn.Module, init: str) -> nn.Module:
    """``network`` with its weights drawn anew by ``init`` (:data:`INITS`), in place: every convolution's and
    transposed convolution's weight drawn, its bias 0; every normalisation layer's weight 1 and bias 0 (where it has
    them). Other parameters (a PReLU's slope) keep their values. ``default`` changes nothing: the network keeps the
    weights its constructor drew."""
    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {list(INITS)}")
    draw = INITS[init]
    if draw is None:
        return network
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, CONVOLUTIONS):
                draw(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, NORMS):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return network
