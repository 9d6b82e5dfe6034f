"""The `architecture` key: MONAI's DynUNet beside the U-Net, its deep supervision loss, the settings that refuse
keys of the other architecture, and a DynUNet run that trains, validates, predicts and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.nets import DynUNet

from custom_components import export, settings
from custom_components.networks import StackedDeepSupervisionLoss, build_network, on_device, training_loss
from tests.conftest import REPO, SMALL_3D, read_metrics, run_bundle

BUNDLE_3D = REPO / "bundles" / "unet3d"
# nnU-Net's topology for 0.8 x 0.8 x 2.5 mm voxels: z pooled once, convolved with 1 until the in-plane spacing nears it
DYNUNET = {
    "architecture": "dynunet",
    "strides": "[[2,2,1],2]",
    "kernel_sizes": "[[3,3,1],3,3]",
    "deep_supervision": "True",
    "num_res_units": "1",
}

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:DeprecationWarning")


def test_deep_supervision_loss_scores_each_unbound_head_against_the_label() -> None:
    seen: list[torch.Size] = []

    def loss(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        seen.append(prediction.shape)
        return prediction.mean() * 0 + len(seen)  # 1 for the first head, 2 for the second, ...

    wrapped = training_loss(loss, deep_supervision=True)
    assert isinstance(wrapped, StackedDeepSupervisionLoss) and training_loss(loss, deep_supervision=False) is loss
    label = torch.zeros(2, 1, 8, 8, 4)
    stacked = torch.zeros(2, 3, 5, 8, 8, 4)  # DynUNet in training mode: (batch, heads, classes, spatial)
    assert wrapped(stacked, label).item() == pytest.approx(1 * 1 + 0.5 * 2 + 0.25 * 3)  # weights 1, 1/2, 1/4
    assert seen == [torch.Size([2, 5, 8, 8, 4])] * 3
    seen.clear()
    assert wrapped(torch.zeros(2, 5, 8, 8, 4), label).item() == 1  # eval mode's plain output: one head
    assert len(seen) == 1


def test_dynunet_stacks_its_heads_in_training_only() -> None:
    network = build_network(
        "dynunet",
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        channels=[4, 8, 16, 16],
        strides=[[2, 2, 1], [2, 2, 1], 2],
        kernel_sizes=[[3, 3, 1], [3, 3, 1], 3, 3],
        norm="group",
        deep_supervision=True,
    )
    assert isinstance(network, DynUNet) and network.deep_supr_num == 2  # every decoder level but the lowest
    image = torch.rand(2, 1, 16, 16, 4)
    assert network(image).shape == (2, 3, 3, 16, 16, 4)
    assert network.eval()(image).shape == (2, 3, 16, 16, 4)


@pytest.mark.parametrize(("dims", "layout"), [(3, torch.channels_last_3d), (2, torch.channels_last)])
def test_channels_last_changes_the_layout_not_the_network(dims: int, layout: torch.memory_format) -> None:
    def network(channels_last: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        keys = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance", "dropout": 0.0}
        built = build_network("unet", spatial_dims=dims, in_channels=1, out_channels=3, **keys)
        return on_device(built, "cpu", channels_last)

    plain, fast = network(False), network(True)
    weights = [p for p in fast.parameters() if p.dim() == dims + 2]
    assert all(p.is_contiguous(memory_format=layout) for p in weights)
    assert any(not p.is_contiguous() for p in weights)  # (1x1 kernels and single channels are both at once)
    assert all(p.is_contiguous() for p in plain.parameters())
    image = torch.rand(2, 1, *[16] * dims)
    assert torch.allclose(plain.eval()(image), fast.eval()(image), atol=1e-5)
    plain.load_state_dict(fast.state_dict())  # the same weights file either way


def test_compile_runs_the_same_network_compiled() -> None:
    torch.manual_seed(0)
    keys = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance", "dropout": 0.0}
    plain, compiled = (
        on_device(build_network("unet", spatial_dims=3, in_channels=1, out_channels=3, **keys), "cpu", False, c)
        for c in (False, True)
    )
    compiled.load_state_dict(plain.state_dict())  # the same weights file either way
    traced = []  # a submodule hook's side effect: True when the forward ran in the compiled graph
    for network in (plain, compiled):
        next(network.children()).register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    image = MetaTensor(torch.rand(1, 1, 16, 16, 16))  # what the trainer feeds it
    assert torch.allclose(plain.eval()(image), compiled.eval()(image), atol=1e-5)
    assert traced == [False, True]


def test_settings_refuse_what_the_architecture_does_not_build() -> None:
    def problems(**values: object) -> dict[str, str]:
        return {p.key: f"{p.problem}; {p.fix}" for p in settings.check(values, BUNDLE_3D)}

    assert "should be one of: unet, dynunet" in problems(architecture="nnunet")["architecture"]
    assert "architecture dynunet" in problems(deep_supervision=True)["deep_supervision"]  # on the default unet
    assert (
        "built by architecture unet only"
        in problems(architecture="dynunet", skip_connections=False)["skip_connections"]
    )
    assert "kernel_sizes" in problems(kernel_sizes=[3, 3, 3, 3, 3])
    assert "fewer levels" in problems(architecture="dynunet", channels=[8, 16], strides=[2])["channels"]
    assert "unet only" in problems(architecture="dynunet", norm="group_ws")["norm"]
    assert "entry 1 is even" in problems(architecture="dynunet", kernel_sizes=[3, 2, 3, 3, 3])["kernel_sizes"]
    # per-axis strides: the patch fits each axis' own product of strides
    per_axis = {"architecture": "dynunet", "strides": [[2, 2, 1], [2, 2, 1], 2, 2], "deep_supervision": True}
    assert problems(**per_axis, patch_size=[64, 64, 12]) == {}
    assert "downsample each axis by [16, 16, 4]" in problems(**per_axis, patch_size=[64, 64, 10])["patch_size"]


def test_a_dynunet_run_trains_validates_and_exports(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "dynunet"
    overrides = {**SMALL_3D, **DYNUNET, "dataset_dir": dataset3d, "output_dir": out, "max_epochs": 1}
    run_bundle("bundles/unet3d/configs/train.yaml", {**overrides, "val_interval": 1})
    assert 0 <= read_metrics(out)["best_mean_dice"] <= 1  # validated in eval mode: the full-resolution output

    inference = yaml.safe_load((out / "configs" / "inference.yaml").read_text())
    assert inference["architecture"] == "dynunet" and inference["deep_supervision"] is True
    assert inference["kernel_sizes"] == [[3, 3, 1], 3, 3] and inference["strides"] == [[2, 2, 1], 2]
    parser = ConfigParser(inference)
    parser["bundle_root"] = str(out)
    assert isinstance(parser.get_parsed_content("network_def"), DynUNet)

    result = export.export(out, "torchscript")  # checked against PyTorch at the patch and at another size
    assert result.path.is_file() and len(result.checks) == 2 and all(check.passed for check in result.checks)
