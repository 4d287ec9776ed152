"""``backend="cuda"``: the CUDA C++ recurrence of csrc/cuda (tensor-core MMAs, both directions in one launch).

It registers CUDA kernels for the same ops as the CPU backend, ``torch.ops.rnn_fast.lstm_recurrence_forward`` /
``_backward`` / ``_inference``, whose autograd and fake-tensor rules :mod:`rnn_fast.ops.lstm.extension` gives once
for every device. float32 follows cuDNN's RNN TF32 setting (``torch.backends.cudnn.rnn.fp32_precision``, which the
legacy ``torch.backends.cudnn.allow_tf32`` also sets), read by the launcher at each call, as ``nn.LSTM`` does.

Kernel variants for a GPU session to compare (csrc/cuda/README.md, "Kernel variants"): the environment variable
``RNN_FAST_CUDA_VARIANTS`` holds a comma-separated subset of :data:`VARIANTS`; unset or empty runs the baseline
kernels. The launcher reads it at each call. Variants run on sm_90 only, one at a time or all together.

Importing this module fails with the rebuild command when rnn_fast._C is missing; the registry then reports
the backend as unavailable with that message.
"""
import functools
import os
from typing import Optional, Tuple

import torch

from .extension import REBUILD_COMMAND, forward_function
from .layer import project_parts

_FORWARD_OP_NAME = "rnn_fast::lstm_recurrence_forward"

VARIANTS_ENV = "RNN_FAST_CUDA_VARIANTS"
# The names csrc/cuda/lstm_recurrence.h's kVariantNames gives, in its order.
VARIANTS: Tuple[str, ...] = ("cluster_mbarrier", "saved_16bit", "tanh_approx", "bwd_tf32_wide", "bwd_prefetch")


def active_variants() -> Tuple[str, ...]:
    """The variants ``RNN_FAST_CUDA_VARIANTS`` selects, in :data:`VARIANTS` order, parsed as the launcher parses
    it: comma-separated, spaces around names and empty entries ignored. Raises ValueError on an unknown name."""
    names = {name.strip(" ") for name in os.environ.get(VARIANTS_ENV, "").split(",")} - {""}
    unknown = sorted(names - set(VARIANTS))
    if unknown:
        raise ValueError(f"{VARIANTS_ENV} names unknown variants {unknown}; valid names are {', '.join(VARIANTS)}")
    return tuple(name for name in VARIANTS if name in names)


def unavailable_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "the CUDA backend needs a CUDA device"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP_NAME, "CUDA"):
        return ("rnn_fast._C was built without its CUDA kernels (that needs nvcc and a CUDA build of torch); "
                f"rebuild it with: {REBUILD_COMMAND}")
    return None


def unsupported_reason(device: torch.device, dtype: torch.dtype, hidden_size: int) -> Optional[str]:
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, not {device.type}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _kernel_limits(index, dtype, hidden_size)


@functools.lru_cache(maxsize=None)
def _kernel_limits(index: int, dtype: torch.dtype, hidden_size: int) -> Optional[str]:
    # The launcher's own planner answers (csrc/cuda/lstm_cuda.cpp): dtype, even hidden_size up to 128, and
    # what the device's architecture and shared memory allow.
    reason = torch.ops.rnn_fast.lstm_recurrence_cuda_unsupported_reason(torch.device("cuda", index), dtype,
                                                                        hidden_size)
    return reason or None


input_projection = project_parts


lstm_recurrence = forward_function.apply


def lstm_recurrence_inference(xw, w_hh, h0, c0, lengths):
    """``(y, h_n, c_n)`` of the forward, from kernels that save no gates or cells."""
    return torch.ops.rnn_fast.lstm_recurrence_inference(xw, w_hh, h0, c0, lengths)
