"""The CUDA recurrence (csrc/cuda, ``backend="cuda"``) on a GPU, against the naive reference and ``torch.nn.LSTM``.

Skipped without a CUDA device or the extension's CUDA kernels. tests/library/csrc/test_cuda_emulation.py runs the same
kernels on a CPU emulation; this file checks what only the GPU shows: tensor-core rounding, the memory model,
the launcher. The shapes reach both cluster sizes, both batch tiles (B=3000 makes the planner take 32 rows), odd and
padded hidden sizes, and lengths in both directions.
"""

import pytest
import torch

from rnn_fast.ops.lstm import load_backend, naive, unavailable_reason
from recurrence_cases import (BACKWARD_NAMES, DEVICE, DTYPES, FORWARD_NAMES, HALF_DTYPES, TF32_TOLERANCE, Shape,
                              assert_all_close, assert_half_precision_within_twice_torch,
                              assert_layer_matches_nn_lstm, assert_ops_match_naive_in, contract_inputs, output_grads)
from rnn_fast.testing import PRECISIONS, TOLERANCES, cudnn_tf32

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
    with cudnn_tf32(True):
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


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_ops_in_every_precision_match_naive(precision):
    """Forward, backward and inference on ragged batch tiles at the classifier's H in IEEE fp32, TF32 and bf16: the
    GPU session's compute-sanitizer target, under each kernel variant too."""
    assert_ops_match_naive_in(load_backend("cuda"), precision)


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


# ---------------------------------------------------------------------------------------------------------
# Kernel variants (RNN_FAST_CUDA_VARIANTS, csrc/cuda/README.md): sm_90 only, each alone and all together.

def _variant_sets():
    from rnn_fast.ops.lstm import cuda

    return [*cuda.VARIANTS, ",".join(cuda.VARIANTS)]


def _needs_sm90():
    if torch.cuda.get_device_capability(DEVICE)[0] < 9:
        pytest.skip("the kernel variants run on sm_90 only")


# (label, dtype, TF32): the precisions the variants apply to, and the IEEE/float64 paths that only the exchange
# changes.
VARIANT_PRECISIONS = [pytest.param(torch.bfloat16, False, id="bf16"), pytest.param(torch.float16, False, id="fp16"),
                      pytest.param(torch.float32, True, id="tf32"), pytest.param(torch.float32, False, id="fp32"),
                      pytest.param(torch.float64, False, id="fp64")]


def _run_ops(monkeypatch, variants, dtype, tf32, inputs, grads):
    """Forward, then backward from the forward's own saved state, under `variants`."""
    monkeypatch.setenv("RNN_FAST_CUDA_VARIANTS", variants)
    xw, w_hh, h0, c0, lengths = inputs
    with cudnn_tf32(tf32):
        forward = _forward(*(t.to(dtype) for t in (xw, w_hh, h0, c0)), lengths)
        backward = _backward(*(g.to(dtype) for g in grads), w_hh.to(dtype), c0.to(dtype), *forward[3:], lengths)
    return forward, backward


