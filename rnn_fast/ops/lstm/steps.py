"""The contract's step tensors (docs/contract.md), ``[D, T, B, W]`` padded or ``[D, N, W]`` packed: the order and the
rows of each direction's steps, the state entering each step, the conversions between the two layouts, and the
one-GEMM ``grad_w_hh`` over all steps."""
from typing import Optional

import torch

from .precision import driver_gemm_precision, matmul_precision


def step_order(direction: int, seq_len: int) -> range:
    """The steps of a direction in the order it runs them: 0 to T-1 forwards, T-1 to 0 in reverse."""
    return range(seq_len) if direction == 0 else range(seq_len - 1, -1, -1)


def valid_rows(lengths: Optional[torch.Tensor], t: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` bool: the rows still running at step t."""
    if lengths is None:
        return torch.ones(like.shape[0], 1, dtype=torch.bool, device=like.device)
    return (lengths.to(like.device) > t).unsqueeze(1)


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
    nothing. fp32 on CUDA runs in :func:`cudnn_fp32_precision`.
    """
    with matmul_precision(driver_gemm_precision(grad_xw)):
        return _recurrent_weight_grad(grad_xw, y, h0, lengths)


def _recurrent_weight_grad(grad_xw: torch.Tensor, y: torch.Tensor, h0: torch.Tensor,
                           lengths: Optional[torch.Tensor]) -> torch.Tensor:
    num_directions, seq_len, batch, _ = grad_xw.shape
    h0 = h0.to(grad_xw.dtype)
    y = y.to(grad_xw.dtype)

    def steps(tensor, start, stop):
        return tensor[start:stop].reshape(-1, tensor.shape[-1])

    forward = grad_xw[0, 0].t() @ h0[0]
    if seq_len > 1:
        forward = torch.addmm(forward, steps(grad_xw[0], 1, None).t(), steps(y[0], None, -1))
    if num_directions == 1:
        return forward.unsqueeze(0)
    row_last = (torch.full((batch,), seq_len - 1, device=grad_xw.device) if lengths is None
                else lengths.to(grad_xw.device) - 1)
    reverse = grad_xw[1, row_last, torch.arange(batch, device=grad_xw.device)].t() @ h0[1]
    if seq_len > 1:
        reverse = torch.addmm(reverse, steps(grad_xw[1], None, -1).t(), steps(y[1], 1, None))
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
    positions = _packed_positions(batch_sizes, num_rows, batch).to(steps.device)
    # Out of place, so that vmap can batch it (double backward of the packed ops).
    padded = steps.new_zeros(num_directions, seq_len * batch, width).index_copy(1, positions, steps)
    return padded.view(num_directions, seq_len, batch, width)


def padded_to_packed(steps: torch.Tensor, batch_sizes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[D, T, B, W]`` -> ``[D, N, W]`` in the packed layout, ``N = num_rows = sum(batch_sizes)``: the steps each
    row runs, in PackedSequence order."""
    num_directions, seq_len, batch, width = steps.shape
    positions = _packed_positions(batch_sizes, num_rows, batch).to(steps.device)
    return steps.reshape(num_directions, seq_len * batch, width)[:, positions]
