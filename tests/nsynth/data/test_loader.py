import numpy as np
import pytest
import torch

from rnn_fast.nsynth.data import BatchLoader, load_split, save_split, waveform_to_frames
from rnn_fast.nsynth.data.loader import _copy_to_device

from .. import indexed_split, rows_of

COUNT = 50


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A memory-mapped split, as training reads it."""
    directory = tmp_path_factory.mktemp("cache")
    save_split(directory, "train", indexed_split(COUNT))
    return load_split(directory, "train")


def served_rows(loader):
    return [rows_of(x) for x, _ in loader]


@pytest.mark.parametrize("on_device", [False, True], ids=["memmap", "in-memory"])
def test_batches_hold_scaled_rows_and_their_labels(split, on_device):
    loader = BatchLoader(split, 8, on_device=on_device)
    assert len(loader) == COUNT // 8
    seen = []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.shape == (8, 100, 160) and x.device.type == "cpu"
        assert y.dtype == torch.int64 and y.shape == (8,)
        rows = rows_of(x)
        expected = torch.from_numpy(np.asarray(split.audio)[rows].astype(np.float32) / 32768).view(8, 100, 160)
        assert torch.equal(x, expected)
        assert torch.equal(y, torch.from_numpy(split.labels[rows]))
        seen.extend(rows)
    assert sorted(seen) == sorted(loader.indices()[:len(seen)])


def test_in_memory_and_memmap_serve_the_same_batches(split):
    mapped = list(BatchLoader(split, 7, seed=4))
    in_memory = list(BatchLoader(split, 7, seed=4, on_device=True))
    assert len(mapped) == len(in_memory) == COUNT // 7
    for (x_mapped, y_mapped), (x_memory, y_memory) in zip(mapped, in_memory):
        assert torch.equal(x_mapped, x_memory) and torch.equal(y_mapped, y_memory)


@pytest.mark.parametrize("on_device", [False, True], ids=["copied-per-batch", "resident"])
def test_accelerator_paths_put_batches_on_the_device(split, on_device):
    """The paths for a non-CPU device, run on the meta device (shapes, dtypes and placement; no values)."""
    loader = BatchLoader(split, 8, device="meta", on_device=on_device)
    batches = list(loader)
    assert len(batches) == len(loader)
    for x, y in batches:
        assert x.device.type == y.device.type == "meta"
        assert x.dtype == torch.float32 and x.shape == (8, 100, 160)
        assert y.dtype == torch.int64 and y.shape == (8,)


def test_resident_copy_is_made_slice_by_slice(split):
    resident = _copy_to_device(split.audio, torch.device("cpu"), rows_per_copy=7)
    assert resident.dtype == torch.int16 and torch.equal(resident, torch.from_numpy(np.array(split.audio)))


def test_order_depends_only_on_seed_and_epoch(split):
    loader = BatchLoader(split, 10, seed=1)
    epoch0 = served_rows(loader)
    assert [rows.tolist() for rows in epoch0] == [rows.tolist() for rows in served_rows(BatchLoader(split, 10, seed=1))]
    loader.set_epoch(1)
    epoch1 = served_rows(loader)
    assert sorted(np.concatenate(epoch1)) == sorted(np.concatenate(epoch0)) == list(range(COUNT))
    assert [rows.tolist() for rows in epoch1] != [rows.tolist() for rows in epoch0]
    loader.set_epoch(0)
    assert [rows.tolist() for rows in served_rows(loader)] == [rows.tolist() for rows in epoch0]
    other_seed = served_rows(BatchLoader(split, 10, seed=2))
    assert [rows.tolist() for rows in other_seed] != [rows.tolist() for rows in epoch0]


def test_without_shuffle_rows_come_in_order(split):
    rows = np.concatenate(served_rows(BatchLoader(split, 16, shuffle=False, drop_last=False)))
    assert rows.tolist() == list(range(COUNT))


@pytest.mark.parametrize("batch_size, drop_last, sizes", [
    (8, True, [8] * 6), (8, False, [8] * 6 + [2]), (50, True, [50]), (64, True, []), (64, False, [50]),
], ids=["B8-drop", "B8-keep", "B50-drop", "B64-drop", "B64-keep"])
def test_drop_last(split, batch_size, drop_last, sizes):
    loader = BatchLoader(split, batch_size, drop_last=drop_last)
    batches = served_rows(loader)
    assert len(loader) == len(sizes) and [len(rows) for rows in batches] == sizes
    rows = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert len(set(rows.tolist())) == len(rows)
    if not drop_last:
        assert sorted(rows.tolist()) == list(range(COUNT))


@pytest.mark.parametrize("world_size, drop_last", [(2, True), (2, False), (3, True), (3, False), (7, False)],
                         ids=["W2-drop", "W2-keep", "W3-drop", "W3-keep", "W7-keep"])
def test_ranks_shard_like_distributed_sampler(split, world_size, drop_last):
    loaders = [BatchLoader(split, 4, seed=5, drop_last=drop_last, rank=rank, world_size=world_size)
               for rank in range(world_size)]
    assert len({len(loader) for loader in loaders}) == 1
    shards = [loader.indices() for loader in loaders]
    assert len({len(shard) for shard in shards}) == 1
    every_row = np.concatenate(shards).tolist()
    if drop_last:  # disjoint, leaving out fewer rows than there are ranks
        assert len(set(every_row)) == len(every_row) == COUNT - COUNT % world_size
    else:  # covering, repeating fewer rows than there are ranks
        assert set(every_row) == set(range(COUNT))
        assert len(every_row) - COUNT < world_size
    for loader, shard in zip(loaders, shards):
        served = np.concatenate(served_rows(loader))
        assert sorted(served.tolist()) == sorted(shard[:len(served)].tolist())


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch(split, world_size):
    """With batch_size = global batch / world_size, step b of all ranks together is the one-process step b."""
    global_batches = served_rows(BatchLoader(split, 12, seed=7))
    rank_batches = [served_rows(BatchLoader(split, 12 // world_size, seed=7, rank=rank, world_size=world_size))
                    for rank in range(world_size)]
    assert all(len(batches) == len(global_batches) for batches in rank_batches)
    for step, rows in enumerate(global_batches):
        assert sorted(np.concatenate([batches[step] for batches in rank_batches]).tolist()) == sorted(rows.tolist())


def test_rejects_bad_arguments(split):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        BatchLoader(split, 0)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        BatchLoader(split, 4, rank=2, world_size=2)


def test_waveform_to_frames_scales_int16_into_unit_range():
    audio = np.zeros((2, 16000), dtype=np.int16)
    audio[0, :3] = (-32768, 32767, 16384)
    frames = waveform_to_frames(audio)
    assert frames.dtype == torch.float32 and frames.shape == (2, 100, 160)
    assert frames[0, 0, :3].tolist() == [-1.0, 32767 / 32768, 0.5]
    assert torch.equal(frames, waveform_to_frames(torch.from_numpy(audio)))


@pytest.mark.parametrize("make", [np.asarray, torch.as_tensor], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_waveform_to_frames_keeps_float_audio(make, dtype):
    original = np.random.default_rng(0).uniform(-1, 1, (3, 16011)).astype(dtype)
    audio = make(original.copy())
    frames = waveform_to_frames(audio)
    assert frames.dtype == torch.float32 and frames.shape == (3, 100, 160)
    np.testing.assert_allclose(frames.reshape(3, -1).numpy(), original[:, :16000], rtol=1e-7, atol=0)
    frames.zero_()
    np.testing.assert_array_equal(np.asarray(audio), original)  # the frames are a copy


def test_waveform_to_frames_single_clip_and_errors():
    assert waveform_to_frames(np.zeros(64000, dtype=np.int16)).shape == (100, 160)
    with pytest.raises(ValueError, match="need at least 16000 samples"):
        waveform_to_frames(np.zeros((1, 15999), dtype=np.int16))
    with pytest.raises(TypeError, match="int16 or floating point"):
        waveform_to_frames(np.zeros((1, 16000), dtype=np.int32))
    with pytest.raises(TypeError, match="int16 or floating point"):
        waveform_to_frames(torch.zeros((1, 16000), dtype=torch.int32))
