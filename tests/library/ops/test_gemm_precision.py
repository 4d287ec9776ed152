"""The driver's GEMMs (input projection, its input and weight gradients, ``grad_w_hh``) follow cuDNN's RNN precision
on CUDA fp32, as nn.LSTM's cuDNN path does (rnn_fast/ops/lstm/precision.py). The choice and the wiring are checked on
the CPU: which precision is chosen, that cuBLAS's setting is what every GEMM sees (forward and backward) and is
restored afterwards, and that the projection's own backward gives autograd's gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rnn_fast.ops.lstm import precision as lstm_precision
from rnn_fast.ops.lstm.precision import cudnn_fp32_precision, cudnn_rnn_allows_tf32, matmul_precision
from rnn_fast.ops.lstm.layer import project_parts
from rnn_fast.ops.lstm.steps import recurrent_weight_grad

GEMMS = {torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.baddbmm}
CUDA = torch.device("cuda")


@pytest.fixture
def cudnn_rnn_precision():
    """Sets cuDNN's RNN fp32 precision (the per-operator API) for the test, then restores it."""
    previous = torch.backends.cudnn.rnn.fp32_precision

    def set_precision(precision):
        torch.backends.cudnn.rnn.fp32_precision = precision

    yield set_precision
    torch.backends.cudnn.rnn.fp32_precision = previous


class GemmPrecisions(TorchDispatchMode):
    """cuBLAS's fp32 setting at every GEMM that runs under it, autograd's backward included."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMMS:
            self.seen.append((func.overloadpacket.__name__, torch.backends.cuda.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


def test_tf32_follows_cudnn_rnn_setting():
    """The setting nn.LSTM follows: legacy ``cudnn.allow_tf32``, or the newer ``cudnn.rnn.fp32_precision``. The two
    APIs are not mixed: torch refuses to read the legacy flag back once the RNN and convolution settings differ."""
    for legacy in (True, False):
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=legacy):
            assert cudnn_rnn_allows_tf32() is legacy
    previous = torch.backends.cudnn.rnn.fp32_precision
    try:
        for precision in ("tf32", "ieee"):
            torch.backends.cudnn.rnn.fp32_precision = precision
            assert cudnn_rnn_allows_tf32() is (precision == "tf32")
    finally:
        torch.backends.cudnn.rnn.fp32_precision = previous


@pytest.mark.parametrize("rnn_precision", ["tf32", "ieee"])
def test_cuda_float32_takes_cudnns_precision(cudnn_rnn_precision, rnn_precision):
    cudnn_rnn_precision(rnn_precision)
    assert cudnn_fp32_precision(CUDA, torch.float32) == rnn_precision
    for device, dtype in ((CUDA, torch.bfloat16), (CUDA, torch.float64), (torch.device("cpu"), torch.float32)):
        assert cudnn_fp32_precision(device, dtype) is None


def test_matmul_precision_is_set_then_restored():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    for precision in ("tf32", "ieee"):
        with matmul_precision(precision):
            assert matmul.fp32_precision == precision
        assert matmul.fp32_precision == before
    with matmul_precision(None):
        assert matmul.fp32_precision == before
    with pytest.raises(ZeroDivisionError), matmul_precision("tf32"):
        1 / 0
    assert matmul.fp32_precision == before


def _projection_inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    parts = torch.randn(2, 5, 3, 4, generator=generator, dtype=dtype, requires_grad=True)  # y of a BLSTM layer
    w_ih = torch.randn(2, 12, 8, generator=generator, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, 12, generator=generator, dtype=dtype, requires_grad=True)
    return parts, w_ih, bias


@pytest.mark.parametrize("rnn_precision", ["tf32", "ieee"])
def test_every_driver_gemm_runs_in_cudnns_precision(monkeypatch, rnn_precision):
    """Pretending the CPU is CUDA fp32 (only the choice is patched): the projection, both of its backward GEMMs and
    ``grad_w_hh`` all run under cuDNN's precision, and cuBLAS's setting is back afterwards."""
    monkeypatch.setattr(lstm_precision, "cudnn_fp32_precision", lambda device, dtype: rnn_precision)
    before = torch.backends.cuda.matmul.fp32_precision
    parts, w_ih, bias = _projection_inputs(torch.float32)
    with GemmPrecisions() as gemms:
        xw = project_parts(parts, w_ih, bias)
        xw.backward(torch.randn_like(xw))
        y, h0 = torch.randn(2, 5, 3, 3), torch.randn(2, 3, 3)
        recurrent_weight_grad(torch.randn(2, 5, 3, 12), y, h0, torch.tensor([5, 2, 4]))
    names = [name for name, _precision in gemms.seen]
    # Forward baddbmm; backward mm + addmm_ (input gradient over two directions) and bmm (weight gradient);
    # grad_w_hh: mm + addmm_ per direction.
    assert sorted(names) == sorted(["baddbmm", "mm", "addmm", "bmm", "mm", "addmm", "mm", "addmm"])
    assert {precision for _name, precision in gemms.seen} == {rnn_precision}
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_projection_backward_is_autograds(monkeypatch):
    """The projection's own backward (used on CUDA fp32) against autograd through the plain GEMM, in float64."""
    expected_inputs = _projection_inputs(torch.float64)
    expected = project_parts(*expected_inputs)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, expected_inputs, grad)

    monkeypatch.setattr(lstm_precision, "cudnn_fp32_precision", lambda device, dtype: "ieee")
    inputs = _projection_inputs(torch.float64)
    actual = project_parts(*inputs)
    (projection, _), = actual.grad_fn.next_functions  # under the view to [D, T, B, 4H]
    assert "ProjectionInPrecision" in type(projection).__name__
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
    for name, got, want in zip(("parts", "w_ih", "bias"), torch.autograd.grad(actual, inputs, grad), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=lambda m: f"grad {name}: {m}")
