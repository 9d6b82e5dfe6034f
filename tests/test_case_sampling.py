"""`case_sampling`: how often each training case is drawn. Uniform draws every case as often as the others; balanced
draws the cases holding a rare class more often, from the classes the dataset check found in each label map; a
`sampling_weight` in dataset.json multiplies either. The draws follow the weights in every epoch, come from
(seed, epoch) alone, and are shared out between processes; a bad weight is named with its file and case."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.data import Dataset

from custom_components import dataset_check, settings
from custom_components.data import DatasetError, check_datalist, load_dataset_json
from custom_components.sampling import EpochSeededDataset, EpochSeededSampler, balanced_weights, case_weights
from custom_components.step_measure import bundle_parser
from custom_components.synthetic import write_dataset
from tests.conftest import REPO

# 12 cases, lesions (class 2) in 2 of them: the rare class of the benchmark (benchmarks/case_sampling.py)
LESION_CASES = (3, 8)


@pytest.fixture(scope="module")
def rare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small synthetic volumes, an organ in each, lesions in cases 3 and 8 only."""
    root = tmp_path_factory.mktemp("rare") / "ds"
    return write_dataset(root, cases=12, seed=4, shape=(24, 24, 8), lesion_cases=LESION_CASES)


def _cases(count: int) -> EpochSeededDataset:
    return EpochSeededDataset(Dataset(list(range(count))))


def _counts(sampler: EpochSeededSampler, epoch: int) -> np.ndarray:
    """How often ``sampler`` draws each case in ``epoch``."""
    size = len(sampler.dataset)
    return np.bincount([draw % size for _, draw in sampler.epoch_draws(epoch)], minlength=size)


def test_balanced_weights_pick_a_class_then_a_case_holding_it() -> None:
    # background and the organ in all 12 cases, the lesion in 2: each class is picked in a third of the draws
    classes = [(0, 1, 2) if i in LESION_CASES else (0, 1) for i in range(12)]
    weights = balanced_weights(classes)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[3] == pytest.approx((1 / 12 + 1 / 12 + 1 / 2) / 3) and weights[0] == pytest.approx(2 / 12 / 3)
    # the lesion's cases: 2/12 of uniform draws, 1/3 (picked for it) + 2/3 * 2/12 (picked for another class) balanced
    assert weights[list(LESION_CASES)].sum() == pytest.approx(1 / 3 + 2 / 3 * 2 / 12)
    # a case without foreground (background alone) keeps a share: never left out
    assert balanced_weights([(0,), (0, 1), (0, 1)])[0] == pytest.approx(1 / 3 / 2)


@pytest.mark.parametrize("iterations", [25, None])
def test_every_epoch_draws_each_case_as_often_as_its_weight(iterations: int | None) -> None:
    weights = [0.1, 0.2, 0.3, 0.4, 0.0, 1.0]
    sampler = EpochSeededSampler(_cases(6), seed=0, iterations_per_epoch=iterations, batch_size=2, weights=weights)
    total = len(sampler)  # 25 batches of 2, or one pass (6 draws) in whole batches
    assert total == (50 if iterations else 6)
    expected = total * np.asarray(weights) / sum(weights)
    drawn = np.zeros(6)
    for epoch in range(1, 201):
        counts = _counts(sampler, epoch)
        assert counts.sum() == total and np.all(np.abs(counts - expected) < 1), (epoch, counts)  # rounded, no more
        drawn += counts
    assert drawn[4] == 0  # weight 0: never drawn
    assert np.allclose(drawn / drawn.sum(), expected / total, atol=0.01)  # over many epochs, the weights exactly


def test_uniform_stays_uniform_and_draws_as_before() -> None:
    sampler = EpochSeededSampler(_cases(12), seed=0, iterations_per_epoch=10, batch_size=3)
    for epoch in (1, 2, 9):
        counts = _counts(sampler, epoch)
        assert counts.max() - counts.min() <= 1, counts
    # equal weights draw each case as often too (another order: the draws by weight)
    equal = EpochSeededSampler(_cases(12), seed=0, iterations_per_epoch=10, batch_size=3, weights=[1.0] * 12)
    assert np.ptp(_counts(equal, 1)) <= 1
    assert case_weights([{"image": "a.nii.gz", "label": "a.nii.gz"}], "uniform") is None  # the sampler's permutations


