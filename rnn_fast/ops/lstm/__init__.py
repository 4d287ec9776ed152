"""Backends of the LSTM recurrence contract (docs/contract.md) and the one place that decides which runs.

Each backend is a module that satisfies :class:`RecurrenceBackend`. Modules are imported on first use, so
``import rnn_fast`` needs neither the compiled extension nor triton. :func:`resolve_backend` is the only decision of
what runs: ``rnn_fast.LSTM``, the training script's metrics and the benchmarks all ask it.
"""
import importlib
from types import ModuleType
from typing import Dict, List, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch

# Each backend is the module of its name in this package.
FUSED_BACKENDS = ("naive", "cpu", "triton", "cuda")
BACKENDS = ("auto", "torch") + FUSED_BACKENDS

# Fused backends that "auto" may pick, fastest first, per device type. On CUDA it stays on cuDNN until a
# lent-GPU run has proven a fused backend correct and faster there (benchmarks/results/).
_AUTO_PREFERENCE = {"cpu": ("cpu",)}


@runtime_checkable
class RecurrenceBackend(Protocol):
    """What a backend module provides (docs/contract.md)."""

    def unavailable_reason(self) -> Optional[str]:
        """Why this install cannot run the backend at all, or None."""

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, hidden_size: int) -> Optional[str]:
        """Why the backend cannot run a layer of this device, compute dtype and hidden size, or None."""

    def input_projection(self, parts: torch.Tensor, w_ih: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``xw [D, T, B, 4H]`` of a layer whose input comes as ``parts [P, T, B, K]``."""

    def lstm_recurrence(self, xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                        lengths: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """The differentiable forward op: ``(y, h_n, c_n, gates, cell)``."""


@runtime_checkable
class InferenceBackend(Protocol):
    """A backend with an inference op, which the driver calls when autograd will not differentiate the call."""

    def lstm_recurrence_inference(self, xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                                  lengths: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, h_n, c_n)`` of the forward op, keeping nothing for a backward."""


@runtime_checkable
class PackedLayoutBackend(Protocol):
    """A backend with the packed layout's ops, which get PackedSequence data as it is (docs/contract.md)."""

    def lstm_packed_recurrence(self, xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                               batch_sizes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The differentiable forward op on ``xw [D, N, 4H]``: ``(y, h_n, c_n, gates, cell)``."""

    def lstm_packed_recurrence_inference(self, xw: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                                         c0: torch.Tensor, batch_sizes: torch.Tensor
                                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Its inference op: ``(y, h_n, c_n)``."""


@runtime_checkable
class StackInferenceBackend(Protocol):
    """A backend that runs a whole stack of layers in one inference op, when autograd will not differentiate the
    call and no dropout applies between layers."""

    def lstm_stack_inference(self, input: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                             params: List[torch.Tensor], has_biases: bool, num_layers: int, bidirectional: bool,
                             batch_sizes: Optional[torch.Tensor]
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, h_n, c_n)`` of time-major ``input [T, B, I]`` (or PackedSequence data ``[N, I]`` with its
        ``batch_sizes``), ``params`` in ``nn.RNNBase._flat_weights`` order, states ``[L*D, B, H]``."""


class BackendChoice(NamedTuple):
    """What runs: ``name`` (``"torch"`` for nn.LSTM's implementation), its ``module`` (None for torch), and
    ``fallback_reason``: why the requested fused backend does not run, or None when nothing fell back. ``inference``,
    ``packed_layout`` and ``stack_inference`` say whether the module is also an :class:`InferenceBackend`, a
    :class:`PackedLayoutBackend`, a :class:`StackInferenceBackend` (checked once, when it is loaded: an isinstance
    check costs more than a streaming step). ``bf16_products``: the layers compute in bf16 and the backend multiplies
    bf16 operands into fp32 (its ``BF16_PRODUCTS``): the driver hands it bf16 inputs and weights, fp32 biases and
    state, and takes fp32 ``xw`` and outputs back."""
    name: str
    module: Optional[RecurrenceBackend]
    fallback_reason: Optional[str]
    inference: bool = False
    packed_layout: bool = False
    stack_inference: bool = False
    bf16_products: bool = False


_loaded: Dict[str, ModuleType] = {}
_import_errors: Dict[str, str] = {}
# backend name -> (InferenceBackend?, PackedLayoutBackend?, StackInferenceBackend?)
_capabilities: Dict[str, Tuple[bool, bool, bool]] = {}


def load_backend(name: str) -> Optional[RecurrenceBackend]:
    """The backend's module, or None when it cannot even be imported (the reason is kept)."""
    if name not in _loaded and name not in _import_errors:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError as error:
            _import_errors[name] = str(error)
        else:
            if not isinstance(module, RecurrenceBackend):
                raise TypeError(f"{module.__name__} does not provide the RecurrenceBackend interface")
            _loaded[name] = module
            _capabilities[name] = tuple(isinstance(module, protocol) for protocol in
                                        (InferenceBackend, PackedLayoutBackend, StackInferenceBackend))
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
    """The backend ``"auto"`` asks for on ``device``: the fastest fused one proven there, else ``"torch"``."""
    for name in _AUTO_PREFERENCE.get(device.type, ()):
        if unavailable_reason(name) is None:
            return name
    return "torch"


class CallShape(NamedTuple):
    """What ``"auto"`` weighs beyond the device and dtype: the stack's shape and one call's batch, length and mode
    (``inference``: autograd will not differentiate the call)."""
    hidden_size: int
    num_layers: int
    bidirectional: bool
    batch: int
    seq_len: int
    inference: bool


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, hidden_size: int,
                    proj_size: int = 0, call: Optional[CallShape] = None) -> BackendChoice:
    """Which backend runs an LSTM built with ``backend=name`` whose layers compute in ``dtype`` on ``device``.
    With ``call``, ``"auto"`` also leaves to nn.LSTM's implementation the calls its fused backend measured slower
    on (a backend's ``auto_declines(call, dtype)``); a backend asked for by name runs whatever the call."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return BackendChoice("torch", None, None)
    if proj_size > 0:
        return BackendChoice("torch", None, "proj_size > 0 is not fused")
    wanted = auto_backend(device) if name == "auto" else name
    if wanted == "torch":
        return BackendChoice("torch", None, None)
    reason = unavailable_reason(wanted)
    module = load_backend(wanted)
    if reason is None:
        reason = module.unsupported_reason(device, dtype, hidden_size)
    if reason is not None:
        return BackendChoice("torch", None, f"backend {wanted!r} cannot run this input ({reason})")
    if name == "auto" and call is not None and getattr(module, "auto_declines", lambda call, dtype: False)(call, dtype):
        return BackendChoice("torch", None, None)
    bf16_products = dtype == torch.bfloat16 and getattr(module, "BF16_PRODUCTS", False)
    return BackendChoice(wanted, module, None, *_capabilities[wanted], bf16_products=bf16_products)
