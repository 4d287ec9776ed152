"""rnn_fast: fast LSTM kernels for PyTorch behind a drop-in ``torch.nn.LSTM``."""
from .modules.lstm import LSTM, from_torch, model_backend, to_torch
from .ops.lstm import BACKENDS, available_backends, resolve_backend

__all__ = ["LSTM", "BACKENDS", "available_backends", "from_torch", "model_backend", "resolve_backend", "to_torch"]
__version__ = "0.1.0"
