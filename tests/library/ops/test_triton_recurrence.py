"""The Triton recurrence (``rnn_fast.ops.lstm.triton``) against the naive reference and ``torch.nn.LSTM``.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), one program at
a time in Python, so the shapes here are small and few. On CUDA the same checks also run at larger shapes, plus
TF32 and bf16 against PyTorch's own error.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_fast
from rnn_fast.ops.lstm import naive, triton as triton_backend
from rnn_fast.testing import PRECISIONS, assert_lstm_matches
from recurrence_cases import (BACKWARD_NAMES, DEVICE, DTYPES, FORWARD_NAMES, HALF_DTYPES, TF32_TOLERANCE, Shape,
                              assert_all_close, assert_half_precision_within_twice_torch,
                              assert_layer_matches_nn_lstm, assert_ops_match_naive_in, contract_inputs, output_grads)

pytestmark = pytest.mark.skipif(triton_backend.unavailable_reason() is not None,
                                reason=str(triton_backend.unavailable_reason()))

ON_CUDA = DEVICE.type == "cuda"


SMALL_SHAPES = [Shape(1, 1, 1, 1, False), Shape(2, 5, 7, 5, True), Shape(1, 5, 7, 33, True), Shape(2, 5, 1, 33, False)]
# H=128 is the classifier's size; H=256 streams its weights from L2 in every precision.
CUDA_SHAPES = [Shape(2, 37, 100, 128, True), Shape(1, 23, 300, 256, True), Shape(2, 64, 64, 64, False)]
SHAPES = [pytest.param(shape, id=str(shape)) for shape in SMALL_SHAPES + (CUDA_SHAPES if ON_CUDA else [])]

# Both places the weights can live: where kernel_plan puts them, and streamed in 16-wide chunks (several per step
# whenever H > 16), which small shapes would otherwise never reach.
WEIGHTS = {"planned": lambda plan: plan,
           "streamed": lambda plan: triton_backend.KernelPlan(plan.block_h, 16, resident=False)}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_naive(shape, dtype, atol, rtol, weights):
    """Every output of the forward and backward kernels, including the saved gates and cells."""
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, dtype, seed=shape.hidden)
    plan = WEIGHTS[weights](triton_backend.kernel_plan(shape.hidden, dtype, DEVICE))
    forward = triton_backend.launch_forward(xw, w_hh, h0, c0, lengths, False, plan)
    assert_all_close(forward, naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths), FORWARD_NAMES, atol, rtol)

    grads = output_grads(shape, dtype, seed=shape.batch)
    gates, cell = forward[3:]
    assert_all_close(triton_backend.launch_backward(*grads, w_hh, c0, gates, cell, lengths, False, plan),
                      naive.lstm_recurrence_backward(*grads, w_hh, c0, gates, cell, lengths),
                      BACKWARD_NAMES, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_matches_nn_lstm(shape, dtype, atol, rtol):
    assert_layer_matches_nn_lstm("triton", shape, dtype, atol, rtol)


@pytest.mark.parametrize("op", [triton_backend.FORWARD_OP, triton_backend.BACKWARD_OP], ids=["forward", "backward"])
def test_opcheck(op):
    """Schema, fake tensors and autograd registration. The interpreter cannot run the kernels on the tensor
    subclasses of AOT dispatch, so that check needs CUDA."""
    shape = Shape(2, 3, 2, 3, True)
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, torch.float64, seed=3)
    if op == triton_backend.FORWARD_OP:
        args = (xw.requires_grad_(), w_hh.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(), lengths, False)
    else:
        _y, _h_n, _c_n, gates, cell = triton_backend.launch_forward(xw, w_hh, h0, c0, lengths, False)
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
    forward = triton_backend.launch_forward(*(t.float() for t in (xw, w_hh, h0, c0)), lengths, True)
    assert_all_close([t.double() for t in forward], expected, FORWARD_NAMES, TF32_TOLERANCE, TF32_TOLERANCE)

    grads = output_grads(shape, torch.float64, seed=12)
    gates, cell = expected[3:]
    backward = triton_backend.launch_backward(*(t.float() for t in (*grads, w_hh, c0, gates, cell)), lengths, True)
    assert_all_close([t.double() for t in backward],
                      naive.lstm_recurrence_backward(*grads, w_hh, c0, gates, cell, lengths),
                      BACKWARD_NAMES, TF32_TOLERANCE, TF32_TOLERANCE)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_ops_in_every_precision_match_naive(precision):
    """Forward, backward and inference on ragged batch tiles in IEEE fp32, TF32 and bf16 (what the interpreter
    runs of them): the GPU session's compute-sanitizer target."""
    assert_ops_match_naive_in(triton_backend, precision)


