"""Shapes, random inputs and comparisons shared by the op-level tests of the fused recurrences (Triton, CUDA)."""
from typing import NamedTuple

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from rnn_fast.testing import TOLERANCES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TF32_TOLERANCE = 1e-3
FORWARD_NAMES = ("y", "h_n", "c_n", "gates", "cell")
BACKWARD_NAMES = ("grad_xw", "grad_h0", "grad_c0")
DTYPES = [pytest.param(dtype, tol, tol, id=str(dtype).split(".")[1]) for dtype, tol in TOLERANCES.items()]


class Shape(NamedTuple):
    directions: int
    seq_len: int
    batch: int
    hidden: int
    with_lengths: bool

    def __str__(self):
        return (f"B{self.batch}-T{self.seq_len}-H{self.hidden}-{'bi' if self.directions == 2 else 'uni'}"
                f"{'-lengths' if self.with_lengths else ''}")


def random_tensor(generator: torch.Generator, dtype: torch.dtype, *size, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*size, generator=generator, dtype=torch.float64)).to(DEVICE, dtype)


def row_lengths(shape: Shape, generator: torch.Generator):
    """Unsorted row lengths in [1, T], the longest equal to T; None for a shape without lengths."""
    if not shape.with_lengths:
        return None
    lengths = torch.randint(1, shape.seq_len + 1, (shape.batch,), generator=generator)
    lengths[shape.batch // 2] = shape.seq_len
    return lengths.to(DEVICE)


def contract_inputs(shape: Shape, dtype: torch.dtype, seed: int):
    """Random ``(xw, w_hh, h0, c0, lengths)`` of the contract."""
    generator = torch.Generator().manual_seed(seed)
    d, t, b, h = shape.directions, shape.seq_len, shape.batch, shape.hidden
    return (random_tensor(generator, dtype, d, t, b, 4 * h), random_tensor(generator, dtype, d, 4 * h, h, scale=h ** -0.5),
            random_tensor(generator, dtype, d, b, h), random_tensor(generator, dtype, d, b, h), row_lengths(shape, generator))


def layer_inputs(shape: Shape, dtype: torch.dtype, seed: int, input_size: int = 3):
    """Random ``(input, (h0, c0))`` for one nn.LSTM layer; the input is packed when the shape has lengths."""
    generator = torch.Generator().manual_seed(seed)
    d, t, b, h = shape.directions, shape.seq_len, shape.batch, shape.hidden
    input = random_tensor(generator, dtype, t, b, input_size)
    state = (random_tensor(generator, dtype, d, b, h), random_tensor(generator, dtype, d, b, h))
    lengths = row_lengths(shape, generator)
    if lengths is not None:
        input = pack_padded_sequence(input, lengths.cpu(), enforce_sorted=False)
    return input, state


def to_dtype(input, dtype):
    """A layer input, packed or not, in another dtype."""
    if isinstance(input, PackedSequence):
        return PackedSequence(input.data.to(dtype), input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    return input.to(dtype)


def output_grads(shape: Shape, dtype: torch.dtype, seed: int):
    """Random ``(grad_y, grad_h_n, grad_c_n)`` for the backward kernel."""
    generator = torch.Generator().manual_seed(seed)
    d, t, b, h = shape.directions, shape.seq_len, shape.batch, shape.hidden
    return random_tensor(generator, dtype, d, t, b, h), random_tensor(generator, dtype, d, b, h), random_tensor(generator, dtype, d, b, h)


def assert_all_close(actual, expected, names, atol, rtol):
    for name, got, want in zip(names, actual, expected):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
