"""The pieces that let one code path serve one process and torchrun (the two-process run itself is in
tests/nsynth/test_cli.py)."""
import numpy as np
import pytest

from rnn_fast.nsynth.training.distributed import Distributed, shard_bounds


@pytest.mark.parametrize("count,world_size", [(10, 3), (2, 3), (61, 2), (7, 1)])
def test_evaluation_shards_cover_every_example_once(count, world_size):
    covered = np.concatenate([np.arange(count)[shard_bounds(count, Distributed(rank, world_size))]
                              for rank in range(world_size)])
    np.testing.assert_array_equal(covered, np.arange(count))
