"""The NSynth classifier's LSTM stack on each fused backend against nn.LSTM (cuDNN on a GPU), at the size it trains
at: 2 layers, input 160, hidden 128, T=100, B=768, batch-first; unidirectional, bidirectional, and bidirectional
packed with unsorted lengths; in IEEE float32, TF32 and bfloat16. Without CUDA, the same comparison at a tiny size
in float32.

Weights, input, states and the loss weighting are drawn once in float64, in values bfloat16 holds exactly, so that
every precision and implementation sees the same numbers. A backend passes where every output and gradient is
within twice nn.LSTM's own error against float64 in the same precision, or within ``ERROR_FLOOR`` (relative, in the
Frobenius norm): TF32 and bfloat16 have no fixed tolerance at this size, nn.LSTM's own error is the yardstick.
"""
import functools
from typing import Dict, NamedTuple

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_fast
from rnn_fast.testing import PRECISIONS, cudnn_tf32, relative_errors, runnable_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# An error this small against float64 passes in any precision: IEEE float32's tolerance.
ERROR_FLOOR = PRECISIONS["fp32"].tolerance


class Stack(NamedTuple):
    batch: int
    seq_len: int
    input_size: int
    hidden: int
    layers: int


STACK = Stack(768, 100, 160, 128, 2) if ON_CUDA else Stack(4, 3, 5, 4, 2)
BACKENDS = [name for name in runnable_backends(DEVICE) if name != "naive"]
# case -> (bidirectional, packed)
CASES = {"uni": (False, False), "bi": (True, False), "bi-packed": (True, True)}
CASE_PRECISIONS = list(PRECISIONS) if ON_CUDA else ["fp32"]


def _bfloat16_values(generator: torch.Generator, *size) -> torch.Tensor:
    return torch.randn(*size, generator=generator, dtype=torch.float64).bfloat16().double().to(DEVICE)


class Problem:
    """One case's float64 nn.LSTM and its input, states, lengths and loss weights."""

    def __init__(self, bidirectional: bool, packed: bool):
        generator = torch.Generator().manual_seed(3)
        directions = 2 if bidirectional else 1
        self.bidirectional = bidirectional
        self.reference = nn.LSTM(STACK.input_size, STACK.hidden, STACK.layers, batch_first=True,
                                 bidirectional=bidirectional, dtype=torch.float64)
        with torch.no_grad():
            for parameter in self.reference.parameters():
                parameter.copy_(parameter.bfloat16().double())
        self.reference.to(DEVICE)
        self.x = _bfloat16_values(generator, STACK.batch, STACK.seq_len, STACK.input_size)
        state_shape = (STACK.layers * directions, STACK.batch, STACK.hidden)
        self.hx = (_bfloat16_values(generator, *state_shape), _bfloat16_values(generator, *state_shape))
        self.output_weight = _bfloat16_values(generator, STACK.batch, STACK.seq_len, directions * STACK.hidden)
        self.state_weight = _bfloat16_values(generator, *state_shape)
        self.lengths = (torch.randint(max(1, STACK.seq_len // 10), STACK.seq_len + 1, (STACK.batch,),
                                      generator=generator) if packed else None)

    def module(self, backend: str, dtype: torch.dtype) -> nn.Module:
        """``nn.LSTM`` (backend ``"torch"``) or ``rnn_fast.LSTM`` with the reference's weights in ``dtype``."""
        kwargs = dict(batch_first=True, bidirectional=self.bidirectional, device=DEVICE, dtype=dtype)
        if backend == "torch":
            module = nn.LSTM(STACK.input_size, STACK.hidden, STACK.layers, **kwargs)
        else:
            module = rnn_fast.LSTM(STACK.input_size, STACK.hidden, STACK.layers, backend=backend, **kwargs)
            assert module.resolved_backend() == backend, f"{backend} would fall back to nn.LSTM here"
        module.load_state_dict(self.reference.state_dict())
        return module

    def run(self, module: nn.Module, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """Outputs and every gradient (input, h0, c0, each parameter) in float64, through the fixed weighting."""
        x = self.x.to(dtype).detach().clone().requires_grad_()
        hx = tuple(state.to(dtype).detach().clone().requires_grad_() for state in self.hx)
        input = x if self.lengths is None else pack_padded_sequence(x, self.lengths, batch_first=True,
                                                                     enforce_sorted=False)
        output, (h_n, c_n) = module(input, hx)
        if self.lengths is not None:
            output, _ = pad_packed_sequence(output, batch_first=True, total_length=STACK.seq_len)
        loss = ((output.double() * self.output_weight).sum() + (h_n.double() * self.state_weight).sum()
                + (c_n.double() * self.state_weight).sum())
        loss.backward()
        result = {"output": output, "h_n": h_n, "c_n": c_n, "grad_input": x.grad, "grad_h0": hx[0].grad,
                  "grad_c0": hx[1].grad}
        result.update({f"grad_{name}": parameter.grad for name, parameter in module.named_parameters()})
        return {name: value.detach().double() for name, value in result.items()}


@functools.lru_cache(maxsize=None)
def _problem(case: str) -> Problem:
    return Problem(*CASES[case])


@functools.lru_cache(maxsize=None)
def _torch_errors(case: str, precision: str) -> Dict[str, float]:
    """nn.LSTM's own error against float64 in ``precision``: computed once per case for every backend."""
    problem, setting = _problem(case), PRECISIONS[precision]
    exact = _exact(case)
    with cudnn_tf32(setting.tf32):
        return relative_errors(problem.run(problem.module("torch", setting.dtype), setting.dtype), exact)


@functools.lru_cache(maxsize=None)
def _exact(case: str) -> Dict[str, torch.Tensor]:
    problem = _problem(case)
    with cudnn_tf32(False):
        return problem.run(problem.reference, torch.float64)


@pytest.mark.parametrize("precision", CASE_PRECISIONS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_within_twice_nn_lstm_error(backend, case, precision):
    problem, setting = _problem(case), PRECISIONS[precision]
    with cudnn_tf32(setting.tf32):
        ours = relative_errors(problem.run(problem.module(backend, setting.dtype), setting.dtype), _exact(case))
    theirs = _torch_errors(case, precision)
    too_far = {name: f"{error:.2e} (nn.LSTM {theirs[name]:.2e})" for name, error in ours.items()
               if not error <= max(2 * theirs[name], ERROR_FLOOR)}
    assert not too_far, too_far
