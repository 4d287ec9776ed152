"""The compiled recurrence ops ``torch.ops.rnn_fast.lstm_recurrence_forward/backward/inference`` and their
packed-layout versions ``lstm_packed_recurrence_*`` (csrc/).

One op set serves every device: csrc/cpu/ registers its CPU kernels (both layouts), csrc/cuda/ its CUDA
kernels (padded layout). This module gives the ops their fake-tensor and autograd rules, once, for all devices.
"""
import torch

from .autograd import register_inference_fake, register_recurrence_autograd, register_recurrence_fake
from .precision import state_dtype

REBUILD_COMMAND = "pip install --no-build-isolation -e ."

try:
    # Importing the extension runs its TORCH_LIBRARY registrations.
    from ... import _C  # noqa: F401
except ImportError as error:
    raise ImportError(f"rnn_fast's compiled extension rnn_fast._C cannot be imported ({error}); "
                      f"rebuild it from the repository root with: {REBUILD_COMMAND}") from error

forward_op = torch.ops.rnn_fast.lstm_recurrence_forward.default
backward_op = torch.ops.rnn_fast.lstm_recurrence_backward.default
inference_op = torch.ops.rnn_fast.lstm_recurrence_inference.default


def _saved_dtype(xw: torch.Tensor) -> torch.dtype:
    # On CUDA the launcher decides (16 bits under RNN_FAST_CUDA_VARIANTS=saved_16bit), so it is asked.
    if xw.device.type == "cuda" and hasattr(torch.ops.rnn_fast, "lstm_recurrence_cuda_saved_dtype"):
        return torch.ops.rnn_fast.lstm_recurrence_cuda_saved_dtype(xw.device, xw.dtype)
    return state_dtype(xw.dtype)


register_recurrence_fake(forward_op, backward_op, saved_dtype=_saved_dtype)
forward_function = register_recurrence_autograd(forward_op, backward_op)
register_inference_fake(inference_op)

packed_forward_op = torch.ops.rnn_fast.lstm_packed_recurrence_forward.default
packed_backward_op = torch.ops.rnn_fast.lstm_packed_recurrence_backward.default
packed_inference_op = torch.ops.rnn_fast.lstm_packed_recurrence_inference.default
register_recurrence_fake(packed_forward_op, packed_backward_op)
register_inference_fake(packed_inference_op)
