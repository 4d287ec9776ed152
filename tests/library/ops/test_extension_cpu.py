"""The fused C++ CPU recurrence ops (csrc/cpu/) against the naive reference of the contract."""
import importlib
import sys

import pytest
import torch

import rnn_fast
from rnn_fast.ops.lstm import naive, reference, unavailable_reason
from rnn_fast.testing import TOLERANCES, torch_threads

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None,
                                reason=f"cpu backend unavailable: {unavailable_reason('cpu')}")

DTYPES = [pytest.param(dtype, tol, tol, id=str(dtype).split(".")[1]) for dtype, tol in TOLERANCES.items()]


def _shape(num_directions, seq_len, batch, hidden, with_lengths):
    name = f"B{batch}-T{seq_len}-H{hidden}-{'bi' if num_directions == 2 else 'uni'}" + (
        "-lengths" if with_lengths else "")
    return pytest.param(num_directions, seq_len, batch, hidden, with_lengths, id=name)


# Odd sizes, and a batch large enough to split into several row blocks.
SHAPES = [_shape(d, t, b, h, lengths)
          for d in (1, 2) for lengths in (False, True)
          for t, b, h in ((1, 7, 5), (5, 1, 33), (6, 7, 1), (5, 7, 33), (4, 130, 5))]


def _lengths(seq_len, batch, generator):
    """Unsorted lengths in [1, T] with the first row at T and (when there is one) the second at 1."""
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    if batch > 1:
        lengths[1] = 1
    return lengths


def _inputs(num_directions, seq_len, batch, hidden, with_lengths, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    xw = randn(num_directions, seq_len, batch, 4 * hidden)
    w_hh = randn(num_directions, 4 * hidden, hidden)
    h0, c0 = randn(num_directions, batch, hidden), randn(num_directions, batch, hidden)
    lengths = _lengths(seq_len, batch, generator) if with_lengths else None
    return xw, w_hh, h0, c0, lengths


def _forward_and_grads(recurrence, inputs, seed=1):
    """Every output of the forward op, then the grads of xw, w_hh, h0, c0 from one random weighting of y, h_n, c_n."""
    xw, w_hh, h0, c0, lengths = (t.detach().clone().requires_grad_() if t is not None and t.is_floating_point()
                                 else t for t in inputs)
    outputs = recurrence(xw, w_hh, h0, c0, lengths)
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum() for out in outputs[:3])
    grads = torch.autograd.grad(loss, (xw, w_hh, h0, c0))
    names = ("y", "h_n", "c_n", "gates", "cell", "grad_xw", "grad_w_hh", "grad_h0", "grad_c0")
    return dict(zip(names, tuple(outputs) + grads))


def _assert_matches_naive(inputs, atol, rtol, packed=False):
    """The cpu backend's forward op (of the padded layout, or the packed one) against the naive reference."""
    from rnn_fast.ops.lstm import cpu

    name = "lstm_packed_recurrence" if packed else "lstm_recurrence"
    expected = _forward_and_grads(getattr(naive, name), inputs)
    actual = _forward_and_grads(getattr(cpu, name), inputs)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("num_directions, seq_len, batch, hidden, with_lengths", SHAPES)
def test_outputs_and_gradients_match_naive(num_directions, seq_len, batch, hidden, with_lengths, dtype, atol, rtol):
    _assert_matches_naive(_inputs(num_directions, seq_len, batch, hidden, with_lengths, dtype), atol, rtol)


@pytest.fixture
def num_threads(request):
    with torch_threads(request.param):
        yield request.param


