"""The Triton recurrence (``rnn_fast.ops.lstm.fused``) against the naive reference and ``torch.nn.LSTM``.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), one program at
a time in Python, so the shapes here are small and few. On CUDA the same checks also run at larger shapes, plus
TF32 and bf16 against PyTorch's own error.
"""

import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.ops.lstm import fused, naive
from recurrence_cases import (BACKWARD_NAMES, DEVICE, DTYPES, FORWARD_NAMES, HALF_DTYPES, TF32_TOLERANCE, Shape,
                              assert_all_close, assert_half_precision_within_twice_torch,
                              assert_layer_matches_nn_lstm, contract_inputs, output_grads)

pytestmark = pytest.mark.skipif(fused.unavailable_reason() is not None, reason=str(fused.unavailable_reason()))

ON_CUDA = DEVICE.type == "cuda"


SMALL_SHAPES = [Shape(1, 1, 1, 1, False), Shape(2, 5, 7, 5, True), Shape(1, 5, 7, 33, True), Shape(2, 5, 1, 33, False)]
# H=128 is the classifier's size; H=256 streams its weights from L2 in every precision.
CUDA_SHAPES = [Shape(2, 37, 100, 128, True), Shape(1, 23, 300, 256, True), Shape(2, 64, 64, 64, False)]
SHAPES = [pytest.param(shape, id=str(shape)) for shape in SMALL_SHAPES + (CUDA_SHAPES if ON_CUDA else [])]

# Both places the weights can live: where kernel_plan puts them, and streamed in 16-wide chunks (several per step
# whenever H > 16), which small shapes would otherwise never reach.
WEIGHTS = {"planned": lambda plan: plan, "streamed": lambda plan: fused.KernelPlan(plan.block_h, 16, resident=False)}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_naive(shape, dtype, atol, rtol, weights):
    """Every output of the forward and backward kernels, including the saved gates and cells."""
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, dtype, seed=shape.hidden)
    plan = WEIGHTS[weights](fused.kernel_plan(shape.hidden, dtype, DEVICE))
    forward = fused.launch_forward(xw, w_hh, h0, c0, lengths, False, plan)
    assert_all_close(forward, naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths), FORWARD_NAMES, atol, rtol)

    grads = output_grads(shape, dtype, seed=shape.batch)
    gates, cell = forward[3:]
    assert_all_close(fused.launch_backward(*grads, w_hh, c0, gates, cell, lengths, False, plan),
                      naive.lstm_recurrence_backward(*grads, w_hh, c0, gates, cell, lengths),
                      BACKWARD_NAMES, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_matches_nn_lstm(shape, dtype, atol, rtol):
    assert_layer_matches_nn_lstm("triton", shape, dtype, atol, rtol)


@pytest.mark.parametrize("op", [fused.FORWARD_OP, fused.BACKWARD_OP], ids=["forward", "backward"])
def test_opcheck(op):
    """Schema, fake tensors and autograd registration. The interpreter cannot run the kernels on the tensor
    subclasses of AOT dispatch, so that check needs CUDA."""
    shape = Shape(2, 3, 2, 3, True)
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, torch.float64, seed=3)
    if op == fused.FORWARD_OP:
        args = (xw.requires_grad_(), w_hh.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(), lengths, False)
    else:
        _y, _h_n, _c_n, gates, cell = fused.launch_forward(xw, w_hh, h0, c0, lengths, False)
        args = (*output_grads(shape, torch.float64, seed=4), w_hh, c0, gates, cell, lengths, False)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    if ON_CUDA:
        checks += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(getattr(torch.ops.rnn_fast, op.split("::")[1]), args, test_utils=checks)


