"""``backend="cuda"``: the CUDA C++ recurrence of csrc/cuda (tensor-core MMAs, both directions in one launch).

It registers CUDA kernels for the same ops as the CPU backend, ``torch.ops.rnn_fast.lstm_recurrence_forward`` /
``_backward``, whose autograd and fake-tensor rules :mod:`rnn_fast.ops.lstm.extension` gives once for every
device. float32 follows cuDNN's RNN TF32 setting (``torch.backends.cudnn.rnn.fp32_precision``, which the legacy
``torch.backends.cudnn.allow_tf32`` also sets), read by the launcher at each call, as ``nn.LSTM`` does.

Importing this module fails with the rebuild command when rnn_fast._C is missing; the registry then reports
the backend as unavailable with that message.
"""
import functools
from typing import Optional

import torch

from .extension import REBUILD_COMMAND, forward_op
from .common import project_parts

_FORWARD_OP_NAME = "rnn_fast::lstm_recurrence_forward"


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


def lstm_recurrence(xw, w_hh, h0, c0, lengths):
    return forward_op(xw, w_hh, h0, c0, lengths)
