"""Checks of ``rnn_fast.LSTM`` against ``torch.nn.LSTM``, shared by the tests of every backend and device."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .ops.lstm import FUSED_BACKENDS, resolve_backend

# Absolute and relative tolerance per dtype for a backend run in full precision (IEEE for float32).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 2e-5}


def runnable_backends(device: torch.device) -> List[str]:
    """The fused backends this install runs on ``device`` in float32 and float64 (the dtypes the tests compare)."""
    return [name for name in FUSED_BACKENDS
            if all(resolve_backend(name, device, dtype, 5).name == name for dtype in TOLERANCES)]


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
    weighted_loss((output_data, h_n, c_n), seed).backward()
    result = {"output": output_data, "h_n": h_n, "c_n": c_n}
    result.update(gradients(module, input_leaf, hx))
    return result


def weighted_loss(tensors, seed: int) -> torch.Tensor:
    """A random weighting of every element of ``tensors``, summed: one backward of it reaches every gradient with
    a different weight per element. The same ``seed`` gives the same weights."""
    generator = torch.Generator(device=tensors[0].device).manual_seed(seed)
    return sum((tensor * torch.randn(tensor.shape, generator=generator, device=tensor.device,
                                     dtype=tensor.dtype)).sum() for tensor in tensors)


def gradients(module: nn.Module, input: Optional[torch.Tensor] = None,
              hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Dict[str, Optional[torch.Tensor]]:
    """``.grad`` of every parameter of ``module`` (``grad_<name>``), and of ``input`` and ``hx`` where given."""
    result = {}
    if input is not None:
        result["grad_input"] = input.grad
    if hx is not None:
        result["grad_h0"], result["grad_c0"] = hx[0].grad, hx[1].grad
    for name, parameter in module.named_parameters():
        result[f"grad_{name}"] = parameter.grad
    return result


def assert_named_close(expected: Dict[str, Optional[torch.Tensor]], actual: Dict[str, Optional[torch.Tensor]],
                           *, atol: float, rtol: float) -> None:
    """The same names, each tensor (an output, a gradient) present where expected and equal within the
    tolerances."""
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, f"{name}: expected None"
            continue
        assert actual[name] is not None, f"{name} is missing"
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_no_shared_storage(tensors: Dict[str, Optional[torch.Tensor]]) -> None:
    """No two of ``tensors`` share storage: whatever changes one in place (``clip_grad_norm_``, a backward that
    accumulates into ``.grad``) must leave the others alone, as it does for nn.LSTM's gradients."""
    owners: Dict[int, str] = {}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        storage = tensor.untyped_storage().data_ptr()
        assert storage not in owners, f"{name} shares storage with {owners[storage]}"
        owners[storage] = name


def assert_lstm_matches(reference: nn.LSTM, candidate: nn.LSTM, input, hx=None, *, atol: float, rtol: float,
                        seed: int = 0) -> None:
    """``candidate`` (with ``reference``'s weights) gives the same outputs and every gradient."""
    candidate.load_state_dict(reference.state_dict())
    expected = run_lstm(reference, input, hx, seed)
    actual = run_lstm(candidate, input, hx, seed)
    assert_named_close(expected, actual, atol=atol, rtol=rtol)
