"""`data_device`: the cache and the augmentation on the training device (MONAI's fast-training pattern) or in worker
processes; the same draws either way, the decision and its reasons, and validation's share of the training time.

The device path takes a ``torch.device``, so these tests run it with the CPU as the device; the CUDA tests skip
without a GPU."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import CacheDataset, ThreadDataLoader
from monai.transforms import Randomizable, ToDeviced

from custom_components import data_device, settings, training_report
from custom_components.data_device import DataDeviceError, decide, read_data_device
from custom_components.step_measure import bundle_parser
from custom_components.synthetic import write_dataset
from custom_components.training_report import TrainingReport
from tests.conftest import REPO, SMALL_3D, read_metrics, run_bundle

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GIB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny") / "ds", cases=5, seed=3, shape=(24, 24, 8))


def _parser(bundle: str, dataset: Path, out: Path, **keys: object) -> ConfigParser:
    """The bundle's train.yaml on ``dataset`` with small patches and ``keys`` set on top."""
    patch = [16, 16, 8] if bundle == "unet3d" else [16, 16]
    overrides = {"dataset_dir": str(dataset), "output_dir": str(out), "num_workers": 2, "patch_size": patch}
    overrides["spacing"] = [0.8, 0.8, 2.5 if bundle == "unet3d" else -1]
    return bundle_parser(REPO / "bundles" / bundle / "configs" / "train.yaml", {**overrides, **keys})


