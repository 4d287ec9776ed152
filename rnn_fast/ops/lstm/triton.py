"""The ``triton`` backend: the LSTM recurrence contract (docs/contract.md) as two persistent Triton kernels.

One launch per layer and pass. The grid is (batch tiles, directions): each program owns ``BLOCK_B`` batch rows of
one direction and runs the whole time loop itself; rows are independent, so programs never synchronise.

Tiles are kept transposed, hidden units by batch rows, so that the gate pre-activations of a step are
``W_gate @ h^T``: the recurrent weights are the MMA's left operand, with ``4H`` split into the four gates
(``M = H`` each) and the batch tile as ``N``, which may be as small as 16 rows.

Weights live in one of two places, chosen per launch by :func:`kernel_plan`:

* **resident**: the four ``[H, H]`` gate blocks are loaded once before the time loop and stay on chip; ``h`` and
  ``c`` stay in registers for the whole sequence. Used when the blocks fit the shared memory (bf16/fp16 up to
  H=128 on H100).
* **streamed**: larger weights (fp32 IEEE at H=128, anything at H=256) are read from L2 every step in chunks of
  ``BLOCK_K`` input units; the MMA's right operand is then re-read from what this program already wrote
  (``y`` or ``grad_xw``) after a barrier.

Precision. State and activations are fp32 (fp64 for fp64 inputs). With ``allow_tf32`` (fp32 inputs on CUDA
whenever cuDNN's LSTM would use TF32), the forward multiplies in fp16 with each weight row scaled by a power of two
into (-1, 1): fp16 keeps the same 11 significant bits as TF32, the scaling is exact, and ``|h| < 1`` needs no
scaling, so the products are as accurate as TF32's while the weights take half the space and can stay resident.
The backward's right operand (gate gradients) is unbounded, so it multiplies in TF32 proper.

Importing this module never needs triton: :func:`unavailable_reason` then says why the backend cannot run.
"""
import functools
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .autograd import register_inference_fake, register_recurrence_autograd, register_recurrence_fake
from .layer import project_parts
from .precision import cudnn_fp32_precision, state_dtype

try:
    import triton
    import triton.language as tl
except ImportError as error:  # triton is Linux-only and optional
    _TRITON_IMPORT_ERROR: Optional[ImportError] = error
else:
    _TRITON_IMPORT_ERROR = None

# @triton.jit reads TRITON_INTERPRET when the kernels below are decorated, i.e. at import.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_HIDDEN = 256
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Room left in shared memory beside resident weights, for the h tile and the compiler's layout conversions.
_SHARED_MEMORY_HEADROOM = 32 * 1024
# Without a device to ask (the interpreter), plan as for an H100-class part.
_DEFAULT_WEIGHT_BYTES_ON_CHIP = 128 * 1024
# Bytes of one gate's weight chunk in the streamed path: small enough to pass through registers.
_STREAMED_CHUNK_BYTES = 16 * 1024
# The MMA needs at least 16 along every dimension.
_MIN_BLOCK = 16
# What the autotuner tries on CUDA: (batch rows per program, warps), before pruning by tile_fits.
TILE_CANDIDATES = tuple((block_b, warps) for block_b in (16, 32, 64, 128) for warps in (4, 8, 16))

# Arguments the autotuner keys its choice on (plus the tensors' dtypes, which Triton adds).
AUTOTUNE_KEY = ("H", "B", "D", "BLOCK_K", "RESIDENT")
# Pins one tile, e.g. "32x8" (BLOCK_B=32, 8 warps), instead of autotuning: read once, when this module is imported.
TILE_ENV = "RNN_FAST_TRITON_TILE"
_WARP_COUNTS = (1, 2, 4, 8, 16, 32)

FORWARD_OP = "rnn_fast::triton_lstm_recurrence_forward"
BACKWARD_OP = "rnn_fast::triton_lstm_recurrence_backward"
INFERENCE_OP = "rnn_fast::triton_lstm_recurrence_inference"


def unavailable_reason() -> Optional[str]:
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if not torch.cuda.is_available() and not _INTERPRETED:
        return "the Triton backend needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"
    return None


def unsupported_reason(device: torch.device, dtype: torch.dtype, hidden_size: int) -> Optional[str]:
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if device.type != "cuda" and not _INTERPRETED:
        return f"the Triton kernels run on CUDA tensors, not {device.type} (TRITON_INTERPRET=1 runs them on the CPU)"
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels support {', '.join(map(str, SUPPORTED_DTYPES))}, not {dtype}"
    if dtype == torch.bfloat16 and _INTERPRETED:
        return "the Triton interpreter multiplies bfloat16 matrices as raw integers"
    if hidden_size > MAX_HIDDEN:
        return f"the Triton kernels keep a whole hidden state per program, up to hidden_size={MAX_HIDDEN}, " \
               f"not {hidden_size}"
    return None


