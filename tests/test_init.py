"""`init`: He or Xavier weights for every convolution when training builds the network, zero biases, norms at 1 and
0; PyTorch's own with `default`; the same seed the same weights; weights loaded later (a resumed run) replace them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from custom_components import settings
from custom_components.initialisation import KAIMING_SLOPE, NORMS, initialise
from custom_components.networks import build_network
from custom_components.run_files import load_weights
from custom_components.step_measure import bundle_parser
from tests.conftest import REPO

# wide enough that every convolution has thousands of weights: their sample std is within a few % of the drawn one
NETWORKS = {
    "unet": {"architecture": "unet", "norm": "batch"},  # affine norms; MONAI's instance norm has no weights
    "dynunet": {"architecture": "dynunet", "norm": "group"},
}
SHARED = {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "channels": [16, 32, 64], "strides": [2, 2]}


def _build(name: str, init: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(**NETWORKS[name], **SHARED, num_res_units=1, init=init)


def _fans(conv: nn.modules.conv._ConvNd) -> tuple[int, int]:
    """(fan-in, fan-out) of a convolution's weight as PyTorch counts them: axis 1, then axis 0, times the kernel."""
    weight = conv.weight
    kernel = math.prod(weight.shape[2:])
    return weight.shape[1] * kernel, weight.shape[0] * kernel


def _convs(network: nn.Module) -> list[nn.modules.conv._ConvNd]:
    return [module for module in network.modules() if isinstance(module, nn.modules.conv._ConvNd)]


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("init", ["kaiming", "xavier"])
def test_convolutions_are_drawn_at_the_papers_scale(name: str, init: str) -> None:
    network = _build(name, init)
    convs = _convs(network)
    assert any(isinstance(conv, nn.ConvTranspose3d) for conv in convs)  # the decoder's upsampling too
    gain = math.sqrt(2 / (1 + KAIMING_SLOPE**2))
    for conv in convs:
        fan_in, fan_out = _fans(conv)
        expected = gain / math.sqrt(fan_in) if init == "kaiming" else math.sqrt(2 / (fan_in + fan_out))
        weight = conv.weight.detach()
        tolerance = 4 / math.sqrt(2 * weight.numel())  # 4 standard errors of a sample std
        assert weight.std().item() == pytest.approx(expected, rel=tolerance), conv
        assert abs(weight.mean().item()) < 4 * expected / math.sqrt(weight.numel()), conv
        assert conv.bias is None or torch.count_nonzero(conv.bias) == 0
    norms = [module for module in network.modules() if isinstance(module, NORMS) and module.weight is not None]
    assert norms
    for norm in norms:
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    # set again when the network had other values (norms are built at 1 and 0), PReLU slopes left alone
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.fill_(3.0)
    initialise(network, init)
    assert all(torch.all(norm.weight == 1) and torch.all(norm.bias == 0) for norm in norms)
    slopes = [module.weight for module in network.modules() if isinstance(module, nn.PReLU)]
    assert all(torch.all(slope == 3.0) for slope in slopes)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_default_keeps_the_networks_own_init(name: str) -> None:
    default, kaiming = _build(name, "default"), _build(name, "kaiming")
    torch.manual_seed(0)
    untouched = build_network(**NETWORKS[name], **SHARED, num_res_units=1)  # no init at all
    for (key, value), same in zip(default.state_dict().items(), untouched.state_dict().values(), strict=True):
        assert torch.equal(value, same), key
    conv = max(_convs(default), key=lambda conv: conv.weight.numel())
    fan_in, _ = _fans(conv)
    if (
        name == "unet"
    ):  # PyTorch's: kaiming_uniform_ with a = sqrt(5), within 1 / sqrt(fan_in), a sixth of He's variance
        assert conv.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
        assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    else:  # MONAI's DynUNet draws He's weights itself (nnU-Net's): kaiming draws other numbers of the same law
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (1 + KAIMING_SLOPE**2) / fan_in), rel=0.05)
    assert not all(torch.equal(a, b) for a, b in zip(default.parameters(), kaiming.parameters(), strict=True))


@pytest.mark.parametrize("init", ["kaiming", "xavier"])
def test_the_same_seed_draws_the_same_weights(init: str) -> None:
    first, again, other = _build("dynunet", init, 0), _build("dynunet", init, 0), _build("dynunet", init, 1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))


@pytest.mark.parametrize("value", ["he", "Kaiming", 1, None])
def test_a_bad_value_is_refused_naming_the_key(value: object) -> None:
    problems = settings.check({"init": value}, REPO / "bundles/unet3d")
    assert [problem.key for problem in problems] == ["init"]
    assert "default" in problems[0].fix and "kaiming" in problems[0].fix and "xavier" in problems[0].fix
    assert settings.check({"init": "xavier"}, REPO / "bundles/unet2d") == []


@pytest.mark.parametrize("bundle", ["unet3d", "unet2d"])
def test_training_builds_with_init_and_loaded_weights_replace_it(bundle: str, tmp_path: Path) -> None:
    configs = REPO / "bundles" / bundle / "configs"
    overrides = {"init": "kaiming", "channels": [16, 32], "strides": [2], "num_classes": 3, "in_channels": 1}
    network = bundle_parser(configs / "train.yaml", overrides).get_parsed_content("network_def")
    gain = math.sqrt(2 / (1 + KAIMING_SLOPE**2))
    widest = max(_convs(network), key=lambda conv: conv.weight.numel())
    assert widest.weight.std().item() == pytest.approx(gain / math.sqrt(_fans(widest)[0]), rel=0.1)
    # a checkpoint or weights file loaded after the build (resume, evaluation) wins over the drawn weights
    torch.manual_seed(5)
    saved = bundle_parser(configs / "train.yaml", {**overrides, "init": "xavier"}).get_parsed_content("network_def")
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    loaded = load_weights(network, tmp_path / "model.pt")
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values(), strict=True)
    )
    # evaluation and inference only load weights: their configs have no init key
    for config in ("evaluate", "inference"):
        parser = ConfigParser()
        parser.read_config(str(configs / f"{config}.yaml"))
        assert "init" not in parser.get() and "init" not in parser.get("network_def")
