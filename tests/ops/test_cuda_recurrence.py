"""The CUDA recurrence (csrc/cuda, ``backend="cuda"``) on a GPU, against the naive reference and ``torch.nn.LSTM``.

Skipped without a CUDA device or without the extension's CUDA kernels. tests/test_cuda_emulation.py runs the same
kernels on a CPU emulation; this file checks what only the GPU shows: tensor-core rounding, the memory model,
the launcher. The shapes reach both cluster sizes, both batch tiles (B=3000 makes the planner take 32 rows), odd and
padded hidden sizes, and lengths in both directions.
"""

import pytest
import torch

from rnn_fast.ops.lstm import naive, unavailable_reason
from recurrence_cases import (BACKWARD_NAMES, DEVICE, DTYPES, FORWARD_NAMES, HALF_DTYPES, TF32_TOLERANCE, Shape,
                              assert_all_close, assert_half_precision_within_twice_torch,
                              assert_layer_matches_nn_lstm, contract_inputs, output_grads)
from rnn_fast.testing import TOLERANCES

pytestmark = pytest.mark.skipif(unavailable_reason("cuda") is not None, reason=str(unavailable_reason("cuda")))


SHAPES = [pytest.param(shape, id=str(shape)) for shape in (
    Shape(2, 5, 7, 5, True),         # one CTA, most units padded
    Shape(1, 6, 19, 33, True),       # odd H: scalar global accesses
    Shape(2, 37, 100, 128, True),    # the classifier's H: clusters of 2 (float64: 4 and 8)
    Shape(2, 9, 45, 72, False),      # 96 padded units, cluster of 2
    Shape(1, 4, 3000, 128, True),    # enough tiles for 32-row tiles
)]


def _forward(*args):
    return torch.ops.rnn_fast.lstm_recurrence_forward(*args)


def _backward(*args):
    return torch.ops.rnn_fast.lstm_recurrence_backward(*args)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_naive(shape, dtype, atol, rtol):
    """Every output of both ops, saved gates and cells included, in float64 and IEEE float32."""
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, dtype, seed=shape.hidden)
    forward = _forward(xw, w_hh, h0, c0, lengths)
    assert_all_close(forward, naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths), FORWARD_NAMES, atol, rtol)
    grads = output_grads(shape, dtype, seed=shape.batch)
    gates, cell = forward[3:]
    assert_all_close(_backward(*grads, w_hh, c0, gates, cell, lengths),
                      naive.lstm_recurrence_backward(*grads, w_hh, c0, gates, cell, lengths),
                      BACKWARD_NAMES, atol, rtol)


@pytest.mark.parametrize("shape", SHAPES)
def test_tf32_close_to_float64(shape):
    """float32 with cuDNN's TF32 allowed: scaled-fp16 forward, TF32 backward, both within TF32's tolerance."""
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, torch.float64, seed=11)
    expected = naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths)
    grads = output_grads(shape, torch.float64, seed=12)
    gates, cell = expected[3:]
    expected_grads = naive.lstm_recurrence_backward(*grads, w_hh, c0, gates, cell, lengths)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=True):
        forward = _forward(*(t.float() for t in (xw, w_hh, h0, c0)), lengths)
        backward = _backward(*(t.float() for t in (*grads, w_hh, c0, gates, cell)), lengths)
    assert_all_close([t.double() for t in forward], expected, FORWARD_NAMES, TF32_TOLERANCE, TF32_TOLERANCE)
    assert_all_close([t.double() for t in backward], expected_grads, BACKWARD_NAMES, TF32_TOLERANCE, TF32_TOLERANCE)


def test_float32_follows_cudnn_rnn_setting():
    """With TF32 still on for convolutions but off for RNNs (the newer per-operator API), the op runs IEEE float32:
    close to float64 at float32's tolerance, which TF32 would miss."""
    shape = Shape(2, 20, 64, 128, True)
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, torch.float64, seed=21)
    expected = naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths)
    previous = torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = "tf32", "ieee"
        forward = _forward(*(t.float() for t in (xw, w_hh, h0, c0)), lengths)
    finally:
        torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.conv.fp32_precision = previous
    tolerance = TOLERANCES[torch.float32]
    assert_all_close([t.double() for t in forward], expected, FORWARD_NAMES, tolerance, tolerance)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_matches_nn_lstm(shape, dtype, atol, rtol):
    assert_layer_matches_nn_lstm("cuda", shape, dtype, atol, rtol)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_half_precision_error_within_twice_torch(shape, dtype):
    assert_half_precision_within_twice_torch("cuda", shape, dtype)


@pytest.mark.parametrize("op", ["lstm_recurrence_forward", "lstm_recurrence_backward"])
def test_opcheck(op):
    """Schema, fake tensors, autograd registration and AOT dispatch of the ops with their CUDA kernels."""
    shape = Shape(2, 3, 2, 6, True)
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, torch.float64, seed=3)
    if op == "lstm_recurrence_forward":
        args = (xw.requires_grad_(), w_hh.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(), lengths)
    else:
        gates, cell = _forward(xw, w_hh, h0, c0, lengths)[3:]
        args = (*output_grads(shape, torch.float64, seed=4), w_hh, c0, gates, cell, lengths)
    torch.library.opcheck(getattr(torch.ops.rnn_fast, op), args)


def test_unsupported_reason_follows_the_planner():
    from rnn_fast.ops.lstm import cuda

    assert cuda.unsupported_reason(DEVICE, torch.float32, 128) is None
    assert cuda.unsupported_reason(DEVICE, torch.bfloat16, 33) is None
    assert "128" in cuda.unsupported_reason(DEVICE, torch.float32, 129)
    assert "CUDA tensors" in cuda.unsupported_reason(torch.device("cpu"), torch.float32, 16)
    assert "support" in cuda.unsupported_reason(DEVICE, torch.int32, 16)


def test_launcher_rejects_bad_inputs():
    xw, w_hh, h0, c0, lengths = contract_inputs(Shape(2, 3, 4, 8, True), torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        _forward(xw, w_hh[:, :, :4].contiguous(), h0, c0, lengths)
    with pytest.raises(RuntimeError, match="lengths must have dtype"):
        _forward(xw, w_hh, h0, c0, lengths.int())
    with pytest.raises(RuntimeError, match="hidden_size=160"):
        big = contract_inputs(Shape(1, 2, 2, 160, False), torch.float32, seed=1)
        _forward(*big)