input_projection = project_parts


def _allows_tf32(xw: torch.Tensor) -> bool:
    """fp32 on CUDA uses TF32 exactly when cuDNN's LSTM would."""
    return cudnn_fp32_precision(xw.device, xw.dtype) == "tf32"


def lstm_recurrence(xw, w_hh, h0, c0, lengths):
    """The differentiable forward of the contract: the forward op through its autograd.Function."""
    return _recurrence_function.apply(xw, w_hh, h0, c0, lengths, _allows_tf32(xw))


def lstm_recurrence_inference(xw, w_hh, h0, c0, lengths):
    """``(y, h_n, c_n)`` of the contract's forward without saving gates or cells, for calls that need no
    gradient (it has no autograd formula)."""
    return torch.ops.rnn_fast.triton_lstm_recurrence_inference(xw, w_hh, h0, c0, lengths, _allows_tf32(xw))


def pinned_tile(value: Optional[str] = None) -> Optional[Tuple[int, int]]:
    """``(BLOCK_B, num_warps)`` that ``RNN_FAST_TRITON_TILE`` (or ``value``) pins, or None (unset or empty: the
    autotuner picks among ``TILE_CANDIDATES``). ``"32x8"`` means 32 batch rows per program and 8 warps."""
    text = os.environ.get(TILE_ENV, "") if value is None else value
    if not text.strip():
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    block_b, warps = (int(group) for group in match.groups()) if match else (0, 0)
    if block_b < _MIN_BLOCK or block_b & (block_b - 1) or warps not in _WARP_COUNTS:
        raise ValueError(f"{TILE_ENV}={text!r} is not a tile: expected ROWSxWARPS, ROWS a power of two >= "
                         f"{_MIN_BLOCK} and WARPS one of {', '.join(map(str, _WARP_COUNTS))}, e.g. 32x8 "
                         f"(the autotuner's candidates: {', '.join(f'{b}x{w}' for b, w in TILE_CANDIDATES)})")
    return block_b, warps


@dataclass(frozen=True)
class KernelPlan:
    """Compile-time shape of one launch: padded hidden size, input-unit chunk, and whether weights stay on chip."""
    block_h: int
    block_k: int
    resident: bool


def kernel_plan(hidden_size: int, operand_dtype: torch.dtype, device: torch.device,
                weight_bytes_on_chip: Optional[int] = None) -> KernelPlan:
    block_h = max(_MIN_BLOCK, 1 << (hidden_size - 1).bit_length())
    if weight_bytes_on_chip is None:
        weight_bytes_on_chip = _weight_bytes_on_chip(device)
    if 4 * block_h * block_h * operand_dtype.itemsize <= weight_bytes_on_chip:
        return KernelPlan(block_h, block_h, resident=True)
    block_k = _MIN_BLOCK
    while block_k < block_h and 2 * block_k * block_h * operand_dtype.itemsize <= _STREAMED_CHUNK_BYTES:
        block_k *= 2
    return KernelPlan(block_h, block_k, resident=False)


@functools.lru_cache(maxsize=None)
def _shared_memory_bytes(device_index: int) -> int:
    properties = torch.cuda.get_device_properties(device_index)
    return getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)


def _weight_bytes_on_chip(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_WEIGHT_BYTES_ON_CHIP
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _shared_memory_bytes(index) - _SHARED_MEMORY_HEADROOM


def tile_fits(block_b: int, block_h: int, num_warps: int) -> bool:
    """Whether the ~6 live ``[block_h, block_b]`` fp32 tiles of a program have a chance to fit its registers."""
    return block_b * block_h <= 512 * num_warps


def _forward_weights(w_hh: torch.Tensor, allow_tf32: bool):
    """The forward's MMA operand: ``(weights, per-row scale or None)``."""
    if w_hh.dtype == torch.float32 and allow_tf32:
        # Power-of-two row scales put every row in (-1, 1) exactly; fp16 then rounds like TF32 (see module doc).
        _mantissa, exponent = torch.frexp(w_hh.abs().amax(dim=-1))
        scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)
        return (w_hh / scale.unsqueeze(-1)).to(torch.float16), scale
    return w_hh, None


def _backward_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _check_contract(dtype: torch.dtype, tensors, lengths: Optional[torch.Tensor]) -> None:
    for tensor in tensors:
        torch._check(tensor.is_contiguous(), lambda: "the Triton LSTM kernels need contiguous tensors")
        torch._check(tensor.dtype == dtype, lambda: f"the Triton LSTM kernels need {dtype} throughout, "
                                                    f"got {tensor.dtype}")
    if lengths is not None:
        torch._check(lengths.device == tensors[0].device, lambda: "lengths must be on the inputs' device")