@pytest.mark.parametrize("dtype, tf32", VARIANT_PRECISIONS)
@pytest.mark.parametrize("variants", _variant_sets())
def test_variants_as_accurate_as_the_baseline(monkeypatch, variants, dtype, tf32):
    """Every output and gradient under a variant set at most twice as far from float64 as the baseline kernels',
    plus, where 16-bit saved state or tanh.approx apply, their cost (bf16 1e-2, fp16/TF32 1e-3 relative to the
    largest value; tests/library/csrc/test_cuda_emulation.py measured them), at the classifier's H with lengths."""
    _needs_sm90()
    shape = Shape(2, 37, 1500, 128, True)
    inputs = contract_inputs(shape, torch.float64, seed=41)
    grads = output_grads(shape, torch.float64, seed=42)
    expected_forward = naive.lstm_recurrence_forward(*inputs)
    expected_backward = naive.lstm_recurrence_backward(*grads, inputs[1], inputs[3], *expected_forward[3:], inputs[4])
    expected = (*expected_forward, *expected_backward)
    baseline = [t for part in _run_ops(monkeypatch, "", dtype, tf32, inputs, grads) for t in part]
    varied = [t for part in _run_ops(monkeypatch, variants, dtype, tf32, inputs, grads) for t in part]
    names = variants.split(",")
    tensor_cores = dtype in (torch.bfloat16, torch.float16) or tf32
    saved_16bit = "saved_16bit" in names and tensor_cores
    approx = "tanh_approx" in names and dtype in (torch.bfloat16, torch.float16)
    if saved_16bit:
        assert varied[3].dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    cost = 1e-2 if dtype == torch.bfloat16 else 1e-3
    for name, ours, theirs, value in zip(FORWARD_NAMES + BACKWARD_NAMES, varied, baseline, expected):
        assert torch.isfinite(ours).all(), name
        scale = max(1.0, value.abs().max().item())
        error = (ours.double() - value).abs().max().item()
        baseline_error = (theirs.double() - value).abs().max().item()
        extra = (cost if saved_16bit and name in ("gates", "cell", *BACKWARD_NAMES) else 0.0) + (cost if approx else 0.0)
        assert error <= 2 * baseline_error + (extra + 1e-12) * scale, \
            f"{name}: {error:.3g} vs the baseline's {baseline_error:.3g}"


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_tanh_approx_within_twice_torch(monkeypatch, dtype):
    """tanh.approx's real error (the emulation used its bound): a layer within twice nn.LSTM's own error."""
    _needs_sm90()
    monkeypatch.setenv("RNN_FAST_CUDA_VARIANTS", "tanh_approx")
    assert_half_precision_within_twice_torch("cuda", Shape(2, 37, 100, 128, True), dtype)


def test_saved_16bit_fake_matches_the_kernel(monkeypatch):
    """Under saved_16bit the fake registration gives the launcher's 16-bit saved state (opcheck compares them)."""
    _needs_sm90()
    monkeypatch.setenv("RNN_FAST_CUDA_VARIANTS", "saved_16bit")
    xw, w_hh, h0, c0, lengths = contract_inputs(Shape(2, 3, 2, 8, True), torch.bfloat16, seed=3)
    assert _forward(xw, w_hh, h0, c0, lengths)[3].dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.rnn_fast.lstm_recurrence_forward,
                          (xw.requires_grad_(), w_hh.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(),
                           lengths))


def test_unknown_or_uncompiled_variants_are_refused(monkeypatch):
    _needs_sm90()
    xw, w_hh, h0, c0, lengths = contract_inputs(Shape(1, 2, 2, 8, False), torch.bfloat16, seed=1)
    monkeypatch.setenv("RNN_FAST_CUDA_VARIANTS", "cluster_mbarier")
    with pytest.raises(RuntimeError, match="unknown variant 'cluster_mbarier'; valid names are cluster_mbarrier"):
        _forward(xw, w_hh, h0, c0, lengths)
    monkeypatch.setenv("RNN_FAST_CUDA_VARIANTS", "cluster_mbarrier,saved_16bit")
    with pytest.raises(RuntimeError, match="one at a time or all together"):
        _forward(xw, w_hh, h0, c0, lengths)


@pytest.mark.parametrize("variants", ["", "cluster_mbarrier,saved_16bit,tanh_approx,bwd_tf32_wide,bwd_prefetch"])
def test_inference_op_equals_the_forward(monkeypatch, variants):
    """The inference op's y, h_n, c_n are the forward op's, bit for bit (the same kernel without its saved-state
    stores)."""
    if not hasattr(torch.ops.rnn_fast, "lstm_recurrence_inference"):
        pytest.skip("this build declares no rnn_fast::lstm_recurrence_inference")
    monkeypatch.setenv("RNN_FAST_CUDA_VARIANTS", variants)
    for dtype in (torch.bfloat16, torch.float32):
        inputs = contract_inputs(Shape(2, 9, 45, 72, True), dtype, seed=5)
        forward = _forward(*inputs)
        inference = torch.ops.rnn_fast.lstm_recurrence_inference(*inputs)
        for name, ours, theirs in zip(FORWARD_NAMES, inference, forward):
            assert torch.equal(ours, theirs), name
