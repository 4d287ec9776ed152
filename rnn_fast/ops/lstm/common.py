"""What every backend of the recurrence contract (docs/contract.md) shares: state dtypes, the default input
projection, the state entering each step, the one-GEMM ``grad_w_hh`` (both in cuDNN's GEMM precision), the packed
layout's conversions, and the autograd / fake registration of an op pair."""
import contextlib
from typing import Callable, Iterator, Optional, Type

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state is kept in at least fp32: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cudnn_rnn_allows_tf32() -> bool:
    """cuDNN RNNs' fp32 precision: the most specific of the RNN, cuDNN and global settings that is not "none".
    The legacy ``torch.backends.cudnn.allow_tf32`` sets the RNN one; reading it back raises once the RNN and
    convolution settings differ, so it is not read here. The CUDA launcher (csrc/cuda/lstm_cuda.cpp) reads the
    same setting through ``allowTF32CuDNN``."""
    for precision in (torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.fp32_precision,
                      torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def cudnn_fp32_precision(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``"tf32"`` or ``"ieee"``: how ``nn.LSTM``'s cuDNN path multiplies on ``device`` in ``dtype``, in its recurrence
    and in the GEMMs it runs itself (input projection, weight and input gradients). The fused recurrences and the
    driver's GEMMs follow it. None where the question does not arise (not fp32 on CUDA)."""
    if device.type != "cuda" or dtype != torch.float32:
        return None
    return "tf32" if cudnn_rnn_allows_tf32() else "ieee"


def _driver_gemm_precision(tensor: torch.Tensor) -> Optional[str]:
    """:func:`cudnn_fp32_precision` for the driver's GEMMs on ``tensor``; None under torch.compile, where Inductor
    fixes GEMM precision from torch's own setting when it compiles (and no flag is read while tracing)."""
    if torch.compiler.is_compiling():
        return None
    return cudnn_fp32_precision(tensor.device, tensor.dtype)


@contextlib.contextmanager
def matmul_precision(precision: Optional[str]) -> Iterator[None]:
    """cuBLAS's fp32 precision set to ``precision`` for the body, then restored; None leaves it alone."""
    if precision is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


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
    precision = _driver_gemm_precision(parts)
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
    with matmul_precision(_driver_gemm_precision(grad_xw)):
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

    return register_autograd_function(forward_op, backward, setup_context)


def _dense_grad(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # Kernels index grads as dense row-major arrays; autograd may hand over None or an expanded view.
    if grad is None:
        return torch.zeros_like(like)
    return grad.contiguous()
