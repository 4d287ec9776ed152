"""The autograd rules and fake kernels of the contract's ops (docs/contract.md), registered once per op pair in
either layout: whatever a backend's kernels compute, these say what shapes they return and how autograd
differentiates them."""
from typing import Callable, Optional, Type

import torch

from .precision import state_dtype
from .reference import differentiable_backward, packed_differentiable_backward, packed_recurrent_weight_grad
from .steps import recurrent_weight_grad


def register_recurrence_fake(forward_op, backward_op, saved_dtype=None) -> None:
    """Shapes and dtypes of a contract op pair, for FakeTensor / torch.compile, in either layout. ``saved_dtype(xw)``
    is the dtype of the saved gates and cells, ``state_dtype(xw.dtype)`` unless a backend says otherwise."""

    @torch.library.register_fake(forward_op)
    def _forward_fake(xw, w_hh, h0, c0, lengths, *extra):
        return _empty_forward_outputs(xw, h0, state_dtype(xw.dtype) if saved_dtype is None else saved_dtype(xw))

    @torch.library.register_fake(backward_op)
    def _backward_fake(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths, *extra):
        return (grad_y.new_empty(gates.shape), torch.empty_like(grad_h_n), torch.empty_like(grad_c_n))


def register_inference_fake(inference_op) -> None:
    """Shapes and dtypes of an inference forward, ``(xw, w_hh, h0, c0, lengths, *extra) -> (y, h_n, c_n)``, in
    either layout."""

    @torch.library.register_fake(inference_op)
    def _inference_fake(xw, w_hh, h0, c0, lengths, *extra):
        return _empty_forward_outputs(xw, h0, saved_dtype=None)


def register_packed_weight_grad_fake(weight_grad_op) -> None:
    """Shape of a packed layout's ``grad_w_hh`` op, ``(grad_xw [D, N, 4H], y [D, N, H], h0, batch_sizes) ->
    [D, 4H, H]``."""

    @torch.library.register_fake(weight_grad_op)
    def _weight_grad_fake(grad_xw, y, h0, batch_sizes):
        return grad_xw.new_empty(grad_xw.shape[0], grad_xw.shape[-1], y.shape[-1])


def _empty_forward_outputs(xw: torch.Tensor, h0: torch.Tensor, saved_dtype: Optional[torch.dtype]):
    """``(y, h_n, c_n)``, then ``gates, cell`` of ``saved_dtype`` unless it is None, for ``xw`` ``[D, T, B, 4H]``
    (padded) or ``[D, N, 4H]`` (packed): step tensors differ only in their last dimension."""
    rows, gate_size = xw.shape[:-1], xw.shape[-1]
    outputs = (xw.new_empty(*rows, gate_size // 4), torch.empty_like(h0), torch.empty_like(h0))
    if saved_dtype is None:
        return outputs
    return outputs + (xw.new_empty(*rows, gate_size, dtype=saved_dtype),
                      xw.new_empty(*rows, gate_size // 4, dtype=saved_dtype))


def register_autograd_function(op, backward: Callable, setup_context: Callable) -> Type[torch.autograd.Function]:
    """Registers ``backward`` and ``setup_context`` as ``op``'s autograd formula, and returns an autograd.Function
    that runs ``op`` with the same formula.

    The driver calls the Function. torch.func transforms (per-sample gradients, ``jacrev`` of ``jacrev``,
    gradgradcheck's batched check) differentiate an autograd.Function that has a ``setup_context``, but refuse an
    op's registered formula wherever a transform is active around it (pytorch/pytorch#179652). The registration
    serves whoever calls the op itself, ``opcheck`` among them. ``op`` is an OpOverload, the form torch.compile
    traces inside a Function."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    def forward(*inputs):
        return op(*inputs)

    return type(f"{op.name().split('::')[-1]}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                 "backward": staticmethod(backward), "generate_vmap_rule": True})


def register_recurrence_autograd(forward_op, backward_op,
                                 packed_weight_grad: Optional[Callable[..., torch.Tensor]] = None
                                 ) -> Type[torch.autograd.Function]:
    """Autograd for ``forward_op`` through ``backward_op``, plus the one-GEMM ``grad_w_hh``; returns the
    autograd.Function that the backend's driver calls (:func:`register_autograd_function`).

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
            reference_backward = differentiable_backward
            if packed_weight_grad is not None:
                reference_backward, weight_grad = packed_differentiable_backward, packed_recurrent_weight_grad
            grad_xw, grad_h0, grad_c0 = reference_backward(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths,
                                                           grad_gates, grad_cell)
        else:
            grad_xw, grad_h0, grad_c0 = backward_op(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths,
                                                    *ctx.extra)
        grad_w_hh = None
        if ctx.needs_input_grad[1]:
            # bf16 weights of fp32 steps (the cpu backend's bf16 products): the one GEMM takes bf16 operands too.
            products = grad_xw.to(w_hh.dtype) if w_hh.dtype == torch.bfloat16 and weight_grad is recurrent_weight_grad \
                else grad_xw
            grad_w_hh = weight_grad(products, y, h0, lengths).to(w_hh.dtype)
        return (grad_xw, grad_w_hh, grad_h0, grad_c0, None) + (None,) * len(ctx.extra)

    return register_autograd_function(forward_op, backward, setup_context)


def _dense_grad(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # Kernels index grads as dense row-major arrays; autograd may hand over None or an expanded view.
    if grad is None:
        return torch.zeros_like(like)
    return grad.contiguous()
