"""Readable PyTorch reference of the recurrence contract (docs/contract.md).

Every fused backend is tested against this file and against ``torch.nn.LSTM``. It runs on any device and
dtype; it is slow, one small op at a time. Its backward is reference.py's differentiable one. The packed layout's
ops run the padded ones on the padded steps.
"""
from typing import Optional, Tuple

import torch

from .autograd import (register_inference_fake, register_packed_weight_grad_fake, register_recurrence_autograd,
                       register_recurrence_fake)
from .layer import project_parts
from .precision import state_dtype
from .reference import differentiable_backward, packed_differentiable_backward, packed_recurrent_weight_grad
from .steps import packed_lengths, packed_to_padded, padded_to_packed, step_order, valid_rows


def _forward(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
             lengths: Optional[torch.Tensor], save: bool):
    """``(y, h_n, c_n, gates, cell)``; gates and cell are None unless ``save``."""
    num_directions, seq_len, batch, gate_size = xw.shape
    hidden = gate_size // 4
    acc = state_dtype(xw.dtype)
    y = xw.new_zeros(num_directions, seq_len, batch, hidden)
    gates = xw.new_zeros(num_directions, seq_len, batch, gate_size, dtype=acc) if save else None
    cell = xw.new_zeros(num_directions, seq_len, batch, hidden, dtype=acc) if save else None
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    for d in range(num_directions):
        h, c = h0[d].to(acc), c0[d].to(acc)
        w = w_hh[d].to(acc)
        for t in step_order(d, seq_len):
            pre = xw[d, t].to(acc) + h @ w.t()
            i, f, g, o = pre.chunk(4, dim=1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c_next = f * c + i * g
            h_next = o * torch.tanh(c_next)
            valid = valid_rows(lengths, t, h)
            c = torch.where(valid, c_next, c)
            h = torch.where(valid, h_next, h)
            if save:
                gates[d, t] = torch.cat([i, f, g, o], dim=1) * valid
                cell[d, t] = c_next * valid
            y[d, t] = (h_next * valid).to(y.dtype)
        h_n[d], c_n[d] = h, c
    return y, h_n, c_n, gates, cell


def lstm_recurrence_forward(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                            lengths: Optional[torch.Tensor]
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(xw, w_hh, h0, c0, lengths, save=True)


def lstm_recurrence_inference_reference(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                                        lengths: Optional[torch.Tensor]
                                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h_n, c_n, _, _ = _forward(xw, w_hh, h0, c0, lengths, save=False)
    return y, h_n, c_n


def lstm_recurrence_backward(grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor,
                             w_hh: torch.Tensor, c0: torch.Tensor, gates: torch.Tensor, cell: torch.Tensor,
                             lengths: Optional[torch.Tensor]
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return differentiable_backward(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths)


# The packed layout [D, N, *] (PackedSequence data order, docs/contract.md): the padded reference on the padded
# steps, packed again.

def lstm_packed_recurrence_forward(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                                   batch_sizes: torch.Tensor
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_rows = h0.shape[1], xw.shape[1]
    y, h_n, c_n, gates, cell = lstm_recurrence_forward(packed_to_padded(xw, batch_sizes, batch), w_hh, h0, c0,
                                                       packed_lengths(batch_sizes, batch))
    return (padded_to_packed(y, batch_sizes, num_rows), h_n, c_n, padded_to_packed(gates, batch_sizes, num_rows),
            padded_to_packed(cell, batch_sizes, num_rows))


def lstm_packed_recurrence_inference_reference(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                                               c0: torch.Tensor, batch_sizes: torch.Tensor
                                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = h0.shape[1]
    y, h_n, c_n = lstm_recurrence_inference_reference(packed_to_padded(xw, batch_sizes, batch), w_hh, h0, c0,
                                                      packed_lengths(batch_sizes, batch))
    return padded_to_packed(y, batch_sizes, xw.shape[1]), h_n, c_n


def lstm_packed_recurrence_backward(grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor,
                                    w_hh: torch.Tensor, c0: torch.Tensor, gates: torch.Tensor, cell: torch.Tensor,
                                    batch_sizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return packed_differentiable_backward(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, batch_sizes)


# The reference runs as custom ops so that it goes through exactly the autograd and fake-tensor machinery the
# fused backends use; tests then check that machinery against nn.LSTM too.
def _custom_op(name, function):
    """The op's OpOverload: what the registrations take, and what torch.compile traces inside a Function."""
    torch.library.custom_op(f"rnn_fast::naive_{name}", mutates_args=())(function)
    return getattr(torch.ops.rnn_fast, f"naive_{name}").default


forward_op = _custom_op("lstm_recurrence_forward", lstm_recurrence_forward)
backward_op = _custom_op("lstm_recurrence_backward", lstm_recurrence_backward)
inference_op = _custom_op("lstm_recurrence_inference", lstm_recurrence_inference_reference)
packed_forward_op = _custom_op("lstm_packed_recurrence_forward", lstm_packed_recurrence_forward)
packed_backward_op = _custom_op("lstm_packed_recurrence_backward", lstm_packed_recurrence_backward)
packed_inference_op = _custom_op("lstm_packed_recurrence_inference", lstm_packed_recurrence_inference_reference)
packed_weight_grad_op = _custom_op("packed_recurrent_weight_grad", packed_recurrent_weight_grad)
for _forward_op, _backward_op, _inference_op in ((forward_op, backward_op, inference_op),
                                                  (packed_forward_op, packed_backward_op, packed_inference_op)):
    register_recurrence_fake(_forward_op, _backward_op)
    register_inference_fake(_inference_op)
register_packed_weight_grad_fake(packed_weight_grad_op)
forward_function = register_recurrence_autograd(forward_op, backward_op)
packed_forward_function = register_recurrence_autograd(packed_forward_op, packed_backward_op, packed_weight_grad_op)


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reason(device: torch.device, dtype: torch.dtype, hidden_size: int) -> Optional[str]:
    return None


input_projection = project_parts


lstm_recurrence = forward_function.apply

# InferenceBackend and PackedLayoutBackend (rnn_fast.ops.lstm): the inference ops themselves, the packed forward
# through its autograd.Function.
lstm_recurrence_inference = inference_op
lstm_packed_recurrence = packed_forward_function.apply
lstm_packed_recurrence_inference = packed_inference_op
