"""Shapes, random inputs and comparisons shared by the op-level tests of the fused recurrences (Triton, CUDA)."""
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_fast
from rnn_fast.ops.lstm import naive
from rnn_fast.testing import (PRECISIONS, TOLERANCES, assert_lstm_matches, cudnn_tf32, relative_errors,
                              run_lstm)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TF32_TOLERANCE = PRECISIONS["tf32"].tolerance
FORWARD_NAMES = ("y", "h_n", "c_n", "gates", "cell")
BACKWARD_NAMES = ("grad_xw", "grad_h0", "grad_c0")
DTYPES = [pytest.param(dtype, tol, tol, id=str(dtype).split(".")[1]) for dtype, tol in TOLERANCES.items()]
HALF_DTYPES = [pytest.param(dtype, id=str(dtype).split(".")[1]) for dtype in (torch.bfloat16, torch.float16)]


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


def assert_layer_matches_nn_lstm(backend: str, shape: Shape, dtype: torch.dtype, atol: float, rtol: float):
    """One ``rnn_fast.LSTM`` layer on ``backend`` (its registered ops and autograd) against nn.LSTM: outputs and
    every gradient, grad_w_hh included."""
    kwargs = dict(bidirectional=shape.directions == 2, device=DEVICE, dtype=dtype)
    reference = nn.LSTM(3, shape.hidden, **kwargs)
    candidate = rnn_fast.LSTM(3, shape.hidden, backend=backend, **kwargs)
    input, state = layer_inputs(shape, dtype, seed=7)
    assert_lstm_matches(reference, candidate, input, state, atol=atol, rtol=rtol)


def assert_half_precision_within_twice_torch(backend: str, shape: Shape, dtype: torch.dtype):
    """Every output and gradient of a 16-bit ``backend`` layer is at most twice as far from float64 as nn.LSTM's
    own in the same dtype."""
    kwargs = dict(bidirectional=shape.directions == 2, device=DEVICE)
    exact = nn.LSTM(3, shape.hidden, dtype=torch.float64, **kwargs)
    theirs_module = nn.LSTM(3, shape.hidden, dtype=dtype, **kwargs)
    ours_module = rnn_fast.LSTM(3, shape.hidden, backend=backend, dtype=dtype, **kwargs)
    for module in (theirs_module, ours_module):
        module.load_state_dict(exact.state_dict())
    input, state = layer_inputs(shape, dtype, seed=5)  # drawn in the 16-bit type: all three see the same numbers

    def run(module):
        module_dtype = next(module.parameters()).dtype
        return run_lstm(module, to_dtype(input, module_dtype), tuple(t.to(module_dtype) for t in state), seed=0)

    reference, theirs, ours = run(exact), run(theirs_module), run(ours_module)
    for name, value in reference.items():
        torch_error = (theirs[name].double() - value).abs().max().item()
        our_error = (ours[name].double() - value).abs().max().item()
        assert our_error <= 2 * torch_error + 1e-6 * value.abs().max().item(), \
            f"{name}: error {our_error:.3g} vs torch's {torch_error:.3g}"


# Three 16-row tiles (Triton's pinned and the CUDA kernels' smaller batch tile), the last one ragged, with lengths:
# at the classifier's hidden size on a GPU, a small one in the Triton interpreter.
RAGGED_TILES = Shape(2, 6, 37, 128 if DEVICE.type == "cuda" else 8, True)


def assert_ops_match_naive_in(backend, precision: str):
    """A backend's forward (``lstm_recurrence``), its autograd rule's backward and its inference forward, in one of
    ``rnn_fast.testing.PRECISIONS``, against the naive reference run in float64 on the CPU from the same values:
    every output and gradient within twice the precision's tolerance (relative, Frobenius). The reference stays
    off the device, so that compute-sanitizer, which the GPU session runs this under, watches the ops under test."""
    setting = PRECISIONS[precision]
    reason = backend.unsupported_reason(DEVICE, setting.dtype, RAGGED_TILES.hidden)
    if reason is not None:
        pytest.skip(reason)
    xw, w_hh, h0, c0, lengths = contract_inputs(RAGGED_TILES, setting.dtype, seed=51)
    for leaf in (xw, w_hh, h0, c0):
        leaf.requires_grad_()
    grads = output_grads(RAGGED_TILES, setting.dtype, seed=52)
    with cudnn_tf32(setting.tf32):
        outputs = backend.lstm_recurrence(xw, w_hh, h0, c0, lengths)
        grad_inputs = torch.autograd.grad(outputs[:3], (xw, h0, c0), grads)
        with torch.no_grad():
            inferred = backend.lstm_recurrence_inference(xw, w_hh, h0, c0, lengths)
    host_xw, host_w_hh, host_h0, host_c0, *host_grads = (t.detach().double().cpu()
                                                         for t in (xw, w_hh, h0, c0, *grads))
    host_lengths = lengths.cpu()
    expected = naive.lstm_recurrence_forward(host_xw, host_w_hh, host_h0, host_c0, host_lengths)
    expected_grads = naive.lstm_recurrence_backward(*host_grads, host_w_hh, host_c0, *expected[3:], host_lengths)
    inference_names = [f"{name}_inference" for name in FORWARD_NAMES[:3]]
    actual = {**dict(zip(FORWARD_NAMES, outputs)), **dict(zip(BACKWARD_NAMES, grad_inputs)),
              **dict(zip(inference_names, inferred))}
    wanted = {**dict(zip(FORWARD_NAMES, expected)), **dict(zip(BACKWARD_NAMES, expected_grads)),
              **dict(zip(inference_names, expected))}
    errors = relative_errors({name: value.detach().cpu() for name, value in actual.items()}, wanted)
    too_far = {name: f"{error:.2e}" for name, error in errors.items() if not error <= 2 * setting.tolerance}
    assert not too_far, f"relative errors over {2 * setting.tolerance:g}: {too_far}"
