"""bf16 on the cpu backend, both ways users ask for it (``torch.autocast("cpu", dtype=torch.bfloat16)`` and a
bfloat16 module), against nn.LSTM's own bf16 path: outputs and every gradient no further from a float64 reference
than twice nn.LSTM's own error, the dtypes autocast gives, what training loops do to the gradients, threads, and the
fallbacks (fp16; a CPU without bf16 instructions).

Each test runs on every bf16 kernel this machine has: AVX512-BF16 where present, and everywhere the emulated one
(``RNN_FAST_CPU_BF16=emulated``), which computes the same products in fp32 arithmetic."""
import contextlib
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnn_fast
from rnn_fast.ops.lstm import resolve_backend, unavailable_reason
from rnn_fast.testing import gradients, relative_errors, run_lstm

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="the cpu backend is not built")


def _kernels():
    if unavailable_reason("cpu") is not None:
        return []
    from rnn_fast.ops.lstm import cpu
    return (["avx512_bf16"] if cpu.bf16_kernel() == "avx512_bf16" else []) + ["emulated"]


@pytest.fixture(params=_kernels())
def bf16_kernel(request, monkeypatch):
    monkeypatch.setenv("RNN_FAST_CPU_BF16", request.param)
    return request.param


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _modules(input_size, hidden, layers, bidirectional, batch_first=False, bias=True):
    kwargs = dict(bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    torch.manual_seed(0)
    reference = nn.LSTM(input_size, hidden, layers, **kwargs)
    fused = rnn_fast.LSTM(input_size, hidden, layers, backend="cpu", **kwargs)
    fused.load_state_dict(reference.state_dict())
    exact = nn.LSTM(input_size, hidden, layers, dtype=torch.float64, **kwargs)
    exact.load_state_dict(reference.state_dict())
    return reference, fused, exact


def _input(batch, seq_len, input_size, packed, batch_first, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    if packed:
        lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator).tolist()
        return pack_sequence([torch.randn(n, input_size, generator=generator, dtype=dtype) for n in lengths],
                             enforce_sorted=False)
    shape = (batch, seq_len, input_size) if batch_first else (seq_len, batch, input_size)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _as_double(input):
    return input.to(torch.float64) if isinstance(input, torch.Tensor) else input.to(dtype=torch.float64)


def _assert_within_twice_torch(ours, torch_bf16, exact):
    """Every output and gradient of ``ours`` at most 2x as far from ``exact`` as nn.LSTM's bf16 ones (relative
    Frobenius error, float64), and present with the same names."""
    assert ours.keys() == torch_bf16.keys() == exact.keys()
    our_errors, torch_errors = relative_errors(ours, exact), relative_errors(torch_bf16, exact)
    for name, error in our_errors.items():
        assert error <= 2 * torch_errors[name], f"{name}: error {error:.2e}, nn.LSTM bf16 {torch_errors[name]:.2e}"


CASES = [
    pytest.param(7, 13, 1, False, 5, 9, False, False, id="I7-H13-L1-uni-B5-T9"),
    pytest.param(7, 13, 2, True, 5, 9, False, False, id="I7-H13-L2-bi-B5-T9"),
    pytest.param(16, 32, 2, False, 3, 17, False, True, id="I16-H32-L2-uni-B3-T17-batch_first"),
    pytest.param(9, 24, 2, True, 6, 11, True, False, id="I9-H24-L2-bi-B6-T11-packed"),
    pytest.param(160, 128, 2, False, 8, 20, False, False, id="classifier-I160-H128-L2-B8-T20"),
]


@pytest.mark.parametrize("input_size,hidden,layers,bidirectional,batch,seq_len,packed,batch_first", CASES)
def test_autocast_matches_float64_as_closely_as_torch(bf16_kernel, input_size, hidden, layers, bidirectional, batch,
                                                      seq_len, packed, batch_first):
    reference, fused, exact = _modules(input_size, hidden, layers, bidirectional, batch_first)
    input = _input(batch, seq_len, input_size, packed, batch_first)
    directions = 2 if bidirectional else 1
    generator = torch.Generator().manual_seed(2)
    hx = tuple(torch.randn(layers * directions, batch, hidden, generator=generator) for _ in range(2))
    assert fused.resolved_backend(input) == "cpu"
    ours = run_lstm(fused, input, hx, seed=3, forward_context=_autocast)
    torch_bf16 = run_lstm(reference, input, hx, seed=3, forward_context=_autocast)
    truth = run_lstm(exact, _as_double(input), tuple(state.double() for state in hx), seed=3)
    _assert_within_twice_torch(ours, torch_bf16, truth)


@pytest.mark.parametrize("input_size,hidden,layers,bidirectional,batch,seq_len,packed,batch_first", CASES)
def test_autocast_inference_matches_float64_as_closely_as_torch(bf16_kernel, input_size, hidden, layers,
                                                                bidirectional, batch, seq_len, packed, batch_first):
    """Under no_grad the cpu backend runs all layers in one op (rnn_fast::cpu_lstm_inference) with bf16 weights."""
    reference, fused, exact = _modules(input_size, hidden, layers, bidirectional, batch_first)
    input = _input(batch, seq_len, input_size, packed, batch_first)
    directions = 2 if bidirectional else 1
    generator = torch.Generator().manual_seed(2)
    hx = tuple(torch.randn(layers * directions, batch, hidden, generator=generator) for _ in range(2))

    def outputs(module, input, hx, context=contextlib.nullcontext):
        with torch.no_grad(), context():
            output, (h_n, c_n) = module(input, hx)
        return {"output": output.data if packed else output, "h_n": h_n, "c_n": c_n}

    ours = outputs(fused, input, hx, _autocast)
    assert all(value.dtype == torch.bfloat16 for value in ours.values())
    _assert_within_twice_torch(ours, outputs(reference, input, hx, _autocast),
                               outputs(exact, _as_double(input), tuple(state.double() for state in hx)))


def test_autocast_dtypes_are_torch_ones(bf16_kernel):
    reference, fused, _ = _modules(7, 13, 2, True)
    x = torch.randn(9, 5, 7, requires_grad=True)
    hx = (torch.randn(4, 5, 13, requires_grad=True), torch.randn(4, 5, 13, requires_grad=True))
    results = {}
    for module in (reference, fused):
        with _autocast():
            output, (h_n, c_n) = module(x, hx)
        output.float().sum().backward()
        results[module] = [output.dtype, h_n.dtype, c_n.dtype, x.grad.dtype, hx[0].grad.dtype]
        results[module] += [p.dtype for p in module.parameters()] + [p.grad.dtype for p in module.parameters()]
    assert results[fused] == results[reference]
    assert all(p.dtype == torch.float32 for p in fused.parameters())  # the master weights stay fp32


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_bfloat16_module_matches_float64_as_closely_as_torch(bf16_kernel, bidirectional):
    reference, fused, exact = _modules(11, 24, 2, bidirectional)
    reference, fused = reference.bfloat16(), fused.bfloat16()
    exact.load_state_dict(reference.state_dict())  # the rounded weights, exactly
    input = _input(4, 10, 11, False, False, dtype=torch.bfloat16)
    assert fused.resolved_backend(input) == "cpu"
    ours = run_lstm(fused, input, None, seed=4)
    torch_bf16 = run_lstm(reference, input, None, seed=4)
    truth = run_lstm(exact, _as_double(input), None, seed=4)
    assert ours["output"].dtype == torch_bf16["output"].dtype == torch.bfloat16
    _assert_within_twice_torch(ours, torch_bf16, truth)


def test_inference_equals_training_forward(bf16_kernel):
    _, fused, _ = _modules(7, 13, 2, True)
    x = torch.randn(9, 5, 7)
    with _autocast():
        trained = fused(x)
        with torch.no_grad():
            inferred = fused(x)
    for a, b in zip((trained[0], *trained[1]), (inferred[0], *inferred[1])):
        assert torch.equal(a, b)


def test_gradients_survive_clipping_and_accumulation(bf16_kernel):
    """Two backward passes then clip_grad_norm_, against one pass doubled and clipped: an aliased gradient would be
    changed twice."""
    _, fused, _ = _modules(7, 13, 2, True)
    x = torch.randn(9, 5, 7)

    def backward():
        with _autocast():
            output, _ = fused(x)
        output.float().pow(2).sum().backward()

    backward()
    once = {name: grad.clone() for name, grad in gradients(fused).items()}
    fused.zero_grad(set_to_none=True)
    backward()
    backward()
    torch.nn.utils.clip_grad_norm_(fused.parameters(), 0.25)
    total = torch.cat([2 * grad.flatten() for grad in once.values()]).norm()
    for name, grad in gradients(fused).items():
        torch.testing.assert_close(grad, 2 * once[name] * min(1.0, 0.25 / (float(total) + 1e-6)), rtol=1e-6,
                                   atol=0, msg=lambda m: f"{name}: {m}")


def test_concurrent_calls_equal_calls_alone(bf16_kernel):
    _, fused, _ = _modules(16, 32, 2, True)
    inputs = [torch.randn(12, batch, 16) for batch in (1, 3, 8, 5)]

    def run(x):
        with torch.no_grad(), _autocast():
            return fused(x)[0]

    alone = [run(x) for x in inputs]
    together = [None] * len(inputs)

    def worker(index):
        for _ in range(3):
            together[index] = run(inputs[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_float16_falls_back_with_a_warning():
    choice = resolve_backend("cpu", torch.device("cpu"), torch.float16, 13)
    assert choice.name == "torch" and "float16" in choice.fallback_reason


def test_without_bf16_instructions_bf16_falls_back(monkeypatch):
    from rnn_fast.ops.lstm import cpu
    monkeypatch.setattr(cpu, "bf16_kernel", lambda: "")
    choice = resolve_backend("cpu", torch.device("cpu"), torch.bfloat16, 13)
    assert choice.name == "torch" and "AVX512-BF16" in choice.fallback_reason


def test_an_unknown_bf16_kernel_is_an_error(monkeypatch):
    monkeypatch.setenv("RNN_FAST_CPU_BF16", "amx")
    with pytest.raises(RuntimeError, match="RNN_FAST_CPU_BF16 must be"):
        torch.ops.rnn_fast.cpu_bf16_kernel()


def test_ops_with_bf16_weights_pass_opcheck(bf16_kernel):
    from rnn_fast.ops.lstm import cpu, extension
    D, T, B, H, K = 2, 4, 3, 5, 7
    xw = torch.randn(D, T, B, 4 * H, requires_grad=True)
    w_hh = torch.randn(D, 4 * H, H).bfloat16().requires_grad_()
    h0, c0 = torch.randn(D, B, H), torch.randn(D, B, H)
    torch.library.opcheck(extension.forward_op, (xw, w_hh, h0, c0, None))
    torch.library.opcheck(extension.inference_op, (xw.detach(), w_hh.detach(), h0, c0, None))
    parts = torch.randn(1, T, B, K).bfloat16()
    w_ih = torch.randn(D, 4 * H, K).bfloat16()
    torch.library.opcheck(cpu.projection_op, (parts, w_ih, torch.randn(D, 4 * H)))
    params = [torch.randn(4 * H, K).bfloat16(), torch.randn(4 * H, H).bfloat16(), torch.randn(4 * H),
              torch.randn(4 * H)]
    torch.library.opcheck(cpu.stack_inference_op, (torch.randn(T, B, K), h0[:1], c0[:1], params, True, 1, False,
                                                   None))


def test_auto_runs_bf16_fused_where_it_measured_faster(bf16_kernel):
    """backend="auto" under autocast bf16 follows rnn_fast.ops.lstm.cpu.auto_declines: training fused (large hidden
    sizes included) but for tiny calls; inference fused below a hidden size of 512."""
    large = rnn_fast.LSTM(8, 512)
    with _autocast():
        assert large.resolved_backend(torch.randn(3, 16, 8)) == "cpu"
        assert rnn_fast.LSTM(4, 8).resolved_backend(torch.randn(5, 1, 4)) == "torch"
        with torch.no_grad():
            assert large.resolved_backend(torch.randn(3, 16, 8)) == "torch"
            assert rnn_fast.LSTM(8, 256).resolved_backend(torch.randn(3, 16, 8)) == "cpu"
            assert rnn_fast.LSTM(8, 512, backend="cpu").resolved_backend(torch.randn(3, 16, 8)) == "cpu"
