"""``backend="cpu"``: the fused C++/OpenMP recurrence of csrc/cpu/, float32 and float64, and bf16 where the CPU has
AVX512-BF16.

bf16 runs as nn.LSTM's oneDNN bf16 path computes (``BF16_PRODUCTS``): every matrix product takes bf16 operands and
accumulates in fp32, the pre-activations, gates and state stay fp32, and each layer's output is rounded to bf16. The
driver hands this backend bf16 inputs and weights with fp32 biases and state; the input projection returns fp32
``xw`` and the recurrence ops take bf16 ``w_hh`` with fp32 ``xw`` (csrc/cpu/bf16_gemm.h). Without AVX512-BF16 the
registry leaves bf16 to nn.LSTM; ``RNN_FAST_CPU_BF16=emulated`` runs the same products in fp32 arithmetic instead,
for tests.

It runs PackedSequence data in the packed layout (docs/contract.md): every step computes only the rows that run
it, and the input projection and weight gradients cover the real tokens only.

Besides the recurrence, this backend runs each layer's input projection through its own op
(``rnn_fast::cpu_input_projection``), whose output comes from the same cache of mapped blocks as the
recurrence's outputs: on CPU, page faults on a fresh ``xw`` cost as much as a recurrence op's gate math.
``release_cached_memory()`` gives those blocks back.

Importing this module fails with the rebuild command when rnn_fast._C is missing; the registry then reports
the backend as unavailable with that message.
"""
from typing import Optional

import torch

from .autograd import register_autograd_function, register_packed_weight_grad_fake, register_recurrence_autograd
from .extension import forward_function, inference_op, packed_backward_op, packed_forward_op, packed_inference_op
from .precision import state_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
BF16_PRODUCTS = True

projection_op = torch.ops.rnn_fast.cpu_input_projection.default
projection_backward_op = torch.ops.rnn_fast.cpu_input_projection_backward.default
packed_weight_grad_op = torch.ops.rnn_fast.cpu_packed_recurrent_weight_grad.default
stack_inference_op = torch.ops.rnn_fast.cpu_lstm_inference.default


register_packed_weight_grad_fake(packed_weight_grad_op)
packed_forward_function = register_recurrence_autograd(packed_forward_op, packed_backward_op, packed_weight_grad_op)


@torch.library.register_fake(stack_inference_op)
def _stack_inference_fake(input, h0, c0, params, has_biases, num_layers, bidirectional, batch_sizes):
    width = (2 if bidirectional else 1) * params[1].shape[1]
    return input.new_empty(*input.shape[:-1], width), torch.empty_like(h0), torch.empty_like(c0)


@torch.library.register_fake(projection_op)
def _projection_fake(parts, w_ih, bias):
    return parts.new_empty(w_ih.shape[0], *parts.shape[1:3], w_ih.shape[1], dtype=state_dtype(parts.dtype))


@torch.library.register_fake(projection_backward_op)
def _projection_backward_fake(grad_xw, parts, w_ih, output_mask):
    wanted = (parts.shape, w_ih.shape, w_ih.shape[:2])
    return tuple(parts.new_empty(shape) if keep else None for shape, keep in zip(wanted, output_mask))


def _projection_setup_context(ctx, inputs, output):
    parts, w_ih, bias = inputs
    ctx.save_for_backward(parts, w_ih)
    ctx.has_bias = bias is not None


def _projection_backward(ctx, grad_xw):
    parts, w_ih = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if parts.dtype == torch.bfloat16:
        # bf16 products: the gradient GEMMs take bf16 operands too (torch's own bf16 GEMMs); the bias sums in fp32.
        grad_parts, grad_w_ih, _ = _differentiable_projection_backward(grad_xw.to(torch.bfloat16), parts, w_ih,
                                                                       output_mask[:2] + [False])
        return grad_parts, grad_w_ih, grad_xw.sum((1, 2)) if output_mask[2] else None
    if torch.is_grad_enabled():
        # create_graph=True: the same gradients, in ops autograd can differentiate.
        return _differentiable_projection_backward(grad_xw, parts, w_ih, output_mask)
    return projection_backward_op(grad_xw.contiguous(), parts, w_ih, output_mask)


def _differentiable_projection_backward(grad_xw, parts, w_ih, output_mask):
    """The projection's gradients in torch ops (differentiable), one GEMM per direction and part on views: no copy
    of ``grad_xw`` or of contiguous parts."""
    num_directions, gate_size = w_ih.shape[:2]
    num_parts, seq_len, batch, width = parts.shape
    flat_grad = grad_xw.reshape(num_directions, seq_len * batch, gate_size)
    flat_parts = parts.reshape(num_parts, seq_len * batch, width)

    def part_weight(direction, part):
        return w_ih[direction, :, part * width:(part + 1) * width]

    grad_parts = grad_w_ih = grad_bias = None
    if output_mask[0]:
        grad_parts = torch.stack([
            sum(flat_grad[d] @ part_weight(d, p) for d in range(num_directions)) for p in range(num_parts)
        ]).view(parts.shape)
    if output_mask[1]:
        grad_w_ih = torch.stack([torch.cat([flat_grad[d].t() @ flat_parts[p] for p in range(num_parts)], dim=1)
                                 for d in range(num_directions)])
    if output_mask[2]:
        grad_bias = grad_xw.sum((1, 2))
    return grad_parts, grad_w_ih, grad_bias


