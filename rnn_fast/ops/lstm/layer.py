"""What the driver (rnn_fast/modules/lstm.py) hands the recurrence contract for one layer: its parameters gathered
per direction (:func:`layer_parameters`), and the input projection of every backend without its own
(:func:`project_parts`)."""
from typing import Optional

import torch

from .precision import driver_gemm_precision, matmul_precision


def _side_by_side(parts: torch.Tensor) -> torch.Tensor:
    """``parts [P, T, B, K]`` as one ``[T*B, P*K]`` matrix (a copy when P > 1)."""
    num_parts, seq_len, batch, width = parts.shape
    return parts.permute(1, 2, 0, 3).reshape(seq_len * batch, num_parts * width)


def _project(flat: torch.Tensor, w_ih: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    flat = flat.unsqueeze(0).expand(w_ih.shape[0], -1, -1)
    return (torch.bmm(flat, w_ih.transpose(1, 2)) if bias is None
            else torch.baddbmm(bias.unsqueeze(1), flat, w_ih.transpose(1, 2)))


class _ProjectionInPrecision(torch.autograd.Function):
    """The projection GEMM whose backward GEMMs (input and weight gradients) run in the forward's precision
    too; autograd's own backward of ``bmm`` would run in whatever precision is set when it runs."""

    @staticmethod
    def forward(ctx, flat, w_ih, bias, precision):
        ctx.save_for_backward(flat, w_ih)
        ctx.precision, ctx.has_bias = precision, bias is not None
        with matmul_precision(precision):
            return _project(flat, w_ih, bias)

    @staticmethod
    def backward(ctx, grad_xw):
        flat, w_ih = ctx.saved_tensors
        grad_flat = grad_w_ih = grad_bias = None
        with matmul_precision(ctx.precision):
            if ctx.needs_input_grad[0]:
                grad_flat = grad_xw[0] @ w_ih[0]
                for direction in range(1, w_ih.shape[0]):
                    grad_flat = torch.addmm(grad_flat, grad_xw[direction], w_ih[direction])
            if ctx.needs_input_grad[1]:
                grad_w_ih = torch.bmm(grad_xw.transpose(1, 2), flat.unsqueeze(0).expand(w_ih.shape[0], -1, -1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_xw.sum(1)
        return grad_flat, grad_w_ih, grad_bias, None


def project_parts(parts: torch.Tensor, w_ih: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``xw [D, T, B, 4H]`` for ``parts [P, T, B, K]``: the parts side by side ``[T*B, P*K]``, times each
    direction's ``w_ih [4H, P*K]``, in one batched GEMM. The input projection of every backend without its own.
    On CUDA in fp32, it and its backward GEMMs run in the precision of :func:`cudnn_fp32_precision`, as nn.LSTM's
    cuDNN path does."""
    _num_parts, seq_len, batch, _width = parts.shape
    flat = _side_by_side(parts)
    precision = driver_gemm_precision(parts)
    if precision is None:
        xw = _project(flat, w_ih, bias)
    else:
        xw = _ProjectionInPrecision.apply(flat, w_ih, bias, precision)
    return xw.view(w_ih.shape[0], seq_len, batch, -1)


class _LayerParameters(torch.autograd.Function):
    """One layer's parameters as the recurrence contract takes them: ``w_ih [D, 4H, In]``, ``w_hh [D, 4H, H]`` and
    ``bias_ih + bias_hh [D, 4H]`` (or None), from ``params``, each direction's ``(w_ih, w_hh[, b_ih, b_hh])`` in
    ``nn.RNNBase._flat_weights`` order.

    Its backward hands every parameter a gradient of its own storage, as nn.LSTM's does. Built from torch ops
    (stack, unsqueeze, add), the parameters' gradients would be views of one tensor: both biases of a direction
    the same memory, and the directions side by side in one storage. Autograd keeps such views as ``.grad`` when
    they are fresh, and then whatever changes ``.grad`` in place (``clip_grad_norm_``, a second backward that
    accumulates, ``GradScaler.unscale_``) changes them all, twice over for the biases."""

    generate_vmap_rule = True

    @staticmethod
    def forward(num_directions, has_bias, *params):
        per_direction = len(params) // num_directions

        def directions(kind):
            tensors = params[kind::per_direction]
            return tensors[0].unsqueeze(0) if num_directions == 1 else torch.stack(tensors)

        bias = directions(2) + directions(3) if has_bias else None
        return directions(0), directions(1), bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num_directions, ctx.has_bias = inputs[0], inputs[1]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_w_ih, grad_w_hh, grad_bias):
        num_directions = ctx.num_directions

        def own(grad, direction, shared):
            # One direction's slice, copied where another parameter's gradient would share its storage: the
            # other direction's slice, or the second bias of the same sum.
            if grad is None:
                return None
            part = grad[direction]
            return part.clone() if shared else part

        grads = []
        for direction in range(num_directions):
            grads += [own(grad_w_ih, direction, num_directions > 1), own(grad_w_hh, direction, num_directions > 1)]
            if ctx.has_bias:
                grads += [own(grad_bias, direction, num_directions > 1), own(grad_bias, direction, True)]
        return (None, None, *grads)


def layer_parameters(params, num_directions: int, has_bias: bool):
    """``(w_ih, w_hh, bias)`` of one layer for the recurrence contract, each parameter's gradient its own tensor
    (:class:`_LayerParameters`)."""
    return _LayerParameters.apply(num_directions, has_bias, *params)
