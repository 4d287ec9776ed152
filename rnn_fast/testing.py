"""Checks of ``rnn_fast.LSTM`` against ``torch.nn.LSTM``, shared by the tests of every backend and device."""
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

# Absolute and relative tolerance per dtype for a backend run in full precision (IEEE for float32).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 2e-5}


def _leaf_input(input):
    """A fresh leaf requiring grad with the same value (and packing) as ``input``."""
    if isinstance(input, PackedSequence):
        data = input.data.detach().clone().requires_grad_()
        return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), data
    leaf = input.detach().clone().requires_grad_()
    return leaf, leaf


def run_lstm(module: nn.LSTM, input, hx: Optional[Tuple[torch.Tensor, torch.Tensor]], seed: int
             ) -> Dict[str, torch.Tensor]:
    """Forward, then one backward through a random weighting of every output; returns outputs and all grads."""
    input, input_leaf = _leaf_input(input)
    if hx is not None:
        hx = tuple(state.detach().clone().requires_grad_() for state in hx)
    module.zero_grad(set_to_none=True)
    output, (h_n, c_n) = module(input, hx)
    output_data = output.data if isinstance(output, PackedSequence) else output
    generator = torch.Generator(device=output_data.device).manual_seed(seed)
    loss = sum((tensor * torch.randn(tensor.shape, generator=generator, device=tensor.device,
                                     dtype=tensor.dtype)).sum()
               for tensor in (output_data, h_n, c_n))
    loss.backward()
    result = {"output": output_data, "h_n": h_n, "c_n": c_n, "grad_input": input_leaf.grad}
    if hx is not None:
        result["grad_h0"], result["grad_c0"] = hx[0].grad, hx[1].grad
    for name, parameter in module.named_parameters():
        result[f"grad_{name}"] = parameter.grad
    return result


def assert_lstm_matches(reference: nn.LSTM, candidate: nn.LSTM, input, hx=None, *, atol: float, rtol: float,
                        seed: int = 0) -> None:
    """``candidate`` (with ``reference``'s weights) gives the same outputs and every gradient."""
    candidate.load_state_dict(reference.state_dict())
    expected = run_lstm(reference, input, hx, seed)
    actual = run_lstm(candidate, input, hx, seed)
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert actual[name] is not None, f"{name} is missing"
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
