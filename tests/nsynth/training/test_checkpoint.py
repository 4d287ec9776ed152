"""Checkpoints: RNG states round-trip through a weights-only load, and a failed write keeps the previous file."""
import random

import numpy as np
import pytest
import torch

from rnn_fast.nsynth.training.checkpoint import load_checkpoint, save_checkpoint
from rnn_fast.nsynth.training.rng import capture_rng_state, restore_rng_state


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only=True load
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def torn_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