@pytest.mark.parametrize("shape", SHAPES)
def test_tf32_close_to_float64(shape):
    """fp32 with ``allow_tf32``: the forward's scaled fp16 operands (which the interpreter runs too) and the
    backward's TF32 (IEEE in the interpreter)."""
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, torch.float64, seed=11)
    expected = naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths)
    forward = fused.launch_forward(*(t.float() for t in (xw, w_hh, h0, c0)), lengths, True)
    assert_all_close([t.double() for t in forward], expected, FORWARD_NAMES, TF32_TOLERANCE, TF32_TOLERANCE)

    grads = output_grads(shape, torch.float64, seed=12)
    gates, cell = expected[3:]
    backward = fused.launch_backward(*(t.float() for t in (*grads, w_hh, c0, gates, cell)), lengths, True)
    assert_all_close([t.double() for t in backward],
                      naive.lstm_recurrence_backward(*grads, w_hh, c0, gates, cell, lengths),
                      BACKWARD_NAMES, TF32_TOLERANCE, TF32_TOLERANCE)


def test_tf32_weight_scaling_keeps_tf32_bits():
    """Rows from 1e-7 to 1e7, far outside fp16's range, keep TF32's 11 significant bits relative to their row."""
    rows = torch.randn(2, 64, 16, dtype=torch.float64) * torch.logspace(-7, 7, 64, dtype=torch.float64)[:, None]
    rows[0, 0] = 0
    operand, scale = fused._forward_weights(rows.float(), allow_tf32=True)
    assert operand.dtype == torch.float16 and torch.isfinite(operand).all()
    error = (operand.double() * scale.double()[..., None] - rows.float().double()).abs()
    assert (error <= 2 ** -11 * rows.abs().amax(dim=-1, keepdim=True)).all()


# On the CPU, nn.LSTM's own 16-bit error on these tiny shapes can be far below one rounding step of the output.
@pytest.mark.skipif(not ON_CUDA, reason="a GPU comparison: cuDNN's 16-bit error is the yardstick")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_half_precision_error_within_twice_torch(shape, dtype):
    assert_half_precision_within_twice_torch("triton", shape, dtype)


def test_torch_compile_fullgraph():
    """A model around ``rnn_fast.LSTM(backend="triton")`` compiles as one graph holding the Triton op. On CUDA it
    runs through Inductor; the interpreter cannot run the kernels on the tensor subclasses of AOT dispatch, so on
    the CPU the captured graph runs as it is."""
    lstm = rnn_fast.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True, backend="triton", device=DEVICE)
    head = nn.Linear(8, 3, device=DEVICE)

    def model(x):
        output, (h_n, _c_n) = lstm(x)
        return head(output[:, -1]) + h_n.sum(0).sum(-1, keepdim=True)

    graphs = []

    def capture_only(graph_module, _example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, fullgraph=True, backend="inductor" if ON_CUDA else capture_only)
    input = torch.randn(3, 6, 5, device=DEVICE, requires_grad=True)
    expected = model(input)
    (expected_grad,) = torch.autograd.grad(expected.sum(), input)
    actual = compiled(input)
    (actual_grad,) = torch.autograd.grad(actual.sum(), input)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(actual_grad, expected_grad, atol=2e-5, rtol=2e-5)
    if not ON_CUDA:
        targets = [node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
        assert targets.count(torch.ops.rnn_fast.triton_lstm_recurrence_forward) == 2


def test_tf32_follows_cudnn_rnn_setting():
    """The setting nn.LSTM follows: legacy ``cudnn.allow_tf32``, or the newer ``cudnn.rnn.fp32_precision``. The two
    APIs are not mixed: torch refuses to read the legacy flag back once the RNN and convolution settings differ."""
    for legacy in (True, False):
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=legacy):
            assert fused._cudnn_rnn_allows_tf32() is legacy
    previous = torch.backends.cudnn.rnn.fp32_precision
    try:
        for precision in ("tf32", "ieee"):
            torch.backends.cudnn.rnn.fp32_precision = precision
            assert fused._cudnn_rnn_allows_tf32() is (precision == "tf32")
    finally:
        torch.backends.cudnn.rnn.fp32_precision = previous


def test_unsupported_reasons():
    assert fused.unsupported_reason(DEVICE, torch.float32, fused.MAX_HIDDEN) is None
    assert "hidden_size" in fused.unsupported_reason(DEVICE, torch.float32, fused.MAX_HIDDEN + 1)
    assert "support" in fused.unsupported_reason(DEVICE, torch.int32, 8)
    assert (fused.unsupported_reason(DEVICE, torch.bfloat16, 8) is None) == ON_CUDA