def _batches(parser: ConfigParser, count: int, first_epoch: int = 1) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` training batches of a run started (or resumed) at ``first_epoch``."""
    parser.get_parsed_content("train#dataset").set_epoch(first_epoch)  # what ResumableCheckpoint does
    loader = parser.get_parsed_content("train#dataloader")
    return list(itertools.islice(loader, count))


def test_auto_takes_the_gpu_when_the_cache_fits_and_says_why() -> None:
    cuda = torch.device("cuda")
    fits = decide("auto", cuda, cache_bytes=1 * GIB, cache_rate=1.0, free_bytes=10 * GIB)
    assert fits.device == cuda and "within 30% of 10.00 GiB free" in fits.reason
    too_big = decide("auto", cuda, cache_bytes=4 * GIB, cache_rate=1.0, free_bytes=10 * GIB)
    assert too_big.device is None and "over 30%" in too_big.reason
    partial = decide("auto", cuda, cache_bytes=0.5 * GIB, cache_rate=0.5, free_bytes=10 * GIB)
    assert partial.device is None and "cache_rate 0.5" in partial.reason
    on_cpu = decide("auto", "cpu", cache_bytes=0, cache_rate=1.0, free_bytes=None)
    assert on_cpu.device is None and on_cpu.reason == "training on cpu"
    assert decide("cpu", cuda, cache_bytes=1, cache_rate=1.0, free_bytes=10 * GIB).device is None
    assert decide("cuda", cuda, cache_bytes=4 * GIB, cache_rate=1.0, free_bytes=10 * GIB).device == cuda
    with pytest.raises(DataDeviceError, match=r"data_device = cuda: .* than the 2.00 GiB free .* lower cache_rate"):
        decide("cuda", cuda, cache_bytes=3 * GIB, cache_rate=1.0, free_bytes=2 * GIB)
    with pytest.raises(DataDeviceError, match="data_device = cuda: device is cpu; set data_device to auto or cpu"):
        decide("cuda", "cpu", cache_bytes=0, cache_rate=1.0, free_bytes=None)


def test_a_data_device_that_is_not_a_choice_is_refused() -> None:
    problems = settings.check({"data_device": "gpu"}, REPO / "bundles" / "unet3d")
    assert [problem.key for problem in problems] == ["data_device"]
    assert "auto" in problems[0].fix and "cuda" in problems[0].fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of data_device cuda needs a machine without GPU")
def test_cuda_without_a_gpu_stops_before_anything_is_read(tiny: Path, tmp_path: Path) -> None:
    assert "set data_device to auto" in data_device.data_device_problem("cuda", "cpu")
    out = tmp_path / "run"
    result = run_bundle(
        "bundles/unet3d/configs/train.yaml",
        {**SMALL_3D, "dataset_dir": tiny, "output_dir": out, "data_device": "cuda"},
        check=False,
    )
    assert result.returncode != 0
    assert "error: data_device = cuda: this machine has no GPU" in result.stderr
    assert "set data_device to auto" in result.stderr
    assert not out.exists()  # stopped before the run folder was locked, let alone a case read


@pytest.mark.parametrize("bundle", ["unet3d", "unet2d"])
def test_the_device_path_draws_the_batches_of_the_worker_processes(bundle: str, tiny: Path, tmp_path: Path) -> None:
    # the cache on a device, patches cut and augmented there, batches from ThreadDataLoader's thread: here with the
    # CPU as the device, the same batches in the same order as the worker processes give, and the same after a resume
    workers = _parser(bundle, tiny, tmp_path / "workers")  # data_device auto on a machine without GPU: cpu
    assert workers.get_parsed_content("data_on_device") is None
    assert workers.get_parsed_content("train#dataloader").num_workers == 2
    on_device = _parser(bundle, tiny, tmp_path / "device", data_on_device="$torch.device('cpu')")
    loader = on_device.get_parsed_content("train#dataloader")
    assert isinstance(loader, ThreadDataLoader) and loader.num_workers == 0
    cache = on_device.get_parsed_content("train#dataset").dataset
    assert isinstance(cache, CacheDataset) and cache.cache_num == len(cache)
    chain = cache.transform.transforms
    first_random = next(index for index, transform in enumerate(chain) if isinstance(transform, Randomizable))
    assert any(isinstance(transform, ToDeviced) for transform in chain[:first_random])  # cached on the device
    assert on_device.get_parsed_content("validate#dataloader").num_workers == 0
    epoch = len(loader)
    expected = _batches(workers, 3 * epoch)
    assert not torch.equal(expected[0]["image"], expected[epoch]["image"])  # each epoch its own draws
    drawn = _batches(on_device, 3 * epoch)
    resumed_parser = _parser(bundle, tiny, tmp_path / "resumed", data_on_device="$torch.device('cpu')")
    resumed = _batches(resumed_parser, 2 * epoch, first_epoch=2)
    for got, want in ((drawn, expected), (resumed, expected[epoch:])):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_validation_share_is_the_evaluators_time_over_the_training_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    monkeypatch.setattr(training_report.time, "perf_counter", lambda: now[0])

    def validate(engine: Engine, batch: int) -> None:
        now[0] += 3.0
        engine.state.metrics.update(val_mean_dice=0.5)

    def step(engine: Engine, batch: int) -> dict[str, float]:
        now[0] += 1.0
        return {"loss": 0.5}

    trainer, evaluator = Engine(step), Engine(validate)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run([0], max_epochs=engine.state.epoch))
    report = TrainingReport(tmp_path, evaluator, torch.nn.Linear(2, 2), ["organ"])
    monkeypatch.setattr(report, "_plot", lambda: None)
    report.attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    metrics = read_metrics(tmp_path)
    # 2 epochs of 2 steps of 1 s and a validation of 3 s: 6 of 10 s validating, 4 in the steps
    assert metrics["training_time_s"] == pytest.approx(10.0)
    assert metrics["validation_share"] == pytest.approx(0.6) and metrics["overhead_share"] == pytest.approx(0.6)
    resumed = TrainingReport(tmp_path, evaluator, torch.nn.Linear(2, 2), ["organ"])
    resumed.load_state_dict({**report.state_dict(), "validation_time": None})  # a checkpoint from before the share
    assert resumed._validation_share() is None


@GPU
def test_auto_caches_a_small_dataset_on_the_gpu(tiny: Path, tmp_path: Path) -> None:
    parser = _parser("unet3d", tiny, tmp_path / "run")
    cases = [parser.get_parsed_content("data#train"), parser.get_parsed_content("data#val")]
    assert read_data_device("auto", "cuda", cases, [0.8, 0.8, 2.5], 1.0) == torch.device("cuda")
    assert read_data_device("auto", "cuda", cases, [0.8, 0.8, 2.5], 0.5) is None


@GPU
def test_on_the_gpu_the_batches_are_the_worker_processes_up_to_rounding(tiny: Path, tmp_path: Path) -> None:
    workers = _parser("unet3d", tiny, tmp_path / "workers", data_device="cpu")
    on_gpu = _parser("unet3d", tiny, tmp_path / "gpu", data_device="cuda")
    assert on_gpu.get_parsed_content("data_on_device") == torch.device("cuda")
    assert on_gpu.get_parsed_content("validate#dataset")[0]["image"].device.type == "cuda"
    count = 2 * len(on_gpu.get_parsed_content("train#dataloader"))
    for a, b in zip(_batches(on_gpu, count), _batches(workers, count), strict=True):
        assert a["image"].device.type == "cuda" and b["image"].device.type == "cpu"
        assert torch.allclose(a["image"].cpu(), b["image"], atol=1e-4)
        assert (a["label"].cpu() != b["label"]).float().mean() < 1e-3  # nearest-neighbour ties may round otherwise
