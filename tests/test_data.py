"""Dataset reading, checks, splits and the cache that never outgrows memory."""

from __future__ import annotations

import itertools
import json
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import set_rnd
from monai.transforms import Compose, LoadImaged, Randomizable
from scipy import ndimage

from custom_components import data, dataset_check
from custom_components.checkpoint import ResumableCheckpoint, epoch_seed
from custom_components.data import DatasetError, check_datalist, load_dataset_json, make_dataset, split_datalist
from custom_components.sampling import EpochSeededDataset, EpochSeededSampler
from custom_components.step_measure import bundle_parser
from custom_components.synthetic import write_dataset
from tests.conftest import REPO, SMALL_3D, run_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny") / "ds", cases=5, seed=3, shape=(24, 24, 8))


def test_synthetic_dataset_is_ct_like_anisotropic_and_imbalanced(tiny: Path) -> None:
    description = load_dataset_json(tiny)
    assert description["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    shapes = set()
    for item in description["training"]:
        image = nib.load(tiny / item["image"])
        label = np.asarray(nib.load(tiny / item["label"]).dataobj)
        assert image.header.get_zooms() == pytest.approx((0.8, 0.8, 2.5))
        hu = np.asarray(image.dataobj)
        assert hu.min() < -900 and hu.max() > 50  # air and enhanced tissue in Hounsfield units
        assert 0 < (label == 2).mean() < 0.01 and (label == 1).mean() > 0.02
        shapes.add(image.shape)
    assert len(shapes) > 1


def test_synthetic_data_is_seeded(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", cases=1, seed=5, shape=(16, 16, 6))
    b = write_dataset(tmp_path / "b", cases=1, seed=5, shape=(16, 16, 6))
    c = write_dataset(tmp_path / "c", cases=1, seed=6, shape=(16, 16, 6))
    read = lambda root: np.asarray(nib.load(root / "imagesTr/case_000.nii.gz").dataobj)  # noqa: E731
    assert np.array_equal(read(a), read(b)) and not np.array_equal(read(a), read(c))


def test_synthetic_cases_without_foreground_come_last_and_keep_their_body(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", cases=3, seed=4, shape=(24, 24, 8), empty_cases=1)
    labels = [np.asarray(nib.load(root / f"labelsTr/case_{i:03d}.nii.gz").dataobj) for i in range(3)]
    assert [int(label.max()) for label in labels] == [2, 2, 0]  # organ and lesion in the first two only
    empty = np.asarray(nib.load(root / "imagesTr/case_002.nii.gz").dataobj)
    assert empty.min() < -900 and empty.max() > 50  # air, and the unlabelled distractor of the organ's density
    with pytest.raises(ValueError, match="empty_cases"):
        write_dataset(tmp_path / "rods", cases=2, kind="rods", empty_cases=1)


def test_nodule_kind_is_a_10_mm_target_on_an_organ_in_a_large_volume_with_held_out_cases(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", cases=1, seed=0, kind="nodule", test_cases=1)
    description = load_dataset_json(root)
    assert description["labels"] == {"0": "background", "1": "organ", "2": "nodule"}
    assert description["test"] == [{"image": "./imagesTs/case_001.nii.gz", "label": "./labelsTs/case_001.nii.gz"}]
    spacing = np.array([1.0, 1.0, 1.5])
    for entry in [*description["training"], *description["test"]]:
        image = nib.load(root / entry["image"])
        label = np.asarray(nib.load(root / entry["label"]).dataobj)
        assert image.header.get_zooms() == pytest.approx(spacing)
        assert all(0.85 * n - 1 <= size <= 1.15 * n + 1 for size, n in zip(image.shape, (200, 200, 120), strict=True))
        nodule = np.argwhere(label == 2) * spacing
        assert np.all(np.abs(nodule.max(0) - nodule.min(0) + spacing - 10) <= 2)  # about 10 mm across every axis
        assert (label == 2).mean() < 1e-4 and (label == 1).sum() * spacing.prod() > 20_000  # a small target, an organ
        organ_distance = ndimage.distance_transform_edt(label != 1, sampling=spacing)
        assert organ_distance[label == 2].min() <= 2  # the nodule touches the organ
        # unlabelled look-alikes of the nodule's density far from the organ
        hu = ndimage.gaussian_filter(np.asarray(image.dataobj, dtype=np.float32), 1.5)
        assert hu[organ_distance > 20].max() > 0.8 * hu[label == 2].mean()


class _Draw(Randomizable):
    """A random transform whose output is its draw: what a patch position or an augmentation would be."""

    def __call__(self, _item: int) -> float:
        return float(self.R.random())


def _seeded_items() -> EpochSeededDataset:
    return EpochSeededDataset(Dataset(list(range(6)), transform=Compose([_Draw()])))


def _epochs(items: list[float], order: list[tuple[int, int]]) -> list[tuple[list[int], list[float]]]:
    """Per epoch of 6 items: the order of the items and each one's draw."""
    return [([index for _, index in order[k : k + 6]], items[k : k + 6]) for k in range(0, len(items), 6)]


def test_epoch_seeded_items_draw_alike_in_any_worker_and_after_a_resume() -> None:
    def draws(num_workers: int, first_epoch: int = 1) -> list[tuple[list[int], list[float]]]:
        """Epochs first_epoch..2 as a run started (or resumed) at ``first_epoch`` draws them."""
        dataset = _seeded_items()
        dataset.set_epoch(first_epoch)  # what ResumableCheckpoint does at every epoch start
        sampler = EpochSeededSampler(dataset, seed=0)
        loader = DataLoader(dataset, num_workers, batch_size=2, sampler=sampler)
        batches = itertools.islice(loader, len(loader) * (3 - first_epoch))  # the sampler runs on across epochs
        order = list(itertools.islice(sampler, 6 * (3 - first_epoch)))
        return _epochs([float(value) for batch in batches for value in batch], order)

    in_process = draws(0)
    assert draws(2) == in_process  # whichever process draws
    assert draws(2, first_epoch=2) == in_process[1:]  # a run resumed at epoch 2
    (first_order, first), (second_order, second) = in_process
    assert sorted(first_order) == list(range(6)) and first_order != second_order  # each epoch its own order
    assert len(set(first)) == 6 and set(first).isdisjoint(second)  # a draw per item, others in the next epoch
    dataset = _seeded_items()
    set_rnd(dataset, epoch_seed(0, 2))  # a distributed sampler's plain indices take the current epoch's seed
    assert [dataset[index] for index in second_order] == second


def test_a_trainer_continues_the_loader_across_epochs(tmp_path: Path) -> None:
    # one iterator for the whole run: the workers prepare the next epoch's batches while an epoch ends, and each
    # epoch still gets its own items and draws
    class CountedSampler(EpochSeededSampler):
        starts = 0

        def __iter__(self):  # noqa: ANN204
            self.starts += 1
            return super().__iter__()

    dataset = _seeded_items()
    sampler = CountedSampler(dataset, seed=0)
    loader = DataLoader(dataset, 2, batch_size=2, sampler=sampler, persistent_workers=False)
    trainer = Engine(lambda engine, batch: batch.tolist())
    ResumableCheckpoint(tmp_path / "checkpoint.pt", {}, enabled=False, seed=0, dataset=dataset).attach(trainer)
    items: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: items.extend(engine.state.output))
    trainer.run(loader, max_epochs=3)
    assert sampler.starts == 1 and len(items) == 18
    order = list(itertools.islice(EpochSeededSampler(_seeded_items(), seed=0), 18))
    reference = [float(_seeded_items()[pair]) for pair in order]
    assert _epochs(items, order) == _epochs(reference, order)


def test_validation_reads_cached_cases_in_process(tiny: Path, tmp_path: Path) -> None:
    # every case in memory: no worker would have anything to load; otherwise num_workers, kept between validations
    overrides = {"dataset_dir": str(tiny), "output_dir": str(tmp_path / "run"), "num_workers": 2}
    overrides.update(patch_size=[16, 16, 8], spacing=[0.8, 0.8, 2.5])
    for cache_rate, workers in ((1.0, 0), (0.5, 2), (0.0, 2)):
        parser = bundle_parser(REPO / "bundles/unet3d/configs/train.yaml", {**overrides, "cache_rate": cache_rate})
        loader = parser.get_parsed_content("validate#dataloader")
        assert (loader.num_workers, loader.persistent_workers) == (workers, workers > 0), cache_rate


@pytest.mark.parametrize("bundle", ["unet3d", "unet2d"])
def test_training_batches_carry_plain_tensors(bundle: str, tiny: Path, tmp_path: Path) -> None:
    # MONAI's metadata rides with each patch until the last training transform, which drops it: a batch crosses
    # from the workers as its image and label alone
    patch = [16, 16, 8] if bundle == "unet3d" else [16, 16]
    overrides = {"dataset_dir": str(tiny), "output_dir": str(tmp_path / "run"), "cache_rate": 0.0, "num_workers": 0}
    overrides.update(patch_size=patch, spacing=[0.8, 0.8, 2.5 if bundle == "unet3d" else -1])
    parser = bundle_parser(REPO / "bundles" / bundle / "configs" / "train.yaml", overrides)
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert set(batch) == {"image", "label"}
    patches = parser.get_parsed_content("batch_size") * parser.get_parsed_content("num_samples")
    for key in ("image", "label"):
        assert type(batch[key]) is torch.Tensor and batch[key].shape == (patches, 1, *patch)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}


def test_missing_dataset_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'} does not exist"):
        load_dataset_json(tmp_path / "nope")


def test_missing_and_malformed_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        load_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text('{"labels": {"0": "bg"},')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text('{"labels": {"0": "bg"}, "modality": {"0": "CT"}}')
    with pytest.raises(DatasetError, match="needs a 'training' list"):
        load_dataset_json(tmp_path)


def test_listed_file_missing(tiny: Path, copy_dataset) -> None:
    broken = copy_dataset(tiny)
    (broken / "imagesTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_001.nii.gz is listed in .* but does not exist"):
        check_datalist(load_dataset_json(broken), broken, 3)


def test_image_and_label_of_different_shape(tiny: Path, copy_dataset) -> None:
    broken = copy_dataset(tiny)
    label = broken / "labelsTr" / "case_003.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), label)
    with pytest.raises(DatasetError, match=f"{label} has shape \\(5, 5, 5\\) but its image"):
        check_datalist(load_dataset_json(broken), broken, 3)


def test_a_dataset_is_checked_once_until_a_file_changes(tiny: Path, copy_dataset, monkeypatch) -> None:
    dataset = copy_dataset(tiny)
    reads = []
    check_case = dataset_check.check_case
    monkeypatch.setattr(dataset_check, "check_case", lambda *args: reads.append(args[0]) or check_case(*args))
    first = check_datalist(load_dataset_json(dataset), dataset, 3)
    assert len(reads) == len(first)
    assert check_datalist(load_dataset_json(dataset), dataset, 3) == first and len(reads) == len(first)
    label = dataset / "labelsTr" / "case_003.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), label)
    with pytest.raises(DatasetError, match=f"{label} has shape"):  # changed: checked again, every case
        check_datalist(load_dataset_json(dataset), dataset, 3)
    assert len(reads) == 2 * len(first)


def test_label_values_outside_classes(tiny: Path) -> None:
    with pytest.raises(DatasetError, match=r"case_000.nii.gz has label values \[2\] outside 0..1"):
        check_datalist(load_dataset_json(tiny), tiny, 2)


def test_config_wrappers_exit_cleanly(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="error: .*dataset.json is missing"):
        data.read_description(tmp_path)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    cases = [{"image": f"/d/case_{i:03d}.nii.gz", "label": f"/l/case_{i:03d}.nii.gz"} for i in range(10)]
    vals = []
    for fold in range(5):
        train, val = split_datalist(cases, fold, 5, seed=0)
        assert len(val) == 2 and len(train) == 8 and not {c["image"] for c in train} & {c["image"] for c in val}
        assert split_datalist(cases, fold, 5, seed=0) == (train, val)
        vals += [c["image"] for c in val]
    assert sorted(vals) == sorted(c["image"] for c in cases)
    assert split_datalist(cases, 0, 5, seed=1)[1] != split_datalist(cases, 0, 5, seed=0)[1]
    with pytest.raises(DatasetError, match="10 cases cannot make 11 folds"):
        split_datalist(cases, 0, 11)


def test_one_fold_trains_on_every_case() -> None:
    """num_folds 1 (nnU-Net's fold `all`): every case for training, none for validation; only fold 0 exists."""
    cases = [{"image": f"/d/case_{i:03d}.nii.gz", "label": f"/l/case_{i:03d}.nii.gz"} for i in range(3)]
    assert split_datalist(cases, 0, 1, seed=4) == (cases, [])
    with pytest.raises(DatasetError, match="fold=1 num_folds=1: need num_folds >= 1 and 0 <= fold < num_folds"):
        split_datalist(cases, 1, 1)
    with pytest.raises(DatasetError, match="num_folds=0"):
        split_datalist(cases, 0, 0)


def test_splits_file_overrides_folds(tmp_path: Path) -> None:
    cases = [{"image": f"/d/case_{i:03d}.nii.gz", "label": f"/l/case_{i:03d}.nii.gz"} for i in range(4)]
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["case_000", "case_001", "case_002"], "val": ["case_003"]}]))
    train, val = split_datalist(cases, 0, 5, splits_file=splits)
    assert [c["image"] for c in val] == ["/d/case_003.nii.gz"] and len(train) == 3
    assert split_datalist(cases, 0, 1, splits_file=splits) == (train, val)  # the file decides, num_folds 1 or not
    splits.write_text(json.dumps([{"train": ["case_000"], "val": ["case_999"]}]))
    with pytest.raises(DatasetError, match="case_999"):
        split_datalist(cases, 0, 5, splits_file=splits)