def test_a_rare_class_is_drawn_as_the_rule_says(rare: Path) -> None:
    """The weights of real label maps, from the classes the dataset check recorded: drawn over many epochs, the two
    lesion cases take the share the rule gives, against 2 of 12 uniformly."""
    datalist = check_datalist(load_dataset_json(rare), rare, 3)
    assert [2 in classes for classes in dataset_check.case_classes([d["label"] for d in datalist])] == [
        i in LESION_CASES for i in range(12)
    ]
    weights = case_weights(datalist, "balanced")
    draws = {}
    for name, chosen in (("uniform", None), ("balanced", weights)):
        sampler = EpochSeededSampler(_cases(12), seed=1, iterations_per_epoch=50, batch_size=2, weights=chosen)
        counts = sum(_counts(sampler, epoch) for epoch in range(1, 51))
        draws[name] = counts[list(LESION_CASES)].sum() / counts.sum()
    assert draws["uniform"] == pytest.approx(2 / 12, abs=0.01)
    assert draws["balanced"] == pytest.approx(1 / 3 + 2 / 3 * 2 / 12, abs=0.01)


def test_the_classes_come_from_the_check_not_a_second_read(rare: Path, copy_dataset, monkeypatch) -> None:
    dataset = copy_dataset(rare)
    datalist = check_datalist(load_dataset_json(dataset), dataset, 3)

    def no_read(path: object) -> None:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(dataset_check, "read_image", no_read)
    assert len(case_weights(datalist, "balanced")) == 12


def test_dataset_weights_multiply_the_rule(rare: Path, copy_dataset) -> None:
    dataset = copy_dataset(rare)
    description = json.loads((dataset / "dataset.json").read_text())
    for index, item in enumerate(description["training"]):
        item["sampling_weight"] = 0 if index == 0 else (3 if index == 1 else 1)
    (dataset / "dataset.json").write_text(json.dumps(description))
    datalist = check_datalist(load_dataset_json(dataset), dataset, 3)
    uniform = np.asarray(case_weights(datalist, "uniform"))
    assert uniform[0] == 0 and uniform[1] == pytest.approx(3 * uniform[2]) and uniform.sum() == pytest.approx(1)
    balanced = np.asarray(case_weights(datalist, "balanced"))
    rule = balanced_weights(dataset_check.case_classes([d["label"] for d in datalist]))
    assert np.allclose(balanced, rule * [0, 3, *[1] * 10] / (rule * [0, 3, *[1] * 10]).sum())
    # a fold whose every case weighs 0 is stopped with the fix
    with pytest.raises(DatasetError, match="every training case of this fold has sampling_weight 0"):
        case_weights(datalist[:1], "balanced")


def test_the_same_seed_and_epoch_draw_the_same_also_resumed() -> None:
    weights = [1.0, 5.0, 2.0, 0.5, 1.5]
    sampler = EpochSeededSampler(_cases(5), seed=3, iterations_per_epoch=4, batch_size=3, weights=weights)
    again = EpochSeededSampler(_cases(5), seed=3, iterations_per_epoch=4, batch_size=3, weights=weights)
    assert [sampler.epoch_draws(k) for k in (1, 2, 3)] == [again.epoch_draws(k) for k in (1, 2, 3)]
    assert sampler.epoch_draws(1) != sampler.epoch_draws(2)  # each epoch its own draws
    other_seed = EpochSeededSampler(_cases(5), seed=4, iterations_per_epoch=4, batch_size=3, weights=weights)
    assert other_seed.epoch_draws(1) != sampler.epoch_draws(1)
    from_start = list(itertools.islice(sampler, 3 * 12))
    resumed = _cases(5)
    resumed.set_epoch(3)  # what ResumableCheckpoint does at every epoch start
    restarted = EpochSeededSampler(resumed, seed=3, iterations_per_epoch=4, batch_size=3, weights=weights)
    assert list(itertools.islice(restarted, 12)) == from_start[24:]
    # a case drawn twice in an epoch: other draw numbers, so other patches and augmentations
    draws = sampler.epoch_draws(1)
    assert len(set(draws)) == len(draws)


