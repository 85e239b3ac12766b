"""The toolkit's training loop: resumed batches, recorded steps, accumulation, clipping, the fast-dev stop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from harness.engine.support.checkpoint import Position
from harness.engine.support.progress import Progress
from harness.toolkit.training import cycle_ends, optimiser_step, train_batches


@dataclass
class _Context:
    fast_dev_run: bool = False
    progress: Progress = Progress(False)

    def stop_early(self, steps: int) -> bool:
        return self.fast_dev_run and steps >= 2


def _batches(n):
    return lambda epoch, first: ((index, (epoch, index)) for index in range(n))


def test_every_batch_once_and_one_step_each():
    position = Position("stage")
    ends = []
    seen = [(s.epoch, s.index, s.data, s.boundary)
            for s in train_batches(_Context(), position, 2, _batches(3), on_epoch_end=ends.append)]
    assert seen == [(e, i, (e, i), True) for e in range(2) for i in range(3)]
    assert (position.epoch, position.batch, position.steps) == (1, 3, 6) and ends == [0, 1]


def test_a_resumed_stage_skips_what_it_consumed():
    position = Position("stage", epoch=1, batch=2, steps=5)
    seen = [(s.epoch, s.index) for s in train_batches(_Context(), position, 3, _batches(3))]
    assert seen == [(1, 2), (2, 0), (2, 1), (2, 2)] and position.steps == 9
    assert list(train_batches(_Context(), Position("stage", done=True), 3, _batches(3))) == []


def test_accumulation_steps_at_the_end_of_each_cycle_and_of_the_epoch():
    position = Position("stage")
    seen = [s.boundary for s in train_batches(_Context(), position, 1, _batches(5), accumulate=2,
                                              n_batches=lambda epoch: 5)]
    assert seen == [False, True, False, True, True] and position.steps == 3
    assert [cycle_ends(5, 2, i) for i in range(5)] == seen
    with pytest.raises(ValueError, match="n_batches"):
        list(train_batches(_Context(), Position("s"), 1, _batches(5), accumulate=2))


def test_a_fast_dev_run_stops_after_its_steps_and_still_ends_the_epoch():
    position, ends = Position("stage"), []
    seen = [(s.epoch, s.index) for s in train_batches(_Context(fast_dev_run=True), position, 3, _batches(4),
                                                        on_epoch_end=ends.append)]
    assert seen == [(0, 0), (0, 1)] and position.steps == 2 and ends == [0]


def test_a_body_that_raises_records_no_step():
    position = Position("stage")
    with pytest.raises(RuntimeError):
        for _ in train_batches(_Context(), position, 1, _batches(3)):
            raise RuntimeError("boom")
    assert position.steps == 0


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(3, 4), torch.randn(3, 1)) for _ in range(4)]
    return model, data


def test_optimiser_step_is_the_plain_loop_and_accumulates_the_mean():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    plain, data = _model_and_data()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(plain(x), y).backward()
        opt.step()
    shared, _ = _model_and_data()
    opt = torch.optim.SGD(shared.parameters(), lr=0.1)
    for x, y in data:
        optimiser_step(torch.nn.functional.mse_loss(shared(x), y), [opt], scaler)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), shared.state_dict().values()))
    # Two batches accumulated step once, with the mean of their gradients.
    summed, _ = _model_and_data()
    opt = torch.optim.SGD(summed.parameters(), lr=0.1)
    for index, (x, y) in enumerate(data[:2]):
        optimiser_step(torch.nn.functional.mse_loss(summed(x), y), [opt], scaler, accumulate=2,
                       boundary=index == 1)
    assert all(p.grad is None for p in summed.parameters())
    both, _ = _model_and_data()
    grads = torch.autograd.grad(sum(torch.nn.functional.mse_loss(both(x), y) for x, y in data[:2]) / 2,
                                list(both.parameters()))
    expected = [p - 0.1 * g for p, g in zip(both.parameters(), grads)]
    assert all(torch.allclose(p, e, atol=1e-7) for p, e in zip(summed.parameters(), expected))


def test_optimiser_step_clips_the_global_norm():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, data = _model_and_data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = data[0]
    optimiser_step(torch.nn.functional.mse_loss(model(x), y) * 1e6, [opt], scaler, clip=(model.parameters(), 0.5))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(0.5, rel=1e-4)
