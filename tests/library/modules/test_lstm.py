"""rnn_fast.LSTM against torch.nn.LSTM, for every fused backend this install can run on the test device."""
import importlib.util
import itertools
import os
import warnings
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnn_fast
from rnn_fast.ops.lstm import FUSED_BACKENDS
from rnn_fast.testing import TOLERANCES, assert_lstm_matches, cudnn_tf32, runnable_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


BACKENDS = runnable_backends(DEVICE)
DTYPES = [pytest.param(dtype, tol, tol, id=str(dtype).split(".")[1]) for dtype, tol in TOLERANCES.items()]

# The odd sizes cycle through the product of the structural options, so each appears with each option.
HIDDEN = (1, 5, 33)
INPUT = (1, 37)
BATCH = (1, 7)
SEQ = (1, 4, 6)


def _cases():
    structure = itertools.product((1, 2, 3), (False, True), (False, True), (True, False), (False, True),
                                  (False, True))
    for index, (layers, bidirectional, batch_first, bias, with_state, packed) in enumerate(structure):
        hidden, input_size = HIDDEN[index % 3], INPUT[index % 2]
        batch, seq_len = BATCH[(index // 2) % 2], SEQ[index % 3]
        case = dict(layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                    with_state=with_state, packed=packed, hidden=hidden, input_size=input_size, batch=batch,
                    seq_len=seq_len)
        name = (f"L{layers}-{'bi' if bidirectional else 'uni'}-B{batch}-T{seq_len}-I{input_size}-H{hidden}"
                f"{'-bf' if batch_first else ''}{'' if bias else '-nobias'}{'-h0' if with_state else ''}"
                f"{'-packed' if packed else ''}")
        yield pytest.param(case, id=name)


CASES = list(_cases())


def _backend_cases():
    for backend in BACKENDS:
        # The Triton interpreter runs a kernel one program at a time in Python: a sample keeps CI short.
        step = 8 if backend == "triton" and INTERPRETED else 1
        for case in CASES[::step]:
            yield pytest.param(backend, *case.values, id=f"{backend}-{case.id}")


def _make_pair(case, dtype, backend, **extra):
    kwargs = dict(num_layers=case["layers"], bias=case["bias"], batch_first=case["batch_first"],
                  bidirectional=case["bidirectional"], device=DEVICE, dtype=dtype, **extra)
    reference = nn.LSTM(case["input_size"], case["hidden"], **kwargs)
    candidate = rnn_fast.LSTM(case["input_size"], case["hidden"], backend=backend, **kwargs)
    return reference, candidate


def _make_input(case, dtype, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(DEVICE)

    if case["packed"]:
        # Unsorted lengths, one of them the full length, so the reverse direction starts at each row's own end.
        lengths = [case["seq_len"] - (row % case["seq_len"]) for row in range(case["batch"])]
        lengths[-1] = case["seq_len"]
        input = pack_sequence([randn(length, case["input_size"]) for length in lengths], enforce_sorted=False)
    elif case["batch_first"]:
        input = randn(case["batch"], case["seq_len"], case["input_size"])
    else:
        input = randn(case["seq_len"], case["batch"], case["input_size"])
    hx = None
    if case["with_state"]:
        shape = (case["layers"] * (2 if case["bidirectional"] else 1), case["batch"], case["hidden"])
        hx = (randn(*shape), randn(*shape))
    return input, hx


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("backend, case", list(_backend_cases()))
def test_matches_nn_lstm(backend, case, dtype, atol, rtol):
    generator = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    reference, candidate = _make_pair(case, dtype, backend)
    input, hx = _make_input(case, dtype, generator)
    # IEEE float32 on both sides: these tolerances are not TF32's.
    with cudnn_tf32(False):
        assert_lstm_matches(reference, candidate, input, hx, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-h0", "h0"])
def test_unbatched_input(backend, with_state):
    reference = nn.LSTM(3, 4, num_layers=2, bidirectional=True, device=DEVICE, dtype=torch.float64)
    candidate = rnn_fast.LSTM(3, 4, num_layers=2, bidirectional=True, device=DEVICE, dtype=torch.float64,
                              backend=backend)
    input = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    hx = tuple(torch.randn(4, 4, dtype=torch.float64, device=DEVICE) for _ in range(2)) if with_state else None
    assert_lstm_matches(reference, candidate, input, hx, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_between_layers_in_training(backend):
    case = dict(layers=3, bidirectional=True, batch_first=False, bias=True)
    candidate = rnn_fast.LSTM(6, 5, 3, bidirectional=True, dropout=0.5, backend=backend, device=DEVICE)
    input = torch.randn(4, 3, 6, device=DEVICE)
    candidate.eval()
    evaluated, _ = candidate(input)
    candidate.train()
    torch.manual_seed(1)
    first, _ = candidate(input)
    torch.manual_seed(1)
    again, _ = candidate(input)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, evaluated)
    # With p=1 every inter-layer activation is dropped, which nn.LSTM does deterministically too.
    reference, candidate = _make_pair(dict(case, hidden=5, input_size=6), torch.float64, backend, dropout=1.0)
    reference.train(), candidate.train()
    assert_lstm_matches(reference, candidate, input.double(), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    if backend == "triton":
        pytest.skip("covered by tests/library/ops/test_triton_recurrence.py")
    model = rnn_fast.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True, backend=backend,
                          device=DEVICE, dtype=torch.float64)
    reference = nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True, device=DEVICE,
                        dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    input = torch.randn(3, 6, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    output, (h_n, c_n) = compiled(input)
    expected, (h_ref, c_ref) = reference(input)
    torch.testing.assert_close(output, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(h_n, h_ref, atol=1e-9, rtol=1e-9)
    (grad,) = torch.autograd.grad(output.sum() + c_n.sum(), input)
    (grad_ref,) = torch.autograd.grad(expected.sum() + c_ref.sum(), input)
    torch.testing.assert_close(grad, grad_ref, atol=1e-9, rtol=1e-9)


def test_torch_backend_is_nn_lstm():
    reference = nn.LSTM(4, 3, num_layers=2)
    candidate = rnn_fast.LSTM(4, 3, num_layers=2, backend="torch")
    input = torch.randn(5, 2, 4)
    assert_lstm_matches(reference, candidate, input, atol=0, rtol=0)


def test_proj_size_falls_back_to_torch_with_one_warning():
    reference = nn.LSTM(4, 6, proj_size=3, bidirectional=True, dtype=torch.float64)
    candidate = rnn_fast.LSTM(4, 6, proj_size=3, bidirectional=True, dtype=torch.float64, backend="naive")
    input = torch.randn(5, 2, 4, dtype=torch.float64)
    rnn_fast.modules.lstm._warned.clear()
    with pytest.warns(UserWarning, match="proj_size"):
        candidate(input)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        candidate(input)
    assert_lstm_matches(reference, candidate, input, atol=1e-9, rtol=1e-9)


def test_same_constructor_parameters_and_state_dict():
    kwargs = dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)
    reference = nn.LSTM(7, 9, **kwargs)
    candidate = rnn_fast.LSTM(7, 9, **kwargs, backend="naive")
    assert [(n, p.shape) for n, p in candidate.named_parameters()] == \
           [(n, p.shape) for n, p in reference.named_parameters()]
    bound = 1 / 9 ** 0.5
    assert all(p.abs().max() <= bound for p in candidate.parameters())
    candidate.load_state_dict(reference.state_dict())
    reference.load_state_dict(rnn_fast.LSTM(7, 9, **kwargs).state_dict())
    assert "backend='naive'" in repr(candidate)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        rnn_fast.LSTM(3, 4, backend="cudnn")


def test_available_backends():
    """What this install can run, from facts independent of the registry: what is importable and the device."""
    extension_built = importlib.util.find_spec("rnn_fast._C") is not None
    triton_runs = importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or INTERPRETED)
    cuda_runs = (extension_built and torch.cuda.is_available()
                 and torch._C._dispatch_has_kernel_for_dispatch_key("rnn_fast::lstm_recurrence_forward", "CUDA"))
    expected = ["torch", "naive"] + [name for name, runs in (("cpu", extension_built), ("triton", triton_runs),
                                                             ("cuda", cuda_runs)) if runs]
    assert rnn_fast.available_backends() == expected
    for name in FUSED_BACKENDS:
        if name in expected:
            rnn_fast.LSTM(2, 3, backend=name)
        else:
            with pytest.raises(RuntimeError, match=f"rnn_fast backend '{name}' is unavailable"):
                rnn_fast.LSTM(2, 3, backend=name)


def _pair_for_errors(backend):
    return nn.LSTM(4, 3, num_layers=2), rnn_fast.LSTM(4, 3, num_layers=2, backend=backend)


BAD_INPUTS = {
    "feature-size": (lambda: torch.randn(5, 2, 6), None),
    "hidden-shape": (lambda: torch.randn(5, 2, 4), lambda: (torch.randn(2, 3, 3), torch.randn(2, 2, 3))),
    "cell-shape": (lambda: torch.randn(5, 2, 4), lambda: (torch.randn(2, 2, 3), torch.randn(2, 2, 4))),
    "input-4d": (lambda: torch.randn(5, 2, 4, 1), None),
    "unbatched-3d-state": (lambda: torch.randn(5, 4), lambda: (torch.randn(2, 1, 3), torch.randn(2, 1, 3))),
    "batched-2d-state": (lambda: torch.randn(5, 2, 4), lambda: (torch.randn(2, 3), torch.randn(2, 3))),
    "zero-length": (lambda: torch.randn(0, 2, 4), None),
    "input-dtype": (lambda: torch.randn(5, 2, 4, dtype=torch.float64), None),
    "input-device": (lambda: torch.randn(5, 2, 4, device="meta"), None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_raises_like_nn_lstm(backend, bad):
    make_input, make_state = BAD_INPUTS[bad]
    reference, candidate = _pair_for_errors(backend)
    input, hx = make_input(), make_state() if make_state else None
    with pytest.raises(Exception) as expected:
        reference(input, hx)
    with pytest.raises(expected.type, match=_escaped(str(expected.value))):
        candidate(input, hx)


def test_state_dtype_mismatch_is_a_clear_error():
    candidate = rnn_fast.LSTM(4, 3, backend="naive")
    state = torch.randn(1, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Expected hidden and cell state dtype torch.float32"):
        candidate(torch.randn(5, 2, 4), (state, state))


def _escaped(message):
    import re
    return re.escape(message)


@pytest.mark.skipif("cpu" not in BACKENDS or DEVICE.type != "cpu", reason="the cpu backend's auto rule")
def test_auto_leaves_to_nn_lstm_the_calls_the_cpu_backend_measured_slower():
    """backend="auto" follows rnn_fast.ops.lstm.cpu.auto_declines, silently; a backend named runs whatever the
    call; the answers are nn.LSTM's either way."""
    declined = rnn_fast.LSTM(8, 512)  # hidden 512, 16 rows: bound by multiply-adds, where nn.LSTM's oneDNN wins
    assert declined.resolved_backend(torch.randn(3, 16, 8)) == "torch"
    assert declined.resolved_backend(torch.randn(3, 4, 8)) == "cpu"
    assert rnn_fast.LSTM(8, 512, backend="cpu").resolved_backend(torch.randn(3, 16, 8)) == "cpu"
    assert rnn_fast.LSTM(8, 512, bidirectional=True).resolved_backend(torch.randn(3, 4, 8)) == "torch"
    # A training call this small spends its time in dispatch; the same call without autograd runs fused.
    tiny = rnn_fast.LSTM(4, 8)
    assert tiny.resolved_backend(torch.randn(5, 1, 4)) == "torch"
    with torch.no_grad():
        assert tiny.resolved_backend(torch.randn(5, 1, 4)) == "cpu"
    assert rnn_fast.LSTM(160, 128, 2).resolved_backend(torch.randn(100, 256, 160)) == "cpu"
    reference = nn.LSTM(8, 512)
    declined.load_state_dict(reference.state_dict())
    input = torch.randn(3, 16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(declined(input)[0], reference(input)[0], atol=0, rtol=0)
