"""Small-batch normalisation (GroupNorm per layer, Weight Standardization, the BatchNorm converter), the bundles'
`norm` choices and the U-Net without skip connections, in 2D and 3D, and one bundle run that uses them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.networks.blocks import Convolution
from monai.networks.layers import Norm, get_norm_layer
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import FlexibleUNet, UNet
from torch import nn

from custom_components.networks import UNetWithoutSkips, unet
from custom_components.norms import (
    NORM_CHOICES,
    AdaptiveGroupNorm,
    WSConv2d,
    WSConv3d,
    convert_norms,
    standardize_weight,
    valid_num_groups,
)
from tests.conftest import REPO, SMALL_3D, read_metrics, run_bundle

# 3 output classes and residual units: the layers MONAI's ("group", {"num_groups": 8}) cannot normalise
NET = {"in_channels": 1, "out_channels": 3, "channels": (12, 24, 48), "strides": (2, 2), "num_res_units": 2}
INPUT_SHAPE = {2: (2, 1, 32, 32), 3: (2, 1, 16, 16, 8)}
WS_CONV = {2: WSConv2d, 3: WSConv3d}


def _input(dims: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(INPUT_SHAPE[dims], generator=torch.Generator().manual_seed(seed))


def _net(dims: int, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return unet(dims, **{**NET, **kwargs}).eval()


@pytest.mark.parametrize(
    ("channels", "groups", "expected"), [(3, 8, 3), (12, 8, 6), (20, 8, 5), (7, 8, 7), (64, 8, 8), (320, 32, 32)]
)
def test_valid_num_groups_is_the_largest_divisor_not_above_the_request(channels: int, groups: int, expected: int):
    assert valid_num_groups(channels, groups) == expected


@pytest.mark.parametrize(("channels", "per_group", "expected"), [(3, 16, 1), (40, 16, 2), (48, 16, 3), (320, 16, 20)])
def test_channels_per_group_mode(channels: int, per_group: int, expected: int) -> None:
    assert AdaptiveGroupNorm(channels, channels_per_group=per_group).num_groups == expected


def test_group_norm_rejects_contradictory_or_empty_settings() -> None:
    with pytest.raises(ValueError, match="not both"):
        AdaptiveGroupNorm(16, num_groups=4, channels_per_group=4)
    with pytest.raises(ValueError, match="positive"):
        AdaptiveGroupNorm(16, num_groups=0)


def test_monai_group_norm_fails_where_group_auto_builds() -> None:
    with pytest.raises(ValueError, match="divisible"):
        UNet(3, **{**NET, "norm": ("group", {"num_groups": 8})})
    assert Norm["group_auto", 3] is AdaptiveGroupNorm
    layer = get_norm_layer(("group_auto", {"num_groups": 8}), spatial_dims=3, channels=3)
    assert isinstance(layer, AdaptiveGroupNorm) and layer.num_groups == 3


@pytest.mark.parametrize("dims", [2, 3])
def test_every_group_norm_layer_outputs_zero_mean_unit_variance_per_group(dims: int) -> None:
    net = _net(dims, norm="group_auto")
    outputs: list[tuple[int, torch.Tensor]] = []
    layers = [m for m in net.modules() if isinstance(m, AdaptiveGroupNorm)]
    for layer in layers:
        layer.register_forward_hook(lambda m, _, out: outputs.append((m.num_groups, out.detach())))
    with torch.no_grad():
        net(_input(dims) * 3 + 5)
    assert len(outputs) == len(layers) > 0
    assert {layer.num_channels: layer.num_groups for layer in layers} == {12: 6, 24: 8, 48: 8, 3: 3}
    for groups, out in outputs:
        per_group = out.reshape(out.shape[0], groups, -1)
        torch.testing.assert_close(per_group.mean(-1), torch.zeros(per_group.shape[:2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            per_group.var(-1, unbiased=False), torch.ones(per_group.shape[:2]), atol=2e-3, rtol=0
        )


@pytest.mark.parametrize("dims", [2, 3])
def test_ws_conv_standardises_each_output_filter(dims: int) -> None:
    torch.manual_seed(0)
    conv = WS_CONV[dims](4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(7).add_(torch.arange(6.0).view(-1, *[1] * (dims + 1)))  # off-centre, mis-scaled filters
    weight = standardize_weight(conv.weight).flatten(1)
    torch.testing.assert_close(weight.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(weight.var(1, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    x = torch.randn(2, 4, *[8] * dims)
    plain = getattr(F, f"conv{dims}d")
    expected = plain(x, standardize_weight(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)
    assert not torch.allclose(conv(x), plain(x, conv.weight, conv.bias, padding=1))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", list(NORM_CHOICES))
def test_every_norm_choice_builds_the_unet(dims: int, norm: str) -> None:
    net = _net(dims, norm=norm)
    with torch.no_grad():
        assert net(_input(dims)).shape == (2, 3, *INPUT_SHAPE[dims][2:])
    expected = {"batch": getattr(nn, f"BatchNorm{dims}d"), "instance": getattr(nn, f"InstanceNorm{dims}d")}
    norm_types = {type(m) for m in net.modules() if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._NormBase))}
    assert norm_types == {expected.get(norm, AdaptiveGroupNorm)}
    assert any(isinstance(m, WS_CONV[dims]) for m in net.modules()) == (norm == "group_ws")


@pytest.mark.parametrize("dims", [2, 3])
def test_group_ws_standardises_exactly_the_convolutions_that_feed_a_norm(dims: int) -> None:
    net = _net(dims, norm="group_ws")
    feeding_norm = {
        f"{name}.conv"
        for name, m in net.named_modules()
        if isinstance(m, Convolution) and hasattr(m, "adn") and not isinstance(m.conv, nn.modules.conv._ConvTransposeNd)
    }
    standardized = {name for name, m in net.named_modules() if isinstance(m, WS_CONV[dims])}
    assert standardized == feeding_norm and len(standardized) == 7
    plain = [name for name, m in net.named_modules() if type(m) is getattr(nn, f"Conv{dims}d")]
    assert sorted(plain) == [
        "model.0.residual",
        "model.1.submodule.0.residual",
        "model.1.submodule.1.submodule.residual",
        "model.2.1.conv.unit0.conv",
    ]  # residual projections and the logits: no norm after them


@pytest.mark.parametrize("target", ["group_ws", "instance"])
def test_convert_norms_replaces_batch_norm_and_keeps_the_rest(target: str) -> None:
    torch.manual_seed(0)
    net = UNet(3, **{**NET, "norm": "batch"}).eval()
    batch_norms = [name for name, m in net.named_modules() if isinstance(m, nn.BatchNorm3d)]
    in_norm = tuple(f"{name}." for name in batch_norms)
    kept = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(in_norm)}
    convert_norms(net, target)
    new_type = AdaptiveGroupNorm if target == "group_ws" else nn.InstanceNorm3d
    assert [name for name, m in net.named_modules() if isinstance(m, new_type)] == batch_norms
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(in_norm)}
    assert state.keys() == kept.keys() and all(torch.equal(state[k], v) for k, v in kept.items())
    assert any(isinstance(m, WSConv3d) for m in net.modules()) == (target == "group_ws")
    with torch.no_grad():
        assert net(_input(3)).shape == (2, 3, 16, 16, 8)


def test_convert_norms_switches_another_monai_network() -> None:
    torch.manual_seed(0)
    net = FlexibleUNet(in_channels=1, out_channels=3, backbone="resnet10", spatial_dims=3, pretrained=False).eval()
    batch_norms = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    convert_norms(net, "group_ws")
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    # every BatchNorm became a GroupNorm and the convolution before each was standardised (ResNet's conv1, bn1, ...)
    assert sum(isinstance(m, AdaptiveGroupNorm) for m in net.modules()) == batch_norms > 0
    assert sum(isinstance(m, WSConv3d) for m in net.modules()) == batch_norms
    assert type(net.segmentation_head[0]) is nn.Conv3d  # the logits keep their plain convolution
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("skip_connections", [True, False])
def test_torchscript_export_gives_the_same_output(dims: int, skip_connections: bool) -> None:
    net = _net(dims, norm="group_ws", skip_connections=skip_connections)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = _input(dims, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


@pytest.mark.parametrize("dims", [2, 3])
def test_state_dict_round_trip(dims: int) -> None:
    source, target = _net(dims, seed=0, norm="group_ws"), _net(dims, seed=1, norm="group_ws")
    x = _input(dims)
    with torch.no_grad():
        assert not torch.allclose(source(x), target(x))
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer))
        torch.testing.assert_close(target(x), source(x))
    # WS adds no parameters: a group_auto checkpoint loads as is
    assert list(_net(dims, norm="group_auto").state_dict()) == list(source.state_dict())


def _zero_output(module: nn.Module) -> None:
    module.register_forward_hook(lambda m, _, out: torch.zeros_like(out))


@pytest.mark.parametrize("dims", [2, 3])
def test_without_skips_only_the_bottleneck_reaches_the_decoder(dims: int) -> None:
    with_skips, without = _net(dims, norm="group_auto"), _net(dims, norm="group_auto", skip_connections=False)
    assert isinstance(without, UNetWithoutSkips)
    assert sum(isinstance(m, SkipConnection) for m in with_skips.modules()) == 2
    assert not any(isinstance(m, SkipConnection) for m in without.modules())
    decoder_inputs = {
        net: [m.in_channels for m in net.modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
        for net in (with_skips, without)
    }
    assert decoder_inputs == {with_skips: [24 + 48, 12 + 12], without: [48, 12]}  # encoder channels dropped
    assert [type(m) for m in with_skips.model[0].modules()] == [type(m) for m in without.model[0].modules()]
    norms = [
        [(type(m), m.num_channels) for m in net.modules() if isinstance(m, nn.GroupNorm)]
        for net in (with_skips, without)
    ]
    assert norms[0] == norms[1]
    # silence the bottleneck: without skips nothing of the input is left, with them the encoder still speaks
    _zero_output(with_skips.model[1].submodule[1].submodule)
    _zero_output(without.model[1][1])
    with torch.no_grad():
        torch.testing.assert_close(without(_input(dims, 0)), without(_input(dims, 1)))
        assert not torch.allclose(with_skips(_input(dims, 0)), with_skips(_input(dims, 1)))


@pytest.mark.parametrize("norm", list(NORM_CHOICES))
def test_bundle_network_def_takes_every_norm_choice(norm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the shared-wiring macros are relative to the repository root
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles/unet3d/configs/train.yaml"))
    parser.update({"num_classes": 3, "in_channels": 1, "channels": [16, 32, 64], "strides": [2, 2], "norm": norm})
    net = parser.get_parsed_content("network_def")
    assert sum(isinstance(m, SkipConnection) for m in net.modules()) == 2  # skip_connections: true by default
    assert any(isinstance(m, WSConv3d) for m in net.modules()) == (norm == "group_ws")
    assert any(isinstance(m, AdaptiveGroupNorm) for m in net.modules()) == norm.startswith("group")


def test_bundle_trains_with_group_ws_and_no_skips(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {"norm": "group_ws", "skip_connections": "False", "max_epochs": 2, "val_interval": 1}
    run_bundle(
        "bundles/unet3d/configs/train.yaml", {**SMALL_3D, **overrides, "dataset_dir": dataset3d, "output_dir": out}
    )
    metrics = read_metrics(out)
    assert metrics["epochs"] == 2 and 0.0 <= metrics["best_mean_dice"] <= 1.0
    expected = unet(3, 1, 3, [16, 32, 64], [2, 2], num_res_units=2, norm="group_ws", skip_connections=False)
    expected.load_state_dict(torch.load(out / "models/model.pt", weights_only=True))  # skip-less shapes, strictly
    assert metrics["parameters"] == sum(p.numel() for p in expected.parameters())