def test_tf32_weight_scaling_keeps_tf32_bits():
    """Rows from 1e-7 to 1e7, far outside fp16's range, keep TF32's 11 significant bits relative to their row."""
    rows = torch.randn(2, 64, 16, dtype=torch.float64) * torch.logspace(-7, 7, 64, dtype=torch.float64)[:, None]
    rows[0, 0] = 0
    operand, scale = triton_backend._forward_weights(rows.float(), allow_tf32=True)
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
        # The op runs inside each layer's autograd.Function, whose forward is a subgraph of the captured graph.
        targets = [node.target for graph in graphs for module in graph.modules()
                   if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes
                   if node.op == "call_function"]
        forward_op = torch.ops.rnn_fast.triton_lstm_recurrence_forward
        assert targets.count(forward_op) + targets.count(forward_op.default) == 2


def test_unsupported_reasons():
    assert triton_backend.unsupported_reason(DEVICE, torch.float32, triton_backend.MAX_HIDDEN) is None
    assert "hidden_size" in triton_backend.unsupported_reason(DEVICE, torch.float32, triton_backend.MAX_HIDDEN + 1)
    assert "support" in triton_backend.unsupported_reason(DEVICE, torch.int32, 8)
    assert (triton_backend.unsupported_reason(DEVICE, torch.bfloat16, 8) is None) == ON_CUDA


# Per-row length patterns of issue 11, over 40 rows: three 16-row programs in the interpreter, each with its own
# longest row.
LENGTH_PATTERNS = {
    "all-1": lambda t, b, g: torch.ones(b, dtype=torch.int64),
    "all-equal": lambda t, b, g: torch.full((b,), t - 4, dtype=torch.int64),
    "one-long": lambda t, b, g: torch.full((b,), 2, dtype=torch.int64).index_fill_(0, torch.tensor([21]), t),
    "unsorted": lambda t, b, g: torch.randint(1, t + 1, (b,), generator=g),
    "packed-order": lambda t, b, g: torch.randint(1, t + 1, (b,), generator=g).sort(descending=True).values,
}
PATTERN_SHAPE = Shape(2, 9, 40, 5, True)


def _pattern_inputs(pattern: str, dtype=torch.float64):
    xw, w_hh, h0, c0, _lengths = contract_inputs(PATTERN_SHAPE, dtype, seed=31)
    generator = torch.Generator().manual_seed(32)
    lengths = LENGTH_PATTERNS[pattern](PATTERN_SHAPE.seq_len, PATTERN_SHAPE.batch, generator).to(DEVICE)
    return xw, w_hh, h0, c0, lengths


@pytest.fixture
def dot_count(monkeypatch):
    """How many ``tl.dot`` the interpreter has run since the test began."""
    from triton.runtime.interpreter import InterpreterBuilder

    calls = []
    create_dot = InterpreterBuilder.create_dot

    def counting(self, *args, **kwargs):
        calls.append(None)
        return create_dot(self, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", counting)
    return lambda: len(calls)


@pytest.mark.skipif(ON_CUDA, reason="counts the interpreter's dots")
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("pattern", list(LENGTH_PATTERNS))
def test_programs_skip_ended_rows(pattern, weights, dot_count):
    """A program computes only up to its longest row's end: the forward direction stops there, the reverse
    direction starts there, in both kernels (4 dots a step at this H, weights resident or in one chunk). The steps
    it skips still get the contract's zeros, and every output and gradient matches the naive reference."""
    xw, w_hh, h0, c0, lengths = _pattern_inputs(pattern)
    plan = WEIGHTS[weights](triton_backend.kernel_plan(PATTERN_SHAPE.hidden, xw.dtype, DEVICE))
    block_b = triton_backend.tile_choices()["forward"]["every key"].split("x")[0]
    program_steps = lengths.split(int(block_b))
    expected_dots = 4 * PATTERN_SHAPE.directions * sum(int(rows.max()) for rows in program_steps)
    assert expected_dots < 4 * PATTERN_SHAPE.directions * len(program_steps) * PATTERN_SHAPE.seq_len

    forward = triton_backend.launch_forward(xw, w_hh, h0, c0, lengths, False, plan)
    assert dot_count() == expected_dots
    assert_all_close(forward, naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths), FORWARD_NAMES, 1e-9, 1e-9)
    grads = output_grads(PATTERN_SHAPE, xw.dtype, seed=33)
    backward = triton_backend.launch_backward(*grads, w_hh, c0, *forward[3:], lengths, False, plan)
    assert dot_count() == 2 * expected_dots
    assert_all_close(backward, naive.lstm_recurrence_backward(*grads, w_hh, c0, *forward[3:], lengths),
                      BACKWARD_NAMES, 1e-9, 1e-9)


