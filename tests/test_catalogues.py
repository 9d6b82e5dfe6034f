"""Every loss, optimiser and schedule the catalogues offer builds from config and works; intensity schemes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from custom_components.transforms import intensity_transform
from tests.conftest import REPO

COMMON = REPO / "bundles/common/configs"


def _names(file: str) -> list[str]:
    return list(yaml.safe_load((COMMON / file).read_text()))


def _parser(**config) -> ConfigParser:
    parser = ConfigParser({"imports": ["$import torch", "$import monai"], **config})
    return parser


LOSS_CASES = [(name, None) for name in _names("losses.yaml")] + [
    (name, [0.2, 1.0, 3.0])
    for name in _names("losses.yaml")
    if name != "tversky"  # Tversky takes no weights
]


@pytest.mark.parametrize(("name", "class_weights"), LOSS_CASES)
def test_every_loss_trains_a_voxel_classifier(name: str, class_weights) -> None:
    parser = _parser(loss=f"%{COMMON}/losses.yaml#{name}", class_weights=class_weights)
    loss_fn = parser.get_parsed_content("loss")
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 4))
    logits = torch.zeros(2, 3, 8, 8, 4, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(logits, label)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "rmsprop"])
@pytest.mark.parametrize("schedule", _names("optimizers.yaml")[4:])
def test_every_optimizer_and_schedule_steps(optimizer: str, schedule: str) -> None:
    assert set(_names("optimizers.yaml")[:4]) == {"adamw", "adam", "sgd", "rmsprop"}
    parser = _parser(
        network="$torch.nn.Linear(4, 2)",
        learning_rate=0.01,
        weight_decay=1e-5,
        warmup_epochs=2,
        max_epochs=10,
        optimizer=f"%{COMMON}/optimizers.yaml#{optimizer}",
        lr_scheduler=f"%{COMMON}/optimizers.yaml#{schedule}",
    )
    network, opt, sched = (parser.get_parsed_content(k) for k in ("network", "optimizer", "lr_scheduler"))
    rates = []
    for _ in range(10):
        opt.zero_grad()
        network(torch.ones(3, 4)).sum().backward()
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert all(0 <= r <= 0.01 + 1e-12 for r in rates) and len(set(rates)) > 1, rates


def test_intensity_schemes() -> None:
    hu = torch.tensor([[-1000.0, -160.0, 40.0, 240.0, 1500.0]])
    window = intensity_transform("image", "ct_window", (-160, 240))({"image": hu})["image"]
    assert torch.allclose(torch.as_tensor(window), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    zscore = intensity_transform("image", "ct_zscore", (-160, 240), mean=40.0, std=100.0)({"image": hu})["image"]
    assert torch.allclose(torch.as_tensor(zscore), torch.tensor([[-2.0, -2.0, 0.0, 2.0, 2.0]]))
    mr = torch.tensor([[0.0, 10.0, 20.0, 30.0]])
    normalised = torch.as_tensor(intensity_transform("image", "zscore")({"image": mr})["image"])
    assert normalised[0, 0] == 0 and abs(float(normalised[0, 1:].mean())) < 1e-6
    with pytest.raises(ValueError, match="unknown intensity scheme 'hu'"):
        intensity_transform("image", "hu")
    with pytest.raises(ValueError, match="needs window, mean and std"):
        intensity_transform("image", "ct_zscore", (-160, 240))
