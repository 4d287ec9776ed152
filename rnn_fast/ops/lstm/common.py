"""What every backend of the recurrence contract (docs/contract.md) shares: state dtypes, the default input
projection, the state entering each step, the one-GEMM ``grad_w_hh``, the packed layout's conversions, and the
autograd / fake registration of an op pair."""
from typing import Callable, Optional

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state is kept in at least fp32: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def project_parts(parts: torch.Tensor, w_ih: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``xw [D, T, B, 4H]`` for ``parts [P, T, B, K]``: the parts side by side ``[T*B, P*K]``, times each
    direction's ``w_ih [4H, P*K]``, in one batched GEMM. The input projection of every backend without its own."""
    num_parts, seq_len, batch, width = parts.shape
    flat = parts.permute(1, 2, 0, 3).reshape(1, seq_len * batch, num_parts * width).expand(w_ih.shape[0], -1, -1)
    xw = (torch.bmm(flat, w_ih.transpose(1, 2)) if bias is None
          else torch.baddbmm(bias.unsqueeze(1), flat, w_ih.transpose(1, 2)))
    return xw.view(w_ih.shape[0], seq_len, batch, -1)


def previous_steps(seq: torch.Tensor, init: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """The state entering each step, ``[D, T, B, H]``, from the per-step states ``seq`` and the initial ``init``.

    Direction 0 enters step t with ``seq[0, t-1]`` (``init[0]`` at t=0). Direction 1 runs backwards and enters
    step t with ``seq[1, t+1]``, except at each row's own last step ``lengths[b]-1``, which it enters with
    ``init[1]``. Padded steps get whatever is there; their gate gradients are zero.
    """
    num_directions, seq_len = seq.shape[:2]
    init = init.to(seq.dtype)
    forward = torch.cat([init[0:1], seq[0, :-1]], dim=0)
    if num_directions == 1:
        return forward.unsqueeze(0)
    reverse = torch.cat([seq[1, 1:], init[1:2]], dim=0)
    if lengths is not None:
        steps = torch.arange(seq_len, device=seq.device)
        row_end = (steps[:, None] == (lengths.to(seq.device) - 1)[None, :]).unsqueeze(-1)
        reverse = torch.where(row_end, init[1].unsqueeze(0), reverse)
    return torch.stack([forward, reverse])


def recurrent_weight_grad(grad_xw: torch.Tensor, y: torch.Tensor, h0: torch.Tensor,
                          lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """``grad_w_hh[d] = sum_t grad_xw[d, t]^T @ h_prev[d, t]``: one large GEMM per direction over all steps.

    ``h_prev`` is read as slices of ``y`` rather than built (a copy of ``y`` per backward); the one step per row
    that starts from ``h0`` is added separately. Padded steps have zero ``grad_xw`` and zero ``y``, so they add
    nothing.
    """
    num_directions, seq_len, batch, _ = grad_xw.shape
    h0 = h0.to(grad_xw.dtype)
    y = y.to(grad_xw.dtype)

    def steps(tensor, start, stop):
        return tensor[start:stop].reshape(-1, tensor.shape[-1])

    forward = grad_xw[0, 0].t() @ h0[0]
    if seq_len > 1:
        forward = forward.addmm_(steps(grad_xw[0], 1, None).t(), steps(y[0], None, -1))
    if num_directions == 1:
        return forward.unsqueeze(0)
    row_last = (torch.full((batch,), seq_len - 1, device=grad_xw.device) if lengths is None
                else lengths.to(grad_xw.device) - 1)
    reverse = grad_xw[1, row_last, torch.arange(batch, device=grad_xw.device)].t() @ h0[1]
    if seq_len > 1:
        reverse = reverse.addmm_(steps(grad_xw[1], None, -1).t(), steps(y[1], 1, None))
    return torch.stack([forward, reverse])


def packed_lengths(batch_sizes: torch.Tensor, batch: int) -> torch.Tensor:
    """Each row's length, ``[B]`` int64, from PackedSequence's ``batch_sizes [T]`` (rows sorted by length)."""
    rows = torch.arange(batch, device=batch_sizes.device)
    return (batch_sizes.unsqueeze(1) > rows.unsqueeze(0)).sum(0)


def _packed_positions(batch_sizes: torch.Tensor, num_rows: int, batch: int) -> torch.Tensor:
    """For each of the ``num_rows`` packed rows, in data order, its index ``t * B + b`` in a padded ``[T, B]``.
    Sizes come from the arguments, not from batch_sizes' values, so that fake tensors can trace it."""
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    rows = torch.arange(num_rows, device=batch_sizes.device)
    steps = torch.searchsorted(offsets, rows, right=True) - 1
    return steps * batch + (rows - offsets[steps])


def packed_to_padded(steps: torch.Tensor, batch_sizes: torch.Tensor, batch: int) -> torch.Tensor:
    """``[D, N, W]`` in the packed layout -> ``[D, T, B, W]``, zeros at padded steps."""
    num_directions, num_rows, width = steps.shape
    seq_len = batch_sizes.shape[0]
    padded = steps.new_zeros(num_directions, seq_len * batch, width)
    padded[:, _packed_positions(batch_sizes, num_rows, batch).to(steps.device)] = steps
    return padded.view(num_directions, seq_len, batch, width)


def padded_to_packed(steps: torch.Tensor, batch_sizes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[D, T, B, W]`` -> ``[D, N, W]`` in the packed layout, ``N = num_rows = sum(batch_sizes)``: the steps each
    row runs, in PackedSequence order."""
    num_directions, seq_len, batch, width = steps.shape
    positions = _packed_positions(batch_sizes, num_rows, batch).to(steps.device)
    return steps.reshape(num_directions, seq_len * batch, width)[:, positions]


def register_recurrence_fake(forward_op, backward_op) -> None:
    """Shapes and dtypes of a contract op pair, for FakeTensor / torch.compile. Step tensors are ``[D, T, B, *]``
    (padded) or ``[D, N, *]`` (packed): only their last dimension differs between xw, y and the saved state."""

    @torch.library.register_fake(forward_op)
    def _forward_fake(xw, w_hh, h0, c0, lengths, *extra):
        rows, gate_size = xw.shape[:-1], xw.shape[-1]
        saved = state_dtype(xw.dtype)
        return (xw.new_empty(*rows, gate_size // 4), torch.empty_like(h0), torch.empty_like(c0),
                xw.new_empty(*rows, gate_size, dtype=saved), xw.new_empty(*rows, gate_size // 4, dtype=saved))

    @torch.library.register_fake(backward_op)
    def _backward_fake(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths, *extra):
        return (grad_y.new_empty(gates.shape), torch.empty_like(grad_h_n), torch.empty_like(grad_c_n))


def register_inference_fake(inference_op) -> None:
    """Shapes and dtypes of an inference op ``(xw, w_hh, h0, c0, lengths) -> (y, h_n, c_n)``, either layout."""

    @torch.library.register_fake(inference_op)
    def _inference_fake(xw, w_hh, h0, c0, lengths, *extra):
        return xw.new_empty(*xw.shape[:-1], xw.shape[-1] // 4), torch.empty_like(h0), torch.empty_like(c0)


def register_recurrence_autograd(forward_op, backward_op,
                                 packed_weight_grad: Optional[Callable[..., torch.Tensor]] = None) -> None:
    """Autograd for ``forward_op`` through ``backward_op``, plus the one-GEMM ``grad_w_hh``.

    An op pair of the packed layout (docs/contract.md), whose fifth input is ``batch_sizes``, passes its
    ``packed_weight_grad(grad_xw, y, h0, batch_sizes)``. Extra trailing inputs of ``forward_op`` (flags such as
    TF32) are handed to ``backward_op`` as they are. ``gates`` and ``cell`` are saved state, not differentiable
    outputs.
    """

    def setup_context(ctx, inputs, output):
        xw, w_hh, h0, c0, lengths, *extra = inputs
        y, _h_n, _c_n, gates, cell = output
        ctx.save_for_backward(w_hh, h0, c0, y, gates, cell, lengths)
        ctx.extra = tuple(extra)
        # Unused outputs (always gates and cell) would otherwise get zero-filled gradients allocated for them.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_y, grad_h_n, grad_c_n, grad_gates, grad_cell):
        w_hh, h0, c0, y, gates, cell, lengths = ctx.saved_tensors
        grad_y, grad_h_n, grad_c_n = (_dense_grad(g, like) for g, like in
                                      ((grad_y, y), (grad_h_n, h0), (grad_c_n, c0)))
        weight_grad = recurrent_weight_grad if packed_weight_grad is None else packed_weight_grad
        if torch.is_grad_enabled() or grad_gates is not None or grad_cell is not None:
            # create_graph=True wants a backward autograd can differentiate, and a double backward that reaches the
            # saved gates and cell brings gradients for them: both are the reference's, in differentiable ops.
            from . import naive  # naive.py imports this module
            differentiable_backward = naive.differentiable_backward
            if packed_weight_grad is not None:
                differentiable_backward = naive.packed_differentiable_backward
                weight_grad = naive.packed_recurrent_weight_grad
            grad_xw, grad_h0, grad_c0 = differentiable_backward(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell,
                                                                lengths, grad_gates, grad_cell)
        else:
            grad_xw, grad_h0, grad_c0 = backward_op(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths,
                                                    *ctx.extra)
        grad_w_hh = weight_grad(grad_xw, y, h0, lengths).to(w_hh.dtype) if ctx.needs_input_grad[1] else None
        return (grad_xw, grad_w_hh, grad_h0, grad_c0, None) + (None,) * len(ctx.extra)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def _dense_grad(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # Kernels index grads as dense row-major arrays; autograd may hand over None or an expanded view.
    if grad is None:
        return torch.zeros_like(like)
    return grad.contiguous()