projection_function = register_autograd_function(projection_op, _projection_backward, _projection_setup_context)


def unavailable_reason() -> Optional[str]:
    return None


def bf16_kernel() -> str:
    """What multiplies in bf16: ``"avx512_bf16"``, ``"emulated"`` (``RNN_FAST_CPU_BF16=emulated``) or ``""`` where
    this CPU has no bf16 instructions."""
    return torch.ops.rnn_fast.cpu_bf16_kernel()


def unsupported_reason(device: torch.device, dtype: torch.dtype, hidden_size: int) -> Optional[str]:
    if device.type != "cpu":
        return f"it runs on CPU tensors only, got device {device}"
    if dtype not in SUPPORTED_DTYPES:
        return f"it supports float32, float64 and bfloat16, got {dtype}"
    if dtype == torch.bfloat16 and not bf16_kernel():
        return "bfloat16 needs AVX512-BF16, which this CPU lacks"
    return None


# Where "auto" leaves a call to nn.LSTM's implementation, from benchmarks/test_lstm_cpu_shapes.py
# (benchmarks/results/cpu-shapes-*.json, AMD EPYC Zen 4, 2 threads): at a hidden size of 512 or more with 16 rows or
# more, or bidirectional, the call is bound by fp32 multiply-adds, which nn.LSTM's oneDNN kernels run at the
# machine's measured GEMM rate; there this backend ran at 0.67-0.98x. A training call of fewer than
# _MIN_TRAINING_MACS multiply-adds spends its time in dispatch and autograd, where nn.LSTM's one op is cheaper (H=32,
# B=1, T=35: 0.77x).
_AUTO_MIN_HIDDEN = 512
_AUTO_MIN_BATCH = 16
_MIN_TRAINING_MACS = 2_000_000


def auto_declines(call, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``"auto"`` leaves this call (``rnn_fast.ops.lstm.CallShape``) computing in ``dtype`` to nn.LSTM's
    implementation."""
    directions = 2 if call.bidirectional else 1
    macs = call.num_layers * directions * call.seq_len * call.batch * 8 * call.hidden_size ** 2
    if dtype == torch.bfloat16:
        # Under autocast bf16 (benchmarks/results/cpu-bf16-*.json, AMD EPYC Zen 4 with AVX512-BF16, 2 threads),
        # against nn.LSTM's oneDNN bf16 path: training ran at 0.89-6.5x, geomean 1.7-1.9x, large hidden sizes
        # most; inference at 0.89-2.2x below a hidden size of 512 and 0.65-1.0x from there on, where each step
        # streams MiBs of weights.
        if call.inference:
            return call.hidden_size >= _AUTO_MIN_HIDDEN
        return macs < _MIN_TRAINING_MACS
    if call.hidden_size >= _AUTO_MIN_HIDDEN and (call.batch >= _AUTO_MIN_BATCH or call.bidirectional):
        return True
    return not call.inference and macs < _MIN_TRAINING_MACS


def input_projection(parts: torch.Tensor, w_ih: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``xw [D, T, B, 4H]``, ``xw[d] = bias[d] + sum_p parts[p] @ w_ih[d][:, p*K:(p+1)*K]^T`` for ``parts [P, T, B, K]``
    (any strides whose last dimension is dense), ``w_ih [D, 4H, P*K]`` and ``bias [D, 4H]`` or None. bf16 ``parts``
    and ``w_ih`` give fp32 ``xw`` (with an fp32 bias), the products in bf16 (csrc/cpu/bf16_gemm.h)."""
    if parts.stride(-1) != 1 or parts.stride(-2) < parts.shape[-1]:
        parts = parts.contiguous()
    return projection_function.apply(parts, w_ih, bias)


lstm_recurrence = forward_function.apply

# InferenceBackend, PackedLayoutBackend and StackInferenceBackend (rnn_fast.ops.lstm): the inference ops
# themselves, the packed forward through its autograd.Function.
lstm_recurrence_inference = inference_op
lstm_packed_recurrence = packed_forward_function.apply
lstm_packed_recurrence_inference = packed_inference_op
lstm_stack_inference = stack_inference_op


def release_cached_memory() -> int:
    """Gives the unused output blocks this backend keeps for reuse back to the system; returns their bytes.

    Large outputs of the cpu ops come from a cache of mapped blocks (at most 2 GiB of them unused at a time), so
    that training does not pay page faults on every iteration. Call this after training to return that memory.
    """
    return torch.ops.rnn_fast.cpu_release_cached_blocks()
