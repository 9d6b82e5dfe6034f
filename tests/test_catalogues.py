"""Every loss, optimiser and schedule the catalogues offer builds from config and works; intensity schemes."""

from __future__ import annotations

from pathlib import Path

import monai.transforms
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, RandomizableTrait, Transform

from custom_components.transforms import AsDiscrete, AsDiscreted, intensity_transform
from tests.conftest import REPO

TRAIN_3D = REPO / "bundles/unet3d/configs/train.yaml"
CATALOGUES = yaml.safe_load(TRAIN_3D.read_text())


def _names(catalogue: str) -> list[str]:
    return list(CATALOGUES[catalogue])


def _parser(train: Path = TRAIN_3D, **keys) -> ConfigParser:
    """A bundle's train.yaml (the 3D one unless named) with ``keys`` set, as ``--key value`` sets them."""
    parser = ConfigParser()
    parser.read_config(str(train))
    parser.update({"bundle_root": str(train.parents[1]), **keys})
    return parser


LOSS_CASES = [(name, None) for name in _names("losses")] + [
    (name, [0.2, 1.0, 3.0])
    for name in _names("losses")
    if name != "tversky"  # Tversky takes no weights
]


@pytest.mark.parametrize(("name", "class_weights"), LOSS_CASES)
def test_every_loss_trains_a_voxel_classifier(name: str, class_weights) -> None:
    loss_fn = _parser(loss=name, class_weights=class_weights).get_parsed_content("train#loss_function")
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


@pytest.mark.parametrize("optimizer", _names("optimizers"))
@pytest.mark.parametrize("schedule", _names("lr_schedulers"))
def test_every_optimizer_and_schedule_steps(optimizer: str, schedule: str) -> None:
    assert set(_names("optimizers")) == {"adamw", "adam", "sgd", "rmsprop"}
    parser = _parser(
        network="$torch.nn.Linear(4, 2)",
        learning_rate=0.01,
        weight_decay=1e-5,
        warmup_epochs=2,
        max_epochs=10,
        optimizer=optimizer,
        lr_scheduler=schedule,
    )
    network, opt, sched = (parser.get_parsed_content(k) for k in ("network", "train#optimizer", "train#lr_scheduler"))
    rates = []
    for _ in range(10):
        opt.zero_grad()
        network(torch.ones(3, 4)).sum().backward()
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert all(0 <= r <= 0.01 + 1e-12 for r in rates) and len(set(rates)) > 1, rates


def test_only_the_picked_entries_are_built() -> None:
    parser = _parser(network="$torch.nn.Linear(4, 2)", learning_rate=0.01, optimizer="sgd", lr_scheduler="step")
    optimizer = parser.get_parsed_content("train#optimizer")
    assert isinstance(optimizer, torch.optim.SGD)
    assert isinstance(parser.get_parsed_content("train#lr_scheduler"), torch.optim.lr_scheduler.StepLR)
    # the warm-up and cyclic schedules set the rate to 10% when built: neither was built beside the step schedule
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


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


INTENSITIES = {
    "ct_window": {"scheme": "ct_window", "window": [-160, 240]},
    "ct_zscore": {"scheme": "ct_zscore", "window": [-160, 240], "mean": 40.0, "std": 100.0},
    "zscore": {"scheme": "zscore"},
}


@pytest.mark.parametrize("bundle", ["unet2d", "unet3d"])
@pytest.mark.parametrize("scheme", list(INTENSITIES))
def test_the_cache_holds_all_preprocessing(bundle: str, scheme: str, dataset3d: Path, tmp_path: Path) -> None:
    """MONAI's CacheDataset caches up to the first transform that is random or not a Transform (a nested Compose
    counts as random): every intensity scheme lets it cache the whole preprocessing, so that training draws its
    patches, and validation reads its cases, without redoing it."""
    train = REPO / "bundles" / bundle / "configs" / "train.yaml"
    parser = _parser(train, dataset_dir=str(dataset3d), output_dir=str(tmp_path), intensity=INTENSITIES[scheme])
    base = parser.get_parsed_content("base_transforms")

    def ends_the_cache(transform: object) -> bool:
        return isinstance(transform, RandomizableTrait) or not isinstance(transform, Transform)

    assert parser.get_parsed_content("validate#preprocessing").get_index_of_first(ends_the_cache) is None
    chain = parser.get_parsed_content("train#preprocessing")
    first = chain.get_index_of_first(ends_the_cache)
    # the cache ends at the first random patch draw, past the preprocessing (the 2D bundle adds a fixed step)
    assert first >= len(base) and isinstance(chain.transforms[first], RandomizableTrait)
    assert not isinstance(chain.transforms[first], Compose), chain.transforms[first]


def test_our_as_discreted_gives_monais_output() -> None:
    """The bundles' AsDiscreted takes the argmax another way on CPU (torch's is a slow loop there): the same class
    indices, ties to the first class, dtype and metadata as MONAI's, for tensors and arrays alike."""
    torch.manual_seed(0)
    scores = MetaTensor(torch.randn(3, 16, 12, 5), affine=torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0])))
    scores[:, :4] = 0.5  # every class equal: ties
    scores[1, 4:6] = scores[2, 4:6] = 9.0  # two classes equal at the maximum
    scores.applied_operations.append({"class": "Spacingd"})  # what Invertd reads
    label = MetaTensor(torch.randint(0, 3, (1, 16, 12, 5)).float())
    for options in [
        {"keys": "pred", "argmax": True},
        {"keys": ["pred", "label"], "argmax": [True, False], "to_onehot": 3},
    ]:
        ours = AsDiscreted(**options)({"pred": scores.clone(), "label": label.clone()})
        theirs = monai.transforms.AsDiscreted(**options)({"pred": scores.clone(), "label": label.clone()})
        for key, value in theirs.items():
            assert torch.equal(ours[key].as_tensor(), value.as_tensor()) and ours[key].dtype == value.dtype, key
            assert (
                torch.equal(ours[key].affine, value.affine) and ours[key].applied_operations == value.applied_operations
            )
    assert int(AsDiscreted(keys="pred", argmax=True)({"pred": scores})["pred"][0, 0, 0, 0]) == 0  # all tied: the first
    assert torch.equal(AsDiscreted(keys="pred", argmax=True)({"pred": scores})["pred"][0, 4:6], torch.ones(2, 12, 5))
    array = scores.numpy()
    ours, theirs = AsDiscrete(argmax=True)(array), monai.transforms.AsDiscrete(argmax=True)(array)
    assert type(ours) is type(theirs) and torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))