@pytest.mark.parametrize("pattern", list(LENGTH_PATTERNS))
def test_packed_length_patterns_match_nn_lstm(pattern):
    """The same patterns through ``rnn_fast.LSTM`` (2 bidirectional layers, packed with ``enforce_sorted=False``):
    outputs and every gradient against nn.LSTM."""
    generator = torch.Generator().manual_seed(34)
    lengths = LENGTH_PATTERNS[pattern](PATTERN_SHAPE.seq_len, PATTERN_SHAPE.batch, generator)
    kwargs = dict(num_layers=2, bidirectional=True, device=DEVICE, dtype=torch.float64)
    reference = nn.LSTM(3, PATTERN_SHAPE.hidden, **kwargs)
    candidate = rnn_fast.LSTM(3, PATTERN_SHAPE.hidden, backend="triton", **kwargs)
    input = torch.randn(PATTERN_SHAPE.seq_len, PATTERN_SHAPE.batch, 3, generator=generator, dtype=torch.float64)
    packed = pack_padded_sequence(input.to(DEVICE), lengths, enforce_sorted=False)
    assert_lstm_matches(reference, candidate, packed, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("pattern", [None, "one-long"], ids=["no-lengths", "one-long"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_inference_forward_matches_and_saves_nothing(pattern, dtype, atol, rtol):
    """``lstm_recurrence_inference``: the training forward's ``(y, h_n, c_n)``, allocating only those three (the
    profiler's count of the bytes the op allocated)."""
    xw, w_hh, h0, c0, lengths = _pattern_inputs(pattern or "all-1", dtype)
    lengths = lengths if pattern else None
    expected = naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths)[:3]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        actual = triton_backend.lstm_recurrence_inference(xw, w_hh, h0, c0, lengths)
    assert_all_close(actual, expected, FORWARD_NAMES, atol, rtol)
    if not ON_CUDA:
        (event,) = [event for event in profile.events() if event.name == triton_backend.INFERENCE_OP]
        assert event.cpu_memory_usage == sum(tensor.numel() * tensor.element_size() for tensor in actual)


def test_inference_opcheck():
    shape = Shape(2, 3, 2, 3, True)
    xw, w_hh, h0, c0, lengths = contract_inputs(shape, torch.float64, seed=35)
    checks = ("test_schema", "test_faketensor") + (("test_aot_dispatch_static",) if ON_CUDA else ())
    torch.library.opcheck(torch.ops.rnn_fast.triton_lstm_recurrence_inference, (xw, w_hh, h0, c0, lengths, False),
                          test_utils=checks)


def test_pinned_tile_parses():
    assert triton_backend.pinned_tile("32x8") == (32, 8)
    assert triton_backend.pinned_tile(" 128X4 ") == (128, 4)
    assert triton_backend.pinned_tile("") is None


@pytest.mark.parametrize("value", ["32", "8x8", "48x8", "32x3", "32x64", "axb", "32x8x2", "-16x4"])
def test_bad_pinned_tile_is_a_clear_error(value):
    with pytest.raises(ValueError, match=rf"{triton_backend.TILE_ENV}=.* is not a tile: expected ROWSxWARPS"):
        triton_backend.pinned_tile(value)


def test_pinned_tile_is_the_only_config():
    """With ``RNN_FAST_TRITON_TILE=32x8`` both kernels have that one tile (nothing to autotune), and a batch that
    spans two 32-row programs still matches the naive reference. In a fresh process: the tile is read at import."""
    script = """
import torch
from rnn_fast.ops.lstm import naive, triton as triton_backend
from recurrence_cases import Shape, assert_all_close, contract_inputs, FORWARD_NAMES
pinned = {"every key": "32x8"}
assert triton_backend.tile_choices() == {"forward": pinned, "backward": pinned}, triton_backend.tile_choices()
for kernel in (triton_backend._lstm_forward_kernel, triton_backend._lstm_backward_kernel):
    (config,) = kernel.configs
    assert (config.kwargs["BLOCK_B"], config.num_warps) == (32, 8)
xw, w_hh, h0, c0, lengths = contract_inputs(Shape(2, 4, 40, 5, True), torch.float64, seed=36)
assert_all_close(triton_backend.launch_forward(xw, w_hh, h0, c0, lengths, False),
                 naive.lstm_recurrence_forward(xw, w_hh, h0, c0, lengths), FORWARD_NAMES, 1e-9, 1e-9)
"""
    env = {**os.environ, triton_backend.TILE_ENV: "32x8",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_autotune_key_has_directions():
    for kernel in (triton_backend._lstm_forward_kernel, triton_backend._lstm_backward_kernel):
        assert list(kernel.keys) == list(triton_backend.AUTOTUNE_KEY)
        assert "D" in kernel.keys and "D" in kernel.arg_names