@pytest.mark.parametrize("batch", [7, 300], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("num_threads", [1, 3], indirect=True, ids=lambda n: f"threads{n}")
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
def test_row_partition_does_not_change_results(num_threads, num_directions, batch):
    # 3 threads over 7 rows give uneven row blocks (3, 3, 1) for one direction and 2 blocks per direction for two;
    # 300 rows on one thread run in several sub-blocks of rows per step.
    _assert_matches_naive(_inputs(num_directions, 5, batch, 33, True, torch.float64), 1e-9, 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The packed layout [D, N, *] (PackedSequence data order) and the inference ops.

# Row lengths, longest first as PackedSequence sorts them: all 1, all equal, one long row among short ones, mixed,
# and a batch that splits into several row blocks and sub-blocks.
LENGTH_PATTERNS = {
    "ones": [1] * 5,
    "equal": [4] * 6,
    "one-long": [9] + [1] * 6,
    "mixed": [7, 7, 5, 4, 4, 3, 1, 1, 1],
    "B300": sorted(((row * 37) % 11 + 1 for row in range(300)), reverse=True),
}


def _packed_inputs(num_directions, pattern, hidden, dtype, seed=0):
    """``(xw [D, N, 4H], w_hh, h0, c0, batch_sizes)`` for rows of the lengths of a pattern (or a list of them,
    longest first)."""
    lengths = torch.tensor(LENGTH_PATTERNS[pattern] if isinstance(pattern, str) else pattern)
    batch_sizes = (lengths.unsqueeze(0) > torch.arange(int(lengths.max())).unsqueeze(1)).sum(1)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator, dtype=dtype)

    batch = len(lengths)
    return (randn(num_directions, int(lengths.sum()), 4 * hidden), randn(num_directions, 4 * hidden, hidden, scale=0.5),
            randn(num_directions, batch, hidden), randn(num_directions, batch, hidden), batch_sizes)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("pattern", LENGTH_PATTERNS)
def test_packed_outputs_and_gradients_match_naive(pattern, num_directions, dtype, atol, rtol):
    _assert_matches_naive(_packed_inputs(num_directions, pattern, 33, dtype), atol, rtol, packed=True)


@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("batch", [1, 7, 130], ids=lambda b: f"B{b}")
def test_float32_blocks_of_many_steps_match_naive(batch, num_directions):
    # A block of rows that runs at least 16 steps has its per-step GEMMs on MKL's packed w_hh (float32 only); the
    # shorter cases above run the plain GEMM.
    xw, w_hh, h0, c0, lengths = _inputs(num_directions, 20, batch, 33, True, torch.float32)
    # Weights at nn.LSTM's scale: with unit ones, float32 rounding differences grow over 20 steps.
    padded = (xw, w_hh.detach() * 33 ** -0.5, h0, c0, lengths)
    _assert_matches_naive(padded, 2e-5, 2e-5)
    lengths = sorted(padded[-1].tolist(), reverse=True)
    _assert_matches_naive(_packed_inputs(num_directions, lengths, 33, torch.float32), 2e-5, 2e-5, packed=True)


@pytest.mark.parametrize("num_threads", [1, 3], indirect=True, ids=lambda n: f"threads{n}")
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
def test_token_partition_does_not_change_packed_results(num_threads, num_directions):
    # Blocks of equal row-steps over lengths sorted longest first: a few long rows in one block, many short ones
    # in the others.
    _assert_matches_naive(_packed_inputs(num_directions, "B300", 9, torch.float64), 1e-9, 1e-9, packed=True)


def _padded_and_packed_cases():
    for num_directions in (1, 2):
        direction = "bi" if num_directions == 2 else "uni"
        for with_lengths in (False, True):
            yield pytest.param("padded", (num_directions, 5, 7, 33, with_lengths),
                               id=f"padded-{direction}{'-lengths' if with_lengths else ''}")
        yield pytest.param("packed", (num_directions, "mixed", 33), id=f"packed-{direction}")


def _case_inputs(layout, case, dtype):
    return _inputs(*case, dtype) if layout == "padded" else _packed_inputs(*case, dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("layout, case", list(_padded_and_packed_cases()))
def test_inference_matches_training_forward_and_naive(layout, case, dtype, atol, rtol):
    from rnn_fast.ops.lstm import cpu

    inputs = tuple(t.detach() if t.is_floating_point() else t for t in _case_inputs(layout, case, dtype)
                   if t is not None) + ((None,) if layout == "padded" and not case[-1] else ())
    training, inference, reference = ((cpu.lstm_recurrence, cpu.lstm_recurrence_inference,
                                       naive.lstm_recurrence_inference) if layout == "padded" else
                                      (cpu.lstm_packed_recurrence, cpu.lstm_packed_recurrence_inference,
                                       naive.lstm_packed_recurrence_inference))
    actual = inference(*inputs)
    assert len(actual) == 3
    # The same GEMMs and elementwise pass over the same rows: the same bits.
    for got, want in zip(actual, training(*inputs)[:3]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for name, got, want in zip(("y", "h_n", "c_n"), actual, reference(*inputs)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _op_args(num_directions, with_lengths):
    inputs = _inputs(num_directions, 4, 3, 2, with_lengths, torch.float64)
    xw, w_hh, h0, c0, lengths = inputs
    with torch.no_grad():
        y, h_n, c_n, gates, cell = torch.ops.rnn_fast.lstm_recurrence_forward(*inputs)
    grads = tuple(torch.randn_like(t) for t in (y, h_n, c_n))
    return inputs, (*grads, w_hh.detach(), c0.detach(), gates, cell, lengths)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
def test_opcheck(num_directions, with_lengths):
    forward_args, backward_args = _op_args(num_directions, with_lengths)
    torch.library.opcheck(torch.ops.rnn_fast.lstm_recurrence_forward.default, forward_args)
    # The backward op has no autograd of its own: double backward is not supported.
    torch.library.opcheck(torch.ops.rnn_fast.lstm_recurrence_backward.default, backward_args)


@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
def test_inference_and_packed_opcheck(num_directions):
    from rnn_fast.ops.lstm import cpu

    for with_lengths in (False, True):
        xw, w_hh, h0, c0, lengths = _inputs(num_directions, 4, 3, 2, with_lengths, torch.float64)
        torch.library.opcheck(torch.ops.rnn_fast.lstm_recurrence_inference.default,
                              tuple(t.detach() for t in (xw, w_hh, h0, c0)) + (lengths,))
    inputs = _packed_inputs(num_directions, "mixed", 2, torch.float64)
    xw, w_hh, h0, c0, batch_sizes = inputs
    torch.library.opcheck(torch.ops.rnn_fast.lstm_packed_recurrence_inference.default, inputs)
    torch.library.opcheck(torch.ops.rnn_fast.lstm_packed_recurrence_forward.default,
                          tuple(t.requires_grad_() for t in inputs[:4]) + (batch_sizes,))
    with torch.no_grad():
        y, h_n, c_n, gates, cell = cpu.lstm_packed_recurrence(*inputs)
    grads = tuple(torch.randn_like(t) for t in (y, h_n, c_n))
    torch.library.opcheck(torch.ops.rnn_fast.lstm_packed_recurrence_backward.default,
                          (*grads, w_hh.detach(), c0.detach(), gates, cell, batch_sizes))
    grad_xw = torch.randn_like(xw.detach())
    torch.library.opcheck(torch.ops.rnn_fast.cpu_packed_recurrent_weight_grad.default,
                          (grad_xw, y, h0.detach(), batch_sizes))
    torch.testing.assert_close(cpu.packed_weight_grad_op(grad_xw, y, h0.detach(), batch_sizes),
                               reference.packed_recurrent_weight_grad(grad_xw, y, h0.detach(), batch_sizes))


def _bad_forward_args(change):
    args = dict(zip(("xw", "w_hh", "h0", "c0", "lengths"),
                    (t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t
                     for t in _inputs(2, 4, 3, 5, True, torch.float32))))
    return tuple(change(args).values())


def _set(**values):
    return lambda args: {**args, **{name: value(args[name]) for name, value in values.items()}}


BAD_FORWARD = [
    pytest.param(_set(w_hh=lambda w: w.double()), "w_hh must have dtype Float, got Double", id="w_hh-dtype"),
    pytest.param(_set(xw=lambda x: x.transpose(2, 3).contiguous().transpose(2, 3)), "xw must be contiguous",
                 id="xw-strided"),
    pytest.param(_set(h0=lambda h: h[:, :2].contiguous()), r"h0 must have shape \(D, B, H\)", id="h0-shape"),
    pytest.param(_set(xw=lambda x: x[..., :-1].contiguous()), "4 \\* hidden_size", id="gates-not-4H"),
    pytest.param(_set(xw=lambda x: torch.cat([x, x[:1]])), "must be 1 or 2", id="three-directions"),
    pytest.param(_set(xw=lambda x: x[0]), r"xw must have shape \(D, T, B, 4H\)", id="xw-3d"),
    pytest.param(_set(xw=lambda x: x[:, :0], lengths=lambda l: None), "sequence length must be at least 1",
                 id="no-steps"),
    pytest.param(_set(**{name: (lambda t: t.half()) for name in ("xw", "w_hh", "h0", "c0")}),
                 "supports float32 and float64, got Half", id="half"),
    pytest.param(_set(lengths=lambda l: l.int()), "lengths must have dtype Long", id="lengths-int32"),
    pytest.param(_set(lengths=lambda l: l[:2]), r"lengths must have shape \(B\)", id="lengths-shape"),
    pytest.param(_set(lengths=lambda l: torch.tensor([4, 0, 2])), r"lengths\[1\] = 0", id="lengths-zero"),
    pytest.param(_set(lengths=lambda l: torch.tensor([4, 5, 2])), r"lie in \[1, T\] = \[1, 4\].*lengths\[1\] = 5",
                 id="lengths-past-T"),
]


@pytest.mark.parametrize("change, message", BAD_FORWARD)
def test_forward_rejects_bad_inputs(change, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnn_fast.lstm_recurrence_forward(*_bad_forward_args(change))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_stack_inference_opcheck(bidirectional, packed):
    lstm = torch.nn.LSTM(3, 2, num_layers=2, bidirectional=bidirectional, dtype=torch.float64)
    params = [p.detach() for p in lstm._flat_weights]
    state = torch.randn(4 if bidirectional else 2, 3, 2, dtype=torch.float64)
    input = torch.randn(4, 3, 3, dtype=torch.float64)
    batch_sizes = None
    if packed:
        packed_input = torch.nn.utils.rnn.pack_padded_sequence(input, torch.tensor([4, 2, 1]))
        input, batch_sizes = packed_input.data, packed_input.batch_sizes
    torch.library.opcheck(torch.ops.rnn_fast.cpu_lstm_inference.default,
                          (input, state, state, params, True, 2, bidirectional, batch_sizes))


def _bad_packed_args(change):
    args = dict(zip(("xw", "w_hh", "h0", "c0", "batch_sizes"), _packed_inputs(2, "mixed", 5, torch.float32)))
    return tuple(change(args).values())


BAD_PACKED = [
    pytest.param(_set(batch_sizes=lambda s: s.flip(0)), r"non-increasing, got batch_sizes\[2\] = 3", id="increasing"),
    pytest.param(_set(batch_sizes=lambda s: s.int()), "CPU int64 tensor", id="batch_sizes-int32"),
    pytest.param(_set(xw=lambda x: x[:, 1:].contiguous()), r"sum\(batch_sizes\) = 33, got 32", id="xw-rows"),
    pytest.param(_set(h0=lambda h: h[:, 1:].contiguous()), r"h0 must have shape \(D, B, H\)", id="h0-batch"),
    pytest.param(_set(xw=lambda x: x[0]), r"xw must have shape \(D, N, 4H\)", id="xw-2d"),
    pytest.param(_set(batch_sizes=lambda s: s[:0]), r"batch_sizes must have shape \(T\) with T >= 1", id="no-steps"),
]


@pytest.mark.parametrize("change, message", BAD_PACKED)
def test_packed_ops_reject_bad_inputs(change, message):
    args = _bad_packed_args(change)
    for op in (torch.ops.rnn_fast.lstm_packed_recurrence_forward, torch.ops.rnn_fast.lstm_packed_recurrence_inference):
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_backward_rejects_bad_saved_state():
    _, (grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths) = _op_args(2, True)
    with pytest.raises(RuntimeError, match=r"cell must have shape \(D, T, B, H\)"):
        torch.ops.rnn_fast.lstm_recurrence_backward(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell[:, 1:],
                                                     lengths)
    with pytest.raises(RuntimeError, match="grad_y must have dtype Double, got Float"):
        torch.ops.rnn_fast.lstm_recurrence_backward(grad_y.float(), grad_h_n, grad_c_n, w_hh, c0, gates, cell,
                                                     lengths)


def test_unsupported_reason():
    from rnn_fast.ops.lstm import cpu

    for dtype in (torch.float32, torch.float64):
        assert cpu.unsupported_reason(torch.device("cpu"), dtype, 5) is None
    assert "CPU tensors only" in cpu.unsupported_reason(torch.device("cuda", 0), torch.float32, 5)
    assert "float32, float64 and bfloat16" in cpu.unsupported_reason(torch.device("cpu"), torch.float16, 5)
    # bf16 runs where the CPU has AVX512-BF16 (tests/library/modules/test_bf16.py), and falls back elsewhere.
    bf16_reason = cpu.unsupported_reason(torch.device("cpu"), torch.bfloat16, 5)
    assert (bf16_reason is None) == (cpu.bf16_kernel() != "")


def test_missing_extension_names_the_rebuild_command(monkeypatch):
    # A None entry in sys.modules makes `import rnn_fast._C` raise ImportError, as a missing build does.
    monkeypatch.delattr(rnn_fast, "_C")
    monkeypatch.setitem(sys.modules, "rnn_fast._C", None)
    monkeypatch.delitem(sys.modules, "rnn_fast.ops.lstm.extension")
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        importlib.import_module("rnn_fast.ops.lstm.extension")


# ---------------------------------------------------------------------------------------------------------------
# The cpu backend's input projection op and its cache of output blocks.

def _projection_case(num_parts, num_directions, with_bias, batch_first):
    name = (f"P{num_parts}-{'bi' if num_directions == 2 else 'uni'}{'' if with_bias else '-nobias'}"
            f"{'-batch_first' if batch_first else ''}")
    return pytest.param(num_parts, num_directions, with_bias, batch_first, id=name)


# A layer's input is x (one part, possibly a batch-first tensor seen time-major) or the previous layer's directions.
PROJECTIONS = [_projection_case(1, 1, True, False), _projection_case(1, 2, True, True),
               _projection_case(1, 1, False, True), _projection_case(2, 2, True, False),
               _projection_case(2, 1, False, False)]


def _projection_inputs(num_parts, num_directions, with_bias, batch_first, dtype, seq_len=5, batch=7, width=6,
                       hidden=5):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    # The leaf is what the caller holds; parts [P, T, B, K] may be a strided view of it.
    leaf = randn(num_parts, batch, seq_len, width) if batch_first else randn(num_parts, seq_len, batch, width)
    w_ih = randn(num_directions, 4 * hidden, num_parts * width)
    bias = randn(num_directions, 4 * hidden) if with_bias else None
    return leaf, w_ih, bias


def _as_parts(leaf, batch_first):
    return leaf.transpose(1, 2) if batch_first else leaf


def _reference_projection(parts, w_ih, bias):
    side_by_side = parts.permute(1, 2, 0, 3).flatten(2)
    xw = torch.einsum("tbk,dgk->dtbg", side_by_side, w_ih)
    return xw if bias is None else xw + bias[:, None, None, :]


@pytest.mark.parametrize("parts_require_grad", [True, False], ids=["grad_parts", "no_grad_parts"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("num_parts, num_directions, with_bias, batch_first", PROJECTIONS)
def test_input_projection_matches_reference(num_parts, num_directions, with_bias, batch_first, dtype, atol, rtol,
                                            parts_require_grad):
    from rnn_fast.ops.lstm import cpu

    inputs = _projection_inputs(num_parts, num_directions, with_bias, batch_first, dtype)
    results = []
    for projection in (_reference_projection, cpu.input_projection):
        leaf, w_ih, bias = (None if t is None else t.clone().requires_grad_() for t in inputs)
        leaf.requires_grad_(parts_require_grad)
        xw = projection(_as_parts(leaf, batch_first), w_ih, bias)
        weight = torch.randn(xw.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        wanted = [t for t in (leaf, w_ih, bias) if t is not None and t.requires_grad]
        results.append((xw, *torch.autograd.grad((xw * weight).sum(), wanted)))
    expected, actual = results
    # xw, then the gradients of the parts (when they require it), w_ih and the bias (when there is one).
    assert len(actual) == len(expected) == 2 + parts_require_grad + with_bias
    for value, reference in zip(actual, expected):
        torch.testing.assert_close(value, reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("batch", [1, 7], ids=lambda b: f"B{b}")
def test_input_projection_of_steps_and_rows_that_do_not_follow_each_other(batch):
    # A batch-first tensor cut short in time: neither its steps nor (for B > 1) its batch rows follow each other in
    # memory, so each step is a GEMM of its own.
    from rnn_fast.ops.lstm import cpu

    generator = torch.Generator().manual_seed(2)
    leaf = torch.randn(2, batch, 6, 8, generator=generator, dtype=torch.float64)
    parts = leaf[:, :, :5].transpose(1, 2)
    w_ih = torch.randn(2, 12, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(2, 12, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(cpu.input_projection(parts, w_ih, bias), _reference_projection(parts, w_ih, bias),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("num_parts, num_directions, with_bias, batch_first", PROJECTIONS)
def test_input_projection_opcheck(num_parts, num_directions, with_bias, batch_first):
    leaf, w_ih, bias = _projection_inputs(num_parts, num_directions, with_bias, batch_first, torch.float64)
    parts = _as_parts(leaf.requires_grad_(), batch_first)
    torch.library.opcheck(torch.ops.rnn_fast.cpu_input_projection.default,
                          (parts, w_ih.requires_grad_(), None if bias is None else bias.requires_grad_()))
    grad_xw = torch.randn(num_directions, *parts.shape[1:3], w_ih.shape[1], dtype=torch.float64)
    for output_mask in ([True, True, with_bias], [False, True, False]):
        torch.library.opcheck(torch.ops.rnn_fast.cpu_input_projection_backward.default,
                              (grad_xw, parts.detach(), w_ih.detach(), output_mask))


BAD_PROJECTIONS = [
    pytest.param(lambda parts, w_ih: (parts[..., ::2], w_ih), "unit stride in its last dimension", id="strided-K"),
    pytest.param(lambda parts, w_ih: (parts, w_ih[..., 1:].contiguous()), r"w_ih must have shape \(D, G, P \* K\)",
                 id="w_ih-width"),
    pytest.param(lambda parts, w_ih: (parts[0], w_ih), r"parts must have shape \(P, T, B, K\)", id="parts-3d"),
    pytest.param(lambda parts, w_ih: (parts.half(), w_ih.half()), "supports float32 and float64, got Half",
                 id="half"),
]


@pytest.mark.parametrize("change, message", BAD_PROJECTIONS)
def test_input_projection_rejects_bad_inputs(change, message):
    leaf, w_ih, _ = _projection_inputs(1, 1, False, False, torch.float32, width=8)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnn_fast.cpu_input_projection(*change(leaf, w_ih), None)


def test_cached_blocks_are_rewritten_and_released():
    from rnn_fast.ops.lstm import cpu

    # Large enough (> 1 MiB per output) for y, gates and cell to come from the cache of blocks.
    full = _inputs(2, 8, 130, 64, False, torch.float64)
    padded = _inputs(2, 8, 130, 64, True, torch.float64, seed=1)
    cpu.release_cached_memory()
    with torch.no_grad():
        cpu.lstm_recurrence(*full)  # its outputs die at once and their blocks go back to the cache
    # The same shapes again reuse those blocks; every element, padded steps included, is written anew.
    _assert_matches_naive(padded, 1e-9, 1e-9)
    assert cpu.release_cached_memory() >= 3 * 2 * 8 * 130 * 64 * 8
    assert cpu.release_cached_memory() == 0


def test_fp32_activations_within_twice_torch_error():
    """sigmoid and tanh of the float32 kernels against float64, next to torch's own float32 error on the same
    inputs. One step from a zero state with zero recurrent weights saves the activations of xw as the gates,
    ``cell = i * g`` and ``y = o * tanh(cell)``."""
    hidden, batch = 4, 1 << 15
    xw = torch.linspace(-90, 90, batch * 4 * hidden).view(1, 1, batch, 4 * hidden)
    xw = xw[..., torch.randperm(4 * hidden, generator=torch.Generator().manual_seed(0))].contiguous()
    zeros = torch.zeros(1, batch, hidden)
    y, _, _, gates, cell = torch.ops.rnn_fast.lstm_recurrence_forward(xw, torch.zeros(1, 4 * hidden, hidden),
                                                                      zeros, zeros, None)
    pre = xw.view(batch, 4, hidden).double()
    functions = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}
    gate_function = ["sigmoid", "sigmoid", "tanh", "sigmoid"]
    for name, function in functions.items():
        rows = [gate for gate, used in enumerate(gate_function) if used == name]
        exact = function(pre[:, rows])
        ours = gates.view(batch, 4, hidden)[:, rows].double()
        theirs = function(pre[:, rows].float()).double()
        our_error, torch_error = (ours - exact).abs().max(), (theirs - exact).abs().max()
        assert our_error <= 2 * torch_error, f"{name}: {our_error:.3g} vs torch's {torch_error:.3g}"
    # tanh of the new cell, and sigmoid's relative accuracy where it is tiny but a normal float (it must not flush
    # to 0 there).
    exact_y = gates[0, 0, :, 3 * hidden:].double() * torch.tanh(cell[0, 0].double())
    torch_y = gates[0, 0, :, 3 * hidden:] * torch.tanh(cell[0, 0])
    assert (y[0, 0].double() - exact_y).abs().max() <= 2 * (torch_y.double() - exact_y).abs().max()
    negative = (pre[:, [0, 1, 3]] < -15) & (pre[:, [0, 1, 3]] > -87)
    exact = torch.sigmoid(pre[:, [0, 1, 3]][negative])
    ours = gates.view(batch, 4, hidden)[:, [0, 1, 3]][negative].double()
    theirs = torch.sigmoid(pre[:, [0, 1, 3]][negative].float()).double()
    assert (ours > 0).all()
    assert ((ours - exact).abs() / exact).max() <= 2 * ((theirs - exact).abs() / exact).max()
