"""Readable PyTorch reference of the recurrence contract (docs/contract.md).

Every fused backend is tested against this file and against ``torch.nn.LSTM``. It runs on any device and
dtype; it is slow, one small op at a time. The packed layout's ops run the padded ones on the padded steps.
"""
from typing import Optional, Tuple

import torch

from .common import (packed_lengths, packed_to_padded, padded_to_packed, previous_steps, project_parts,
                     recurrent_weight_grad, register_inference_fake, register_recurrence_autograd,
                     register_recurrence_fake, state_dtype)


def _step_order(direction: int, seq_len: int) -> range:
    return range(seq_len) if direction == 0 else range(seq_len - 1, -1, -1)


def _valid_rows(lengths: Optional[torch.Tensor], t: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` bool: the rows still running at step t."""
    if lengths is None:
        return torch.ones(like.shape[0], 1, dtype=torch.bool, device=like.device)
    return (lengths.to(like.device) > t).unsqueeze(1)


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
        for t in _step_order(d, seq_len):
            pre = xw[d, t].to(acc) + h @ w.t()
            i, f, g, o = pre.chunk(4, dim=1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c_next = f * c + i * g
            h_next = o * torch.tanh(c_next)
            valid = _valid_rows(lengths, t, h)
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


def differentiable_backward(grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor,
                            w_hh: torch.Tensor, c0: torch.Tensor, gates: torch.Tensor, cell: torch.Tensor,
                            lengths: Optional[torch.Tensor], grad_gates: Optional[torch.Tensor] = None,
                            grad_cell: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract's backward in differentiable torch ops, for every backend's gradients of gradients.

    ``grad_gates`` / ``grad_cell`` are gradients reaching the saved ``gates`` / ``cell`` themselves, which happens
    when a double backward differentiates a first backward that read them.
    """
    num_directions, seq_len, batch, gate_size = gates.shape
    acc = torch.promote_types(gates.dtype, torch.float32)  # 16-bit saved state (CUDA's saved_16bit) counts in fp32
    cell_prev = previous_steps(cell, c0, lengths)
    # Built from lists and stacked, never written in place: vmap (gradgradcheck's batched check, jacrev of jacrev)
    # batches these ops, and an in-place copy of a batched value into an unbatched buffer is not allowed.
    grad_xw, grad_h0, grad_c0 = [], [], []
    for d in range(num_directions):
        dh, dc = grad_h_n[d].to(acc), grad_c_n[d].to(acc)
        w = w_hh[d].to(acc)
        grad_steps = [None] * seq_len
        for t in reversed(_step_order(d, seq_len)):
            i, f, g, o = gates[d, t].to(acc).chunk(4, dim=1)
            dh_t = dh + grad_y[d, t].to(acc)
            tanh_c = torch.tanh(cell[d, t].to(acc))
            dc_t = dc + dh_t * o * (1 - tanh_c * tanh_c)
            if grad_cell is not None:
                dc_t = dc_t + grad_cell[d, t].to(acc)
            grad_pre = torch.cat([dc_t * g * i * (1 - i),
                                  dc_t * cell_prev[d, t] * f * (1 - f),
                                  dc_t * i * (1 - g * g),
                                  dh_t * tanh_c * o * (1 - o)], dim=1)
            if grad_gates is not None:
                grad_pre = grad_pre + grad_gates[d, t].to(acc) * torch.cat([i * (1 - i), f * (1 - f), 1 - g * g,
                                                                            o * (1 - o)], dim=1)
            valid = _valid_rows(lengths, t, dh)
            grad_pre = grad_pre * valid
            dh = torch.where(valid, grad_pre @ w, dh)
            dc = torch.where(valid, dc_t * f, dc)
            grad_steps[t] = grad_pre.to(grad_y.dtype)
        grad_xw.append(torch.stack(grad_steps))
        grad_h0.append(dh)
        grad_c0.append(dc)
    return (torch.stack(grad_xw), torch.stack(grad_h0).to(grad_h_n.dtype),
            torch.stack(grad_c0).to(grad_c_n.dtype))


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


def packed_differentiable_backward(grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor,
                                   w_hh: torch.Tensor, c0: torch.Tensor, gates: torch.Tensor, cell: torch.Tensor,
                                   batch_sizes: torch.Tensor, grad_gates: Optional[torch.Tensor] = None,
                                   grad_cell: Optional[torch.Tensor] = None
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`differentiable_backward` in the packed layout, for every packed backend's gradients of gradients."""
    batch = grad_h_n.shape[1]

    def padded(steps):
        return None if steps is None else packed_to_padded(steps, batch_sizes, batch)

    grad_xw, grad_h0, grad_c0 = differentiable_backward(
        padded(grad_y), grad_h_n, grad_c_n, w_hh, c0, padded(gates), padded(cell), packed_lengths(batch_sizes, batch),
        padded(grad_gates), padded(grad_cell))
    return padded_to_packed(grad_xw, batch_sizes, gates.shape[1]), grad_h0, grad_c0


def packed_recurrent_weight_grad(grad_xw: torch.Tensor, y: torch.Tensor, h0: torch.Tensor,
                                 batch_sizes: torch.Tensor) -> torch.Tensor:
    """``grad_w_hh`` in the packed layout: the padded layout's one GEMM on the padded steps."""
    batch = h0.shape[1]
    return recurrent_weight_grad(packed_to_padded(grad_xw, batch_sizes, batch), packed_to_padded(y, batch_sizes, batch),
                                 h0, packed_lengths(batch_sizes, batch))


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
forward_function = register_recurrence_autograd(forward_op, backward_op)
packed_forward_function = register_recurrence_autograd(packed_forward_op, packed_backward_op, packed_weight_grad_op)


@torch.library.register_fake(packed_weight_grad_op)
def _packed_weight_grad_fake(grad_xw, y, h0, batch_sizes):
    return grad_xw.new_empty(grad_xw.shape[0], grad_xw.shape[-1], y.shape[-1])


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
