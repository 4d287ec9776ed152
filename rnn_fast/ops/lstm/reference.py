"""The contract's backward in differentiable torch ops (docs/contract.md), padded and packed.

The naive backend's backward is this, and every backend's autograd rule (autograd.py) runs it instead of its own
backward op when autograd must differentiate the backward (``create_graph=True``, gradients reaching the saved
gates and cells), so that gradients of gradients are the reference's.
"""
from typing import Optional, Tuple

import torch

from .steps import (packed_lengths, packed_to_padded, padded_to_packed, previous_steps, recurrent_weight_grad,
                    step_order, valid_rows)


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
        for t in reversed(step_order(d, seq_len)):
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
            valid = valid_rows(lengths, t, dh)
            grad_pre = grad_pre * valid
            dh = torch.where(valid, grad_pre @ w, dh)
            dc = torch.where(valid, dc_t * f, dc)
            grad_steps[t] = grad_pre.to(grad_y.dtype)
        grad_xw.append(torch.stack(grad_steps))
        grad_h0.append(dh)
        grad_c0.append(dc)
    return (torch.stack(grad_xw), torch.stack(grad_h0).to(grad_h_n.dtype),
            torch.stack(grad_c0).to(grad_c_n.dtype))


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