@pytest.mark.parametrize(("iterations", "length"), [(3, 6), (None, 4)])
def test_processes_take_disjoint_shares_of_the_weighted_draws(iterations: int | None, length: int) -> None:
    weights = [4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    ranks = [
        EpochSeededSampler(_cases(7), 0, iterations, batch_size=2, num_replicas=2, rank=rank, weights=weights)
        for rank in (0, 1)
    ]
    assert [len(sampler) for sampler in ranks] == [length, length]
    first, second = (sampler.epoch_draws(1) for sampler in ranks)
    assert set(first).isdisjoint(second)
    # together, the draws one process would take in an epoch twice as long, dealt out in turn
    alone = EpochSeededSampler(_cases(7), 0, 2 * length, batch_size=1, weights=weights).epoch_draws(1)
    assert [draw for pair in zip(first, second, strict=True) for draw in pair] == alone


def test_bad_weights_in_dataset_json_are_named_with_file_and_case(rare: Path, copy_dataset) -> None:
    dataset = copy_dataset(rare)
    description = json.loads((dataset / "dataset.json").read_text())
    training = description["training"]
    training[1]["sampling_weight"] = -1
    training[2]["sampling_weight"] = "2"
    training[4]["sampling_weight"] = True
    training[5]["sampling_weight"] = 1.5
    (dataset / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError) as raised:
        check_datalist(load_dataset_json(dataset), dataset, 3)
    message = str(raised.value)
    path = dataset / "dataset.json"
    assert f"{path} training[1] (case_001) has sampling_weight -1: give a number >= 0" in message
    assert f'{path} training[2] (case_002) has sampling_weight "2"' in message
    assert f"{path} training[4] (case_004) has sampling_weight true" in message
    assert "training[5]" not in message  # 1.5 is a weight
    # given to some cases only: the others named, and the fix
    assert "gives sampling_weight to 4 of 12 training cases, not to case_000, case_003, case_006" in message
    assert "give every training case a sampling_weight (a number >= 0), or none" in message
    for item in training:
        item["sampling_weight"] = 0
    (dataset / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError, match="gives every training case sampling_weight 0"):
        check_datalist(load_dataset_json(dataset), dataset, 3)


@pytest.mark.parametrize("value", ["rare", "Balanced", 1, None])
def test_a_bad_value_is_refused_naming_the_key(value: object) -> None:
    problems = settings.check({"case_sampling": value}, REPO / "bundles/unet3d")
    assert [problem.key for problem in problems] == ["case_sampling"]
    assert "uniform" in problems[0].fix and "balanced" in problems[0].fix
    assert settings.check({"case_sampling": "balanced"}, REPO / "bundles/unet2d") == []


@pytest.mark.parametrize("bundle", ["unet3d", "unet2d"])
def test_the_bundles_hand_the_weights_to_the_sampler(bundle: str, rare: Path, tmp_path: Path) -> None:
    overrides = {"dataset_dir": str(rare), "output_dir": str(tmp_path / "run"), "cache_rate": 0.0, "num_workers": 0}
    overrides.update(case_sampling="balanced", num_folds=1, plan="off", channels=[8, 16], strides=[2])
    config = REPO / "bundles" / bundle / "configs"
    parser = bundle_parser(config / "train.yaml", overrides)
    sampler = parser.get_parsed_content("process#train_sampler")
    datalist = parser.get_parsed_content("data#train")
    expected = balanced_weights(dataset_check.case_classes([d["label"] for d in datalist]))
    assert np.allclose(np.diff(sampler.cumulative, prepend=0), expected)
    # multi-GPU training: each process's sampler takes the same weights, by id
    multi_gpu = ConfigParser()
    multi_gpu.read_config([str(config / "train.yaml"), str(config / "multi_gpu_train.yaml")])
    assert multi_gpu.get("process#train_sampler#weights") == "@data#train_weights"
    uniform = bundle_parser(
        config / "train.yaml", {**overrides, "case_sampling": "uniform", "output_dir": str(tmp_path / "uniform")}
    )
    assert uniform.get_parsed_content("process#train_sampler").cumulative is None