if _TRITON_IMPORT_ERROR is None:

    def _autotune_configs():
        # One stage: the streamed path re-reads what the previous step wrote, which a software pipeline would
        # prefetch before it is written; the time loop has no independent iterations to overlap anyway.
        pinned = pinned_tile()
        if pinned or _INTERPRETED:
            # One tile, so no autotuning: the pinned one, or the interpreter's (it ignores warps, and benchmarking
            # configs would multiply its slow runs).
            block_b, warps = pinned or (_MIN_BLOCK, 4)
            return [triton.Config({"BLOCK_B": block_b}, num_warps=warps, num_stages=1)]
        return [triton.Config({"BLOCK_B": block_b}, num_warps=warps, num_stages=1)
                for block_b, warps in TILE_CANDIDATES]

    def _prune_configs(configs, named_args, **kwargs):
        """Drop batch tiles wider than the batch, and tiles whose ~6 live [H, BLOCK_B] fp32 tiles would spill."""
        args = {**named_args, **kwargs}
        batch_tile_cap = max(_MIN_BLOCK, triton.next_power_of_2(args["B"]))
        kept = [config for config in configs
                if config.kwargs["BLOCK_B"] <= batch_tile_cap
                and tile_fits(config.kwargs["BLOCK_B"], args["BLOCK_H"], config.num_warps)]
        return kept or [min(configs, key=lambda config: (config.kwargs["BLOCK_B"], -config.num_warps))]

    def _tuned(kernel):
        # D is in the key: a bidirectional launch runs twice the programs, so its best tile may differ.
        return triton.autotune(configs=_autotune_configs(), key=list(AUTOTUNE_KEY),
                               prune_configs_by={"early_config_prune": _prune_configs})(kernel)

    @triton.jit
    def _tanh(x):
        return 2 * tl.sigmoid(2 * x) - 1

    @triton.jit
    def _gate_weights(p_w_d, gate, H, o_out, o_in):
        """``W_hh[d, gate*H + o_out, o_in]`` for broadcastable index tiles; zero outside ``H``."""
        return tl.load(p_w_d + (gate * H + o_out) * H + o_in, mask=(o_out < H) & (o_in < H), other=0)

    @triton.jit
    def _all_gate_weights(p_w_d, H, o_out, o_in):
        """The four gate blocks of ``W_hh[d]``, transposed when ``o_out`` runs along the tile's columns."""
        return (_gate_weights(p_w_d, 0, H, o_out, o_in), _gate_weights(p_w_d, 1, H, o_out, o_in),
                _gate_weights(p_w_d, 2, H, o_out, o_in), _gate_weights(p_w_d, 3, H, o_out, o_in))

    @triton.jit
    def _program_tile(i_b, i_d, B, H, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr):
        """This program's [hidden, batch] tile: hidden units ``o_h``, rows ``i_rows``, the valid rows ``m_b`` and
        elements ``m_hb``, in-tile offsets in rows of ``H`` (``o_hb``) and ``4H`` (``o_gb``) elements, and where its
        rows start in a ``[D, B, H]`` state (``o_state``)."""
        o_h = tl.arange(0, BLOCK_H)
        i_rows = tl.arange(0, BLOCK_B)
        m_b = i_b * BLOCK_B + i_rows < B
        m_hb = (o_h < H)[:, None] & m_b[None, :]
        o_hb = i_rows[None, :] * H + o_h[:, None]
        o_gb = i_rows[None, :] * 4 * H + o_h[:, None]
        o_state = (i_d * B + i_b * BLOCK_B) * H
        return o_h, i_rows, m_b, m_hb, o_hb, o_gb, o_state

    @triton.jit
    def _row_lengths(p_lengths, i_b, i_rows, m_b, T, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
        """``[1, BLOCK_B]`` lengths of this program's rows: all ``T`` without lengths, 1 past the batch."""
        if HAS_LENGTHS:
            b_len = tl.load(p_lengths + i_b * BLOCK_B + i_rows, mask=m_b, other=1)[None, :]
        else:
            b_len = tl.full([1, BLOCK_B], T, dtype=tl.int64)
        return b_len

    @triton.jit
    def _program_steps(b_len, T, HAS_LENGTHS: tl.constexpr):
        """How far this program's rows reach: its longest row's length (``T`` without lengths)."""
        if HAS_LENGTHS:
            n_steps = tl.max(b_len).to(tl.int32)
        else:
            n_steps = T
        return n_steps

    @triton.jit
    def _step_has_rows(s, n_steps, HAS_LENGTHS: tl.constexpr):
        """Whether step ``s`` is inside any of this program's rows. The steps past its longest row are all padding:
        its forward direction stops computing there and its reverse direction starts computing there, in both
        passes, and the steps in between get only the contract's zeros."""
        if HAS_LENGTHS:
            has_rows = s < n_steps
        else:
            has_rows = True
        return has_rows

    @triton.jit
    def _step_rows(p_steps, i_d, s, T, B, i_b, row_size, BLOCK_B: tl.constexpr):
        """This program's first batch row at step ``s`` of a ``[D, T, B, row_size]`` tensor. Per-step pointers
        are this int64 base plus a loop-invariant int32 tile offset, which keeps 64-bit tiles out of registers."""
        return p_steps + ((i_d * T + s) * B + i_b * BLOCK_B) * row_size

    @triton.jit
    def _entering_state_ptrs(p_steps, p_init, i_d, s, b_first, T, B, H, i_b, o_tile, BLOCK_B: tl.constexpr):
        """Pointers to the state step ``s`` starts from: the previously processed step of ``p_steps``
        ([D, T, B, H]) or, at a row's first step, ``p_init`` ([D, B, H])."""
        p_prev = _step_rows(p_steps, i_d, s - 1 + 2 * i_d, T, B, i_b, H, BLOCK_B) + o_tile
        p_start = p_init + (i_d * B + i_b * BLOCK_B) * H + o_tile
        return tl.where(b_first, p_start, p_prev)

    @triton.jit
    def _store_gates(p_gates_t, b_i, b_f, b_g, b_o, H, m_hb):
        """One step's four gate tiles (activations or their gradients) into a ``[.., 4H]`` row block."""
        tl.store(p_gates_t, b_i, mask=m_hb)
        tl.store(p_gates_t + H, b_f, mask=m_hb)
        tl.store(p_gates_t + 2 * H, b_g, mask=m_hb)
        tl.store(p_gates_t + 3 * H, b_o, mask=m_hb)

    @triton.jit
    def _store_forward_step(p_y, p_cell, p_gates, i_d, s, T, B, H, i_b, o_hb, o_gb, m_hb,
                            b_h, b_c, b_i, b_f, b_g, b_o, BLOCK_B: tl.constexpr, STORE_SAVED: tl.constexpr):
        """``y`` of step ``s`` and, for a backward, its cell and gates."""
        tl.store(_step_rows(p_y, i_d, s, T, B, i_b, H, BLOCK_B) + o_hb, b_h, mask=m_hb)
        if STORE_SAVED:
            tl.store(_step_rows(p_cell, i_d, s, T, B, i_b, H, BLOCK_B) + o_hb, b_c, mask=m_hb)
            _store_gates(_step_rows(p_gates, i_d, s, T, B, i_b, 4 * H, BLOCK_B) + o_gb, b_i, b_f, b_g, b_o, H, m_hb)

    @_tuned
    @triton.heuristics({"HAS_LENGTHS": lambda args: args["p_lengths"] is not None,
                        "HAS_W_SCALE": lambda args: args["p_w_scale"] is not None,
                        "STORE_SAVED": lambda args: args["p_gates"] is not None})
    @triton.jit(do_not_specialize=["T"])
    def _lstm_forward_kernel(p_xw, p_w, p_w_scale, p_h0, p_c0, p_lengths,
                             p_y, p_h_n, p_c_n, p_gates, p_cell,
                             T, B, H, D,
                             BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
                             RESIDENT: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_W_SCALE: tl.constexpr,
                             STORE_SAVED: tl.constexpr):
        # fp32 operands mean IEEE here; TF32 comes as fp16 operands with row scales (module doc). Without
        # STORE_SAVED (inference) gates and cell are not written, and p_gates / p_cell are None. D (the directions,
        # the grid's second axis) is an argument only for the autotune key, in both kernels.
        i_b = tl.program_id(0).to(tl.int64)
        i_d = tl.program_id(1).to(tl.int64)
        # precision.state_dtype: fp64 stays fp64, everything else runs in fp32.
        state_ty = tl.float64 if p_xw.dtype.element_ty == tl.float64 else tl.float32
        operand_ty = p_w.dtype.element_ty
        o_h, i_rows, m_b, m_hb, o_hb, o_gb, o_state = _program_tile(i_b, i_d, B, H, BLOCK_H, BLOCK_B)
        b_h = tl.load(p_h0 + o_state + o_hb, mask=m_hb, other=0).to(state_ty)
        b_c = tl.load(p_c0 + o_state + o_hb, mask=m_hb, other=0).to(state_ty)
        b_len = _row_lengths(p_lengths, i_b, i_rows, m_b, T, HAS_LENGTHS, BLOCK_B)
        n_steps = _program_steps(b_len, T, HAS_LENGTHS)
        p_w_d = p_w + i_d * 4 * H * H
        if HAS_W_SCALE:
            p_scale_d = p_w_scale + i_d * 4 * H + o_h
            b_scale_i = tl.load(p_scale_d, mask=o_h < H, other=1)[:, None]
            b_scale_f = tl.load(p_scale_d + H, mask=o_h < H, other=1)[:, None]
            b_scale_g = tl.load(p_scale_d + 2 * H, mask=o_h < H, other=1)[:, None]
            b_scale_o = tl.load(p_scale_d + 3 * H, mask=o_h < H, other=1)[:, None]
        if RESIDENT:
            b_w_i, b_w_f, b_w_g, b_w_o = _all_gate_weights(p_w_d, H, o_h[:, None], o_h[None, :])

        for t in range(T):
            # Direction 1 walks the sequence backwards.
            s = t + i_d * (T - 1 - 2 * t)
            if _step_has_rows(s, n_steps, HAS_LENGTHS):
                b_active = s < b_len
                if RESIDENT:
                    b_h_op = b_h.to(operand_ty)
                    b_a_i = tl.dot(b_w_i, b_h_op, input_precision="ieee", out_dtype=state_ty)
                    b_a_f = tl.dot(b_w_f, b_h_op, input_precision="ieee", out_dtype=state_ty)
                    b_a_g = tl.dot(b_w_g, b_h_op, input_precision="ieee", out_dtype=state_ty)
                    b_a_o = tl.dot(b_w_o, b_h_op, input_precision="ieee", out_dtype=state_ty)
                else:
                    # h_{t-1} comes back from y (or h0), which this program's threads wrote: wait for all of them.
                    # Padded steps are masked: their previous step may lie outside the sequence.
                    tl.debug_barrier()
                    b_first = s == i_d * (b_len - 1)
                    b_a_i = tl.zeros([BLOCK_H, BLOCK_B], dtype=state_ty)
                    b_a_f = tl.zeros([BLOCK_H, BLOCK_B], dtype=state_ty)
                    b_a_g = tl.zeros([BLOCK_H, BLOCK_B], dtype=state_ty)
                    b_a_o = tl.zeros([BLOCK_H, BLOCK_B], dtype=state_ty)
                    for k0 in range(0, BLOCK_H, BLOCK_K):
                        o_k = k0 + tl.arange(0, BLOCK_K)
                        p_h_prev = _entering_state_ptrs(p_y, p_h0, i_d, s, b_first, T, B, H, i_b,
                                                        i_rows[None, :] * H + o_k[:, None], BLOCK_B)
                        # .cg reads through L2, where this program's own writes are sure to be.
                        b_h_op = tl.load(p_h_prev, mask=(o_k < H)[:, None] & m_b[None, :] & b_active, other=0,
                                         cache_modifier=".cg").to(operand_ty)
                        # out_dtype: Triton 3.6 requires it to match an fp64 accumulator (its default is fp32).
                        b_a_i = tl.dot(_gate_weights(p_w_d, 0, H, o_h[:, None], o_k[None, :]), b_h_op, b_a_i,
                                       input_precision="ieee", out_dtype=state_ty)
                        b_a_f = tl.dot(_gate_weights(p_w_d, 1, H, o_h[:, None], o_k[None, :]), b_h_op, b_a_f,
                                       input_precision="ieee", out_dtype=state_ty)
                        b_a_g = tl.dot(_gate_weights(p_w_d, 2, H, o_h[:, None], o_k[None, :]), b_h_op, b_a_g,
                                       input_precision="ieee", out_dtype=state_ty)
                        b_a_o = tl.dot(_gate_weights(p_w_d, 3, H, o_h[:, None], o_k[None, :]), b_h_op, b_a_o,
                                       input_precision="ieee", out_dtype=state_ty)
                if HAS_W_SCALE:
                    b_a_i *= b_scale_i
                    b_a_f *= b_scale_f
                    b_a_g *= b_scale_g
                    b_a_o *= b_scale_o
                # Padded steps compute on whatever is there, then carry the state and write zeros.
                p_xw_t = _step_rows(p_xw, i_d, s, T, B, i_b, 4 * H, BLOCK_B) + o_gb
                b_i = tl.sigmoid(tl.load(p_xw_t, mask=m_hb, other=0).to(state_ty) + b_a_i)
                b_f = tl.sigmoid(tl.load(p_xw_t + H, mask=m_hb, other=0).to(state_ty) + b_a_f)
                b_g = _tanh(tl.load(p_xw_t + 2 * H, mask=m_hb, other=0).to(state_ty) + b_a_g)
                b_o = tl.sigmoid(tl.load(p_xw_t + 3 * H, mask=m_hb, other=0).to(state_ty) + b_a_o)
                b_c_new = b_f * b_c + b_i * b_g
                b_h_new = b_o * _tanh(b_c_new)
                b_c = tl.where(b_active, b_c_new, b_c)
                b_h = tl.where(b_active, b_h_new, b_h)
                _store_forward_step(p_y, p_cell, p_gates, i_d, s, T, B, H, i_b, o_hb, o_gb, m_hb,
                                    tl.where(b_active, b_h_new, 0), tl.where(b_active, b_c_new, 0),
                                    tl.where(b_active, b_i, 0), tl.where(b_active, b_f, 0), tl.where(b_active, b_g, 0),
                                    tl.where(b_active, b_o, 0), BLOCK_B, STORE_SAVED)
            else:
                # Past all of this program's rows: no compute, only the contract's zeros.
                b_zero = tl.zeros([BLOCK_H, BLOCK_B], dtype=state_ty)
                _store_forward_step(p_y, p_cell, p_gates, i_d, s, T, B, H, i_b, o_hb, o_gb, m_hb,
                                    b_zero, b_zero, b_zero, b_zero, b_zero, b_zero, BLOCK_B, STORE_SAVED)

        tl.store(p_h_n + o_state + o_hb, b_h, mask=m_hb)
        tl.store(p_c_n + o_state + o_hb, b_c, mask=m_hb)

    @_tuned
    @triton.heuristics({"HAS_LENGTHS": lambda args: args["p_lengths"] is not None})
    @triton.jit(do_not_specialize=["T"])
    def _lstm_backward_kernel(p_grad_y, p_grad_h_n, p_grad_c_n, p_w, p_c0, p_gates, p_cell, p_lengths,
                              p_grad_xw, p_grad_h0, p_grad_c0,
                              T, B, H, D,
                              BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
                              RESIDENT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              HAS_LENGTHS: tl.constexpr):
        i_b = tl.program_id(0).to(tl.int64)
        i_d = tl.program_id(1).to(tl.int64)
        state_ty = p_cell.dtype.element_ty
        operand_ty = p_w.dtype.element_ty
        o_h, i_rows, m_b, m_hb, o_hb, o_gb, o_state = _program_tile(i_b, i_d, B, H, BLOCK_H, BLOCK_B)
        b_dh = tl.load(p_grad_h_n + o_state + o_hb, mask=m_hb, other=0).to(state_ty)
        b_dc = tl.load(p_grad_c_n + o_state + o_hb, mask=m_hb, other=0).to(state_ty)
        b_c0 = tl.load(p_c0 + o_state + o_hb, mask=m_hb, other=0).to(state_ty)
        b_len = _row_lengths(p_lengths, i_b, i_rows, m_b, T, HAS_LENGTHS, BLOCK_B)
        n_steps = _program_steps(b_len, T, HAS_LENGTHS)
        p_w_d = p_w + i_d * 4 * H * H
        if RESIDENT:
            # Transposed gate blocks, [input unit, gate unit]: dh = sum_gate W_gate^T @ dgate.
            b_wt_i, b_wt_f, b_wt_g, b_wt_o = _all_gate_weights(p_w_d, H, o_h[None, :], o_h[:, None])

        for t in range(T):
            # Steps in reverse processing order: direction 0 from T-1 down, direction 1 from 0 up.
            s = T - 1 - t + i_d * (2 * t + 1 - T)
            if _step_has_rows(s, n_steps, HAS_LENGTHS):
                b_active = s < b_len
                b_first = s == i_d * (b_len - 1)
                p_gates_t = _step_rows(p_gates, i_d, s, T, B, i_b, 4 * H, BLOCK_B) + o_gb
                b_i = tl.load(p_gates_t, mask=m_hb, other=0)
                b_f = tl.load(p_gates_t + H, mask=m_hb, other=0)
                b_g = tl.load(p_gates_t + 2 * H, mask=m_hb, other=0)
                b_o = tl.load(p_gates_t + 3 * H, mask=m_hb, other=0)
                b_c_t = tl.load(_step_rows(p_cell, i_d, s, T, B, i_b, H, BLOCK_B) + o_hb, mask=m_hb, other=0)
                # c_{t-1}: the previous processed step's cell, or c0 at a row's first step. The previous step of a
                # first or padded step may lie outside the sequence, hence the mask.
                p_c_prev = _step_rows(p_cell, i_d, s - 1 + 2 * i_d, T, B, i_b, H, BLOCK_B) + o_hb
                b_c_prev = tl.where(b_first, b_c0, tl.load(p_c_prev, mask=m_hb & b_active & ~b_first, other=0))
                b_grad_y = tl.load(_step_rows(p_grad_y, i_d, s, T, B, i_b, H, BLOCK_B) + o_hb, mask=m_hb, other=0)
                b_dh_t = b_grad_y.to(state_ty) + b_dh
                b_tanh_c = _tanh(b_c_t)
                b_dc_t = b_dc + b_dh_t * b_o * (1 - b_tanh_c * b_tanh_c)
                # Padded steps may read anything from grad_y; their gate gradients are zero.
                b_di = tl.where(b_active, b_dc_t * b_g * b_i * (1 - b_i), 0)
                b_df = tl.where(b_active, b_dc_t * b_c_prev * b_f * (1 - b_f), 0)
                b_dg = tl.where(b_active, b_dc_t * b_i * (1 - b_g * b_g), 0)
                b_do = tl.where(b_active, b_dh_t * b_tanh_c * b_o * (1 - b_o), 0)
                p_grad_xw_t = _step_rows(p_grad_xw, i_d, s, T, B, i_b, 4 * H, BLOCK_B)
                _store_gates(p_grad_xw_t + o_gb, b_di, b_df, b_dg, b_do, H, m_hb)
                if RESIDENT:
                    b_dh_new = tl.dot(b_wt_i, b_di.to(operand_ty), input_precision=INPUT_PRECISION, out_dtype=state_ty)
                    b_dh_new = tl.dot(b_wt_f, b_df.to(operand_ty), b_dh_new, input_precision=INPUT_PRECISION,
                                      out_dtype=state_ty)
                    b_dh_new = tl.dot(b_wt_g, b_dg.to(operand_ty), b_dh_new, input_precision=INPUT_PRECISION,
                                      out_dtype=state_ty)
                    b_dh_new = tl.dot(b_wt_o, b_do.to(operand_ty), b_dh_new, input_precision=INPUT_PRECISION,
                                      out_dtype=state_ty)
                else:
                    # The gate gradients come back in chunks from grad_xw, just written by all of this
                    # program's threads.
                    tl.debug_barrier()
                    b_dh_new = tl.zeros([BLOCK_H, BLOCK_B], dtype=state_ty)
                    for k0 in range(0, BLOCK_H, BLOCK_K):
                        o_k = k0 + tl.arange(0, BLOCK_K)
                        p_dgates = p_grad_xw_t + i_rows[None, :] * 4 * H + o_k[:, None]
                        m_kb = (o_k < H)[:, None] & m_b[None, :]
                        for gate in tl.static_range(4):
                            b_dgate = tl.load(p_dgates + gate * H, mask=m_kb, other=0, cache_modifier=".cg")
                            b_dh_new = tl.dot(_gate_weights(p_w_d, gate, H, o_k[None, :], o_h[:, None]),
                                              b_dgate.to(operand_ty), b_dh_new, input_precision=INPUT_PRECISION,
                                              out_dtype=state_ty)
                # Padded steps pass dh and dc through.
                b_dh = tl.where(b_active, b_dh_new, b_dh)
                b_dc = tl.where(b_active, b_dc_t * b_f, b_dc)
            else:
                # Past all of this program's rows: dh and dc pass through, grad_xw is zero.
                b_zero = tl.zeros([BLOCK_H, BLOCK_B], dtype=state_ty)
                _store_gates(_step_rows(p_grad_xw, i_d, s, T, B, i_b, 4 * H, BLOCK_B) + o_gb,
                             b_zero, b_zero, b_zero, b_zero, H, m_hb)

        tl.store(p_grad_h0 + o_state + o_hb, b_dh, mask=m_hb)
        tl.store(p_grad_c0 + o_state + o_hb, b_dc, mask=m_hb)

    def _grid(batch: int, num_directions: int):
        return lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), num_directions)

    def launch_forward(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                       lengths: Optional[torch.Tensor], allow_tf32: bool, plan: Optional[KernelPlan] = None,
                       store_saved: bool = True):
        """Forward of the contract; ``plan`` defaults to :func:`kernel_plan` for the weights' operand dtype.
        Without ``store_saved`` (inference) the kernel writes no gates or cells, and they come back as None."""
        _check_contract(xw.dtype, (xw, w_hh, h0, c0), lengths)
        num_directions, seq_len, batch, gate_size = xw.shape
        hidden = gate_size // 4
        saved = state_dtype(xw.dtype)
        y = xw.new_empty(num_directions, seq_len, batch, hidden)
        h_n = xw.new_empty(num_directions, batch, hidden)
        c_n = xw.new_empty(num_directions, batch, hidden)
        gates = cell = None
        if store_saved:
            gates = xw.new_empty(num_directions, seq_len, batch, gate_size, dtype=saved)
            cell = xw.new_empty(num_directions, seq_len, batch, hidden, dtype=saved)
        w_operand, w_scale = _forward_weights(w_hh, allow_tf32)
        plan = plan or kernel_plan(hidden, w_operand.dtype, xw.device)
        torch.library.wrap_triton(_lstm_forward_kernel)[_grid(batch, num_directions)](
            xw, w_operand, w_scale, h0, c0, lengths, y, h_n, c_n, gates, cell, seq_len, batch, hidden,
            num_directions, BLOCK_H=plan.block_h, BLOCK_K=plan.block_k, RESIDENT=plan.resident)
        return y, h_n, c_n, gates, cell

    def launch_backward(grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor, w_hh: torch.Tensor,
                        c0: torch.Tensor, gates: torch.Tensor, cell: torch.Tensor, lengths: Optional[torch.Tensor],
                        allow_tf32: bool, plan: Optional[KernelPlan] = None):
        """Backward of the contract; ``plan`` defaults to :func:`kernel_plan` for ``w_hh``'s dtype."""
        _check_contract(w_hh.dtype, (grad_y, grad_h_n, grad_c_n, w_hh, c0), lengths)
        _check_contract(state_dtype(w_hh.dtype), (gates, cell), lengths)
        num_directions, seq_len, batch, gate_size = gates.shape
        hidden = gate_size // 4
        grad_xw = w_hh.new_empty(num_directions, seq_len, batch, gate_size)
        grad_h0 = w_hh.new_empty(num_directions, batch, hidden)
        grad_c0 = w_hh.new_empty(num_directions, batch, hidden)
        plan = plan or kernel_plan(hidden, w_hh.dtype, w_hh.device)
        torch.library.wrap_triton(_lstm_backward_kernel)[_grid(batch, num_directions)](
            grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths, grad_xw, grad_h0, grad_c0,
            seq_len, batch, hidden, num_directions, BLOCK_H=plan.block_h, BLOCK_K=plan.block_k, RESIDENT=plan.resident,
            INPUT_PRECISION=_backward_precision(w_hh.dtype, allow_tf32))
        return grad_xw, grad_h0, grad_c0

    @torch.library.triton_op(FORWARD_OP, mutates_args=())
    def _recurrence_forward(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                            lengths: Optional[torch.Tensor], allow_tf32: bool
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_forward(xw, w_hh, h0, c0, lengths, allow_tf32)

    @torch.library.triton_op(BACKWARD_OP, mutates_args=())
    def _recurrence_backward(grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor,
                             w_hh: torch.Tensor, c0: torch.Tensor, gates: torch.Tensor, cell: torch.Tensor,
                             lengths: Optional[torch.Tensor], allow_tf32: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_backward(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths, allow_tf32)

    @torch.library.triton_op(INFERENCE_OP, mutates_args=())
    def _recurrence_inference(xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                              lengths: Optional[torch.Tensor], allow_tf32: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, h_n, c_n, _gates, _cell = launch_forward(xw, w_hh, h0, c0, lengths, allow_tf32, store_saved=False)
        return y, h_n, c_n

    # The contract's fake kernels replace triton_op's traced body, which the CPU interpreter cannot run on fakes.
    register_recurrence_fake(_recurrence_forward, _recurrence_backward)
    register_inference_fake(_recurrence_inference)
    # OpOverloads, which torch.compile traces inside the autograd.Function (triton_op's own object it cannot).
    _recurrence_function = register_recurrence_autograd(torch.ops.rnn_fast.triton_lstm_recurrence_forward.default,
                                                        torch.ops.rnn_fast.triton_lstm_recurrence_backward.default)


def _kernels():
    return (("forward", _lstm_forward_kernel), ("backward", _lstm_backward_kernel))


def tile_choices() -> Dict[str, Dict[str, str]]:
    """The tile each kernel ran with, as ``"ROWSxWARPS"``: per autotune key (``AUTOTUNE_KEY`` values, then the
    tensors' dtypes) when it autotunes, else its one tile (pinned, or the interpreter's) under ``"every key"``."""
    if _TRITON_IMPORT_ERROR is not None:
        return {}
    return {name: ({"every key": _tile_name(kernel.configs[0])} if len(kernel.configs) == 1
                   else {repr(key): _tile_name(config) for key, config in kernel.cache.items()})
            for name, kernel in _kernels()}


def latest_tile_timings() -> Dict[str, Dict[str, float]]:
    """Per kernel, the autotuner's latest comparison of tiles: median ms per ``"ROWSxWARPS"``, the fastest being the
    one it kept. A kernel that compared none (a pinned tile, the interpreter) is left out."""
    if _TRITON_IMPORT_ERROR is not None:
        return {}
    # do_bench gives a number or, with quantiles, a list whose first element is the median (it varies by version).
    return {name: {_tile_name(config): timing[0] if isinstance(timing, (list, tuple)) else timing
                   for config, timing in kernel.configs_timings.items()}
            for name, kernel in _kernels() if getattr(kernel, "configs_timings", None)}


def _tile_name(config) -> str:
    return f"{config.kwargs['BLOCK_B']}x{config.num_warps}"