def test_cache_estimate_follows_resampling(tiny: Path) -> None:
    datalist = check_datalist(load_dataset_json(tiny), tiny, 3)[:1]
    shape = nib.load(datalist[0]["image"]).shape
    native = data.estimate_cache_bytes(datalist, (0.8, 0.8, 2.5))
    assert native == 2 * np.prod(shape) * 4  # image + label, float32
    assert data.estimate_cache_bytes(datalist, (1.6, 1.6, 2.5)) == pytest.approx(native / 4, rel=0.01)


def test_cache_that_would_not_fit_falls_back_to_disk(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    datalist = check_datalist(load_dataset_json(tiny), tiny, 3)
    load = LoadImaged(keys=["image", "label"])
    assert isinstance(make_dataset(datalist, load, 1.0, tmp_path / "cache", (0.8, 0.8, 2.5)), CacheDataset)
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(data.psutil, "virtual_memory", lambda: memory(available=10_000))
    with pytest.warns(UserWarning, match="caching to disk in .*cache"):
        dataset = make_dataset(datalist, load, 1.0, tmp_path / "cache", (0.8, 0.8, 2.5))
    assert isinstance(dataset, PersistentDataset)
    assert dataset[0]["image"].shape == nib.load(datalist[0]["image"]).shape


def test_the_3d_bundle_refuses_2d_images(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "flat", cases=1, seed=0, dim=2, shape=(16, 16))
    description = load_dataset_json(dataset)
    assert data.bundle_image_dims(description, dataset, network_dims=2) == 2
    with pytest.raises(DatasetError, match="lists 2D images; the 3D bundle needs volumes: .*unet2d"):
        data.bundle_image_dims(description, dataset, network_dims=3)


def test_names_from_dataset_json_are_data_never_code(tiny: Path, copy_dataset, tmp_path: Path) -> None:
    """A label, modality, dataset or case name that MONAI's parser would evaluate in the run's configs is refused
    by the data check of the user's command, every such name at once, and nothing of it runs."""
    broken = copy_dataset(tiny)
    marker = tmp_path / "planted"
    description = json.loads((broken / "dataset.json").read_text())
    description["labels"]["2"] = f"$__import__('pathlib').Path('{marker}').touch() or 'lesion'"
    description["modality"]["0"] = "@network_def"
    (broken / "imagesTr" / "case_001.nii.gz").rename(broken / "imagesTr" / "%case_001.nii.gz")
    description["training"][1]["image"] = "./imagesTr/%case_001.nii.gz"
    (broken / "dataset.json").write_text(json.dumps(description))
    out = tmp_path / "run"
    result = run_bundle(
        "bundles/unet3d/configs/train.yaml", {**SMALL_3D, "dataset_dir": broken, "output_dir": out}, check=False
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("error: ") :]
    assert f"{broken / 'dataset.json'} holds names that cannot be used" in message
    assert "labels '2': \"$__import__" in message and "modality '0': '@network_def' starts with '@'" in message
    assert "training[1] image: '%case_001.nii.gz' starts with '%'" in message
    assert "rename it without '$' at its start" in message
    assert not marker.exists() and not (out / "configs").exists()


def test_every_unreadable_image_is_reported_the_first_one_too(tiny: Path, copy_dataset, tmp_path: Path) -> None:
    """The first image decides 2D or 3D; when it cannot be read, the next one does, and the data check names both
    broken cases instead of stopping at the first."""
    broken = copy_dataset(tiny)
    description = json.loads((broken / "dataset.json").read_text())
    description["training"][0]["image"] = "../outside/case_000.nii.gz"
    description["training"][2]["label"] = "/nonexistent/case_002.nii.gz"
    (broken / "dataset.json").write_text(json.dumps(description))
    result = run_bundle("bundles/unet3d/configs/train.yaml", {**SMALL_3D, "dataset_dir": broken}, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: 2 of 5 cases cannot be used" in result.stderr
    assert f"{broken.parent / 'outside/case_000.nii.gz'} is listed in dataset.json but does not exist" in result.stderr
    assert "/nonexistent/case_002.nii.gz is listed in dataset.json but does not exist" in result.stderr
