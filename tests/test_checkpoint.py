"""State files without pickle, and mid-fit checkpoints that resume exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from harness.engine.support import signals
from harness.engine.support.checkpoint import TrainingCheckpoint
from harness.engine.support.state_io import DamagedStateError, UnsupportedStateError, load_state, read_info, save_state


def test_state_files_round_trip_nested_state_without_pickle(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"net": net.state_dict(), "opt": opt.state_dict(), "names": ["a", "b"], "k": 3, "nan": float("nan"),
             "pair": (1, "x"), "rng": np.random.default_rng(4).bit_generator.state, "array": np.arange(3),
             "py": random.getstate()}
    save_state(tmp_path / "s.safetensors", state, info={"step": 5})
    loaded, info = load_state(tmp_path / "s.safetensors")
    assert info == {"step": 5} and read_info(tmp_path / "s.safetensors") == {"step": 5}
    assert torch.equal(loaded["net"]["weight"], net.state_dict()["weight"])
    assert loaded["opt"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert set(loaded["opt"]["state"]) == {0, 1}  # int keys survive
    assert loaded["names"] == ["a", "b"] and loaded["pair"] == (1, "x") and np.isnan(loaded["nan"])
    assert loaded["rng"] == state["rng"] and np.array_equal(loaded["array"], np.arange(3))
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(loaded["opt"])


def test_values_that_need_pickle_are_refused_with_their_path(tmp_path):
    with pytest.raises(UnsupportedStateError, match="extra/fn"):
        save_state(tmp_path / "s.safetensors", {"extra": {"fn": lambda: 1}})
    assert not (tmp_path / "s.safetensors").exists()


def test_truncated_and_foreign_files_are_damaged_not_crashes(tmp_path):
    save_state(tmp_path / "s.safetensors", {"w": torch.ones(1000)})
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95")
    for name in ("cut", "pickle"):
        with pytest.raises(DamagedStateError, match=name):
            load_state(tmp_path / f"{name}.safetensors")


def _train(checkpoint: TrainingCheckpoint, stop_after: int | None = None, epochs: int = 3, batches: int = 4):
    """A tiny two-stage fit written like a method's, with global and private randomness."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    done = 0
    with checkpoint.stage("warmup", net=net) as position:
        if not position.done:
            with torch.no_grad():
                net.weight.add_(torch.randn(1, 4))
    with checkpoint.stage("train", net=net, opt=opt, rng=rng) as position:
        for epoch in range(position.epoch, epochs):
            for index in range(batches):
                if position.skip(epoch, index):
                    continue
                x = torch.randn(8, 4) + float(rng.normal())
                loss = (net(x) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                position.step(epoch=epoch, batch=index + 1)
                if stop_after is not None and done == stop_after:
                    raise RuntimeError("killed")
    return net.weight.detach().clone(), done


def test_a_fit_stopped_halfway_resumes_to_the_same_state(tmp_path):
    reference, steps = _train(TrainingCheckpoint(None))
    assert steps == 12
    first = TrainingCheckpoint(tmp_path, interval=0)
    with pytest.raises(RuntimeError, match="killed"):
        _train(first, stop_after=5)
    second = TrainingCheckpoint(tmp_path, interval=0)
    resumed, done = _train(second)
    assert done == 7  # only the remaining steps ran
    assert second.resumed_from["stage"] == "train" and second.resumed_from["step"] == 5
    assert torch.equal(resumed, reference)
    assert len(second.files()) == 2  # only the newest ones are kept


def test_a_damaged_checkpoint_is_moved_aside_and_an_older_one_used(tmp_path):
    reference, _ = _train(TrainingCheckpoint(None))
    with pytest.raises(RuntimeError):
        _train(TrainingCheckpoint(tmp_path, interval=0, keep=3), stop_after=6)
    newest = TrainingCheckpoint(tmp_path).files()[0]
    newest.write_bytes(newest.read_bytes()[:100])
    messages = []
    resumed, done = _train(TrainingCheckpoint(tmp_path, interval=0, notify=messages.append))
    assert torch.equal(resumed, reference) and done == 7
    assert any("damaged" in m and newest.name in m for m in messages)
    assert (tmp_path / (newest.name + ".corrupt")).exists()


def test_a_stop_request_saves_at_the_next_step_and_raises(tmp_path, monkeypatch):
    checkpoint = TrainingCheckpoint(tmp_path, interval=1e9)
    monkeypatch.setattr(signals, "_requested", 15)
    with pytest.raises(signals.RunInterrupted) as stop:
        _train(checkpoint)
    monkeypatch.setattr(signals, "_requested", None)
    assert stop.value.exit_code == 143
    assert checkpoint.files(), "the interrupted stage left a checkpoint"
    reference, _ = _train(TrainingCheckpoint(None))
    assert torch.equal(_train(TrainingCheckpoint(tmp_path))[0], reference)


def test_objects_without_state_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="thing"):
        with TrainingCheckpoint(tmp_path).stage("s", thing=object()):
            pass
