"""Training to a deadline (`time_budget_min`) and stopping when learning stops (`early_stop_patience`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from custom_components.checkpoint import ResumableCheckpoint
from custom_components.stopping import TimeBudget
from tests.conftest import SMALL_3D, read_metrics, run_bundle

TRAIN_3D = "bundles/unet3d/configs/train.yaml"


class _Clock:
    """A clock that advances only when told: epochs of a known length, no waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_schedule_is_stretched_over_the_budget_and_ends_at_its_minimum() -> None:
    clock = _Clock()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    budget = TimeBudget(minutes=1.0, lr_scheduler=schedule, schedule_epochs=100, clock=clock)
    rates: list[float] = []

    def epoch(engine: Engine, _batch: object) -> None:
        clock.now += 7.0 / 3  # three iterations: 7 s an epoch
        if engine.state.iteration % 3 == 0:
            rates.append(optimizer.param_groups[0]["lr"])

    trainer = Engine(epoch)
    budget.attach(trainer)
    trainer.run(range(3), max_epochs=1000)
    # 8 epochs are 56 s: a 9th ends at 63 s, nearer 60 than stopping 4 s early; a 10th would not fit
    assert trainer.state.epoch == 9 and clock.now == pytest.approx(63.0)
    assert "time budget of 1 min reached: 9 epochs" in trainer.state.stop_reason
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule's end
    assert rates[0] == 1.0 and all(later <= earlier for earlier, later in zip(rates, rates[1:], strict=False))
    assert budget.state_dict()["elapsed_s"] == pytest.approx(63.0)


def test_a_resumed_budget_run_has_the_rest_of_the_budget() -> None:
    clock = _Clock()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50)
    budget = TimeBudget(minutes=1.0, lr_scheduler=schedule, schedule_epochs=50, clock=clock)
    trainer = Engine(lambda engine, batch: setattr(clock, "now", clock.now + 7.0))

    def resume(engine: Engine) -> None:  # what ResumableCheckpoint does when the run starts again
        engine.state.epoch = 6
        budget.load_state_dict({"elapsed_s": 42.0})  # six 7 s epochs before the interruption

    trainer.add_event_handler(Events.STARTED, resume)
    budget.attach(trainer)
    trainer.run(range(1), max_epochs=1000)
    assert trainer.state.epoch == 9 and budget.elapsed() == pytest.approx(63.0)  # 21 s more, not 63


def test_a_one_minute_budget_ends_within_five_percent_with_the_rate_annealed(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "val_interval": 2, "max_epochs": 50}
    run_bundle(TRAIN_3D, {**overrides, "time_budget_min": 1})
    metrics = read_metrics(out)
    assert 57 <= metrics["training_time_s"] <= 63, metrics["training_time_s"]
    assert metrics["epochs"] > 2 and f"{metrics['epochs']} epochs" in metrics["stopped"]
    assert metrics["stopped"].startswith("time budget of 1 min reached")
    assert metrics["final_learning_rate"] == pytest.approx(0.0, abs=1e-9)  # warm-up cosine annealed to its end


def test_early_stopping_ends_a_run_that_cannot_learn_and_it_stays_ended(dataset3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {**SMALL_3D, "dataset_dir": dataset3d, "output_dir": out, "max_epochs": 10, "val_interval": 1}
    overrides |= {"learning_rate": 0, "early_stop_patience": 2}
    run_bundle(TRAIN_3D, overrides)
    metrics = read_metrics(out)
    # the first validation sets the best score, two more without a better one stop the run
    assert metrics["epochs"] == 3
    assert metrics["stopped"].startswith("early stopping: no better val_mean_dice in 2 validations")
    result = run_bundle(TRAIN_3D, overrides)  # started again: it ended, nothing more to train
    assert read_metrics(out)["epochs"] == 3
    assert "this run already ended (early stopping" in result.stdout + result.stderr


@pytest.mark.parametrize(("stop_at", "saved"), [(None, [3, 6, 7]), (5, [3, 5])])
def test_checkpoint_is_written_at_its_interval_after_the_last_epoch_and_at_a_stop(
    tmp_path: Path, stop_at: int | None, saved: list[int]
) -> None:
    clock = _Clock()
    network = torch.nn.Linear(1, 1)
    checkpoint = ResumableCheckpoint(tmp_path / "last.pt", {"network": network}, interval_min=1.0, clock=clock)

    def epoch(engine: Engine, _batch: object) -> None:
        clock.now += 25.0  # an epoch of 25 s: the 1-minute interval is passed after epochs 3 and 6

    trainer = Engine(epoch)
    if stop_at is not None:  # a time budget or early stopping ending the run
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_at), lambda engine: engine.terminate())
    checkpoint.attach(trainer)  # registers its saves when the run starts, after the stop above
    writes: list[int] = []
    original = checkpoint.save
    checkpoint.save = lambda engine: (writes.append(engine.state.epoch), original(engine))  # type: ignore[method-assign]
    trainer.run([0], max_epochs=7)
    assert writes == saved
    assert torch.load(tmp_path / "last.pt", weights_only=True)["engine"]["iteration"] == saved[-1]  # one per epoch
