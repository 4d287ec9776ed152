"""Batches of ``[B, FRAMES, FRAME_SIZE]`` float frames straight from a prepared split."""
import math
from typing import Iterator, Tuple, Union

import numpy as np
import torch

from .cache import NSynthSplit
from .families import CLIP_SAMPLES, FRAME_SIZE, FRAMES

INT16_SCALE = 1.0 / 32768  # int16 -> [-1, 1)


def waveform_to_frames(audio: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """int16 or float ``[..., >= CLIP_SAMPLES]`` -> float32 ``[..., FRAMES, FRAME_SIZE]`` of the first second.

    int16 is scaled by 1/32768 into [-1, 1); floating-point audio is taken as already in that range.
    """
    leading = tuple(audio.shape[:-1])
    if audio.shape[-1] < CLIP_SAMPLES:
        raise ValueError(f"need at least {CLIP_SAMPLES} samples (1 s at 16 kHz), got {audio.shape[-1]}")
    clip = audio[..., :CLIP_SAMPLES]
    if isinstance(clip, torch.Tensor) and clip.device.type == "cpu" and clip.dtype == torch.int16:
        clip = clip.numpy()  # numpy converts int16 to float several times faster than torch does on CPU
    if isinstance(clip, np.ndarray):
        if clip.dtype == np.int16:
            clip = np.multiply(clip, np.float32(INT16_SCALE), dtype=np.float32)
        elif np.issubdtype(clip.dtype, np.floating):
            clip = clip.astype(np.float32)
        else:
            raise TypeError(f"audio must be int16 or floating point, got {clip.dtype}")
        frames = torch.from_numpy(clip)
    elif clip.dtype == torch.int16:
        frames = clip.to(torch.float32).mul_(INT16_SCALE)
    elif clip.is_floating_point():
        frames = clip.to(torch.float32, copy=True)
    else:
        raise TypeError(f"audio must be int16 or floating point, got {clip.dtype}")
    return frames.reshape(*leading, FRAMES, FRAME_SIZE)


class BatchLoader:
    """Iterates ``(x, y)``: ``x`` float32 ``[B, FRAMES, FRAME_SIZE]`` in [-1, 1), ``y`` int64 class ``[B]``.

    The order is a permutation drawn from ``(seed, epoch)`` (``set_epoch`` moves to another one), sharded over
    ``world_size`` ranks like ``DistributedSampler`` (rank r takes every world_size-th example from position r):
    every rank gets the same number of batches; with ``drop_last`` the shards are truncated to equal size and
    disjoint, otherwise they are padded by repeating examples (so they cover the split) and the last batch may
    be short. With ``batch_size = global_batch / world_size``, step b of all ranks together holds exactly the
    examples of step b of one process with ``global_batch``. Inside a batch the examples are in row order, so
    reads from the memory-mapped cache go forward through the file. ``on_device=True`` copies the whole split
    to ``device`` once (into RAM for the CPU) and gathers batches there.
    """

    def __init__(self, split: NSynthSplit, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, device: Union[str, torch.device] = "cpu", on_device: bool = False, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(split) == 0:
            raise ValueError("cannot load batches from an empty split")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.device = torch.device(device)
        self.on_device = on_device
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        count = len(split)
        self.per_rank = count // world_size if drop_last else math.ceil(count / world_size)
        labels = torch.from_numpy(np.ascontiguousarray(split.labels, dtype=np.int64))
        # On the CPU numpy gathers and converts fastest; on an accelerator torch does, next to the data.
        self._gather_on_device = on_device and self.device.type != "cpu"
        if self._gather_on_device:
            self._audio = _copy_to_device(split.audio, self.device)
            self._labels = labels.to(self.device)
        else:
            self._audio = np.array(split.audio) if on_device else split.audio
            self._labels = labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def indices(self) -> np.ndarray:
        """This rank's example indices for the current epoch, in the order batches take them."""
        count = len(self.split)
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(count) if self.shuffle
                 else np.arange(count))
        # Truncate, or pad by cycling through the order again, so that every rank gets per_rank examples.
        order = np.resize(order, self.per_rank * self.world_size)
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        indices = self.indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self._batch(np.sort(indices[start:start + self.batch_size]))

    def _batch(self, rows: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._gather_on_device:
            rows_on_device = torch.from_numpy(rows).to(self.device)
            return (waveform_to_frames(self._audio.index_select(0, rows_on_device)),
                    self._labels.index_select(0, rows_on_device))
        audio = np.take(self._audio, rows, axis=0)
        labels = self._labels[torch.from_numpy(rows)]
        if self.device.type == "cpu":
            return waveform_to_frames(audio), labels
        # Cross the bus as int16, half the bytes of float32, and convert on the device.
        return waveform_to_frames(torch.from_numpy(audio).to(self.device)), labels.to(self.device)


def _copy_to_device(audio: np.ndarray, device: torch.device, rows_per_copy: int = 8192) -> torch.Tensor:
    """The whole int16 split on ``device``, copied a slice at a time so that host memory holds one slice only."""
    resident = torch.empty(audio.shape, dtype=torch.int16, device=device)
    for start in range(0, len(audio), rows_per_copy):
        resident[start:start + rows_per_copy].copy_(torch.from_numpy(np.array(audio[start:start + rows_per_copy])))
    return resident
