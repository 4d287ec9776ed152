"""The precision every backend shares: the dtype of recurrent state, and the fp32 precision of cuDNN's RNNs, which
nn.LSTM follows on CUDA and so do the fused recurrences and the driver's GEMMs."""
import contextlib
from typing import Iterator, Optional

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


def driver_gemm_precision(tensor: torch.Tensor) -> Optional[str]:
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
