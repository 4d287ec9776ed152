"""Backends of the LSTM recurrence contract (docs/contract.md) and how one is chosen.

Each backend module defines ``unavailable_reason()``, ``unsupported_reason(device, dtype, hidden_size)`` and
``lstm_recurrence(xw, w_hh, h0, c0, lengths)``. Modules are imported on first use, so ``import rnn_fast``
needs neither the compiled extension nor triton.
"""
import importlib
from types import ModuleType
from typing import Dict, List, Optional

import torch

# backend name -> module in this package
_MODULES = {"naive": "naive", "cpu": "cpu", "triton": "fused", "cuda": "cuda"}
FUSED_BACKENDS = tuple(_MODULES)
BACKENDS = ("auto", "torch") + FUSED_BACKENDS

# Fused backends that "auto" may pick, fastest first, per device type. On CUDA it stays on cuDNN until a
# lent-GPU run has proven a fused backend correct and faster there (benchmarks/results/).
_AUTO_PREFERENCE = {"cpu": ("cpu",)}

_loaded: Dict[str, ModuleType] = {}
_import_errors: Dict[str, str] = {}


def load_backend(name: str) -> Optional[ModuleType]:
    """The backend's module, or None when it cannot even be imported (the reason is kept)."""
    if name not in _loaded and name not in _import_errors:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        except ImportError as error:
            _import_errors[name] = str(error)
    return _loaded.get(name)


def unavailable_reason(name: str) -> Optional[str]:
    """Why this install cannot run ``name``, or None when it can."""
    if name == "torch":
        return None
    module = load_backend(name)
    if module is None:
        return _import_errors[name]
    return module.unavailable_reason()


def available_backends() -> List[str]:
    """Backends this install can run: always ``torch`` and ``naive``, plus the fused ones that were built."""
    return [name for name in ("torch",) + FUSED_BACKENDS if unavailable_reason(name) is None]


def auto_backend(device: torch.device) -> str:
    for name in _AUTO_PREFERENCE.get(device.type, ()):
        if unavailable_reason(name) is None:
            return name
    return "torch"
