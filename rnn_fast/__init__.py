"""rnn_fast: fast LSTM kernels for PyTorch behind a drop-in ``torch.nn.LSTM``."""
from .modules.lstm import LSTM
from .ops.lstm import BACKENDS, available_backends

__all__ = ["LSTM", "BACKENDS", "available_backends"]
__version__ = "0.1.0"
