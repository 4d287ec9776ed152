"""``rnn_fast.LSTM``: ``torch.nn.LSTM`` with the recurrence run by a fused backend.

It is built on nn.LSTM's own base class and methods, so the constructor, parameter names, initialisation,
``state_dict``, input checks and error messages are nn.LSTM's. It derives from ``nn.RNNBase`` rather than
``nn.LSTM``: torch.compile refuses to trace any instance of ``nn.LSTM``, subclasses included
(tests/library/modules/test_interop.py pins this), so ``isinstance(m, nn.LSTM)`` is False and :func:`to_torch` converts
for code that dispatches on nn.LSTM (dynamic quantization, for one). Only ``forward`` differs: one batched GEMM per
layer for the input projection, then the backend's recurrence op (docs/contract.md). Everything a fused backend
cannot do goes to nn.LSTM's own implementation, with a one-time warning; so do ONNX export and TorchScript, which
record nn.LSTM's own op.
"""
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..ops.lstm import BACKENDS, BackendChoice, CallShape, resolve_backend, unavailable_reason
from ..ops.lstm.layer import layer_parameters

_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device``, or None when autocast is off there."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class LSTM(nn.RNNBase):
    """Drop-in ``torch.nn.LSTM``. ``backend`` is one of ``rnn_fast.BACKENDS``:

    - ``"auto"``: the fastest fused backend proven on the input's device, else nn.LSTM's implementation;
    - ``"torch"``: nn.LSTM's own implementation (cuDNN on CUDA);
    - ``"naive"``: the readable PyTorch reference of the recurrence;
    - ``"cpu"``: fused C++/OpenMP; ``"triton"``: persistent Triton kernels; ``"cuda"``: CUDA C++ tensor-core kernels.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend not in ("auto", "torch"):
            reason = unavailable_reason(backend)
            if reason is not None:
                raise RuntimeError(f"rnn_fast backend {backend!r} is unavailable: {reason}")
        self.backend = backend

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def __prepare_scriptable__(self) -> nn.LSTM:
        # torch.jit.script cannot compile the fused dispatch; it scripts nn.LSTM over the same parameters instead.
        return to_torch(self)

    def resolved_backend(self, input=None, hx=None) -> str:
        """The backend ``forward(input, hx)`` runs (``"torch"``: nn.LSTM's implementation); without an input, the
        backend a non-empty input on the parameters' device would get, whatever its shape."""
        return self._backend_choice(input, hx).name

    def _backend_choice(self, input, hx) -> BackendChoice:
        data = input.data if isinstance(input, PackedSequence) else input
        if data is not None and data.numel() == 0:
            # Empty batches and the error for empty sequences are nn.LSTM's to handle.
            return BackendChoice("torch", None, None)
        # The parameters' device decides: an input elsewhere is an error (_check_devices), not a reason to fall back.
        device = self.weight_ih_l0.device
        dtype = _autocast_dtype(device) or self.weight_ih_l0.dtype
        return resolve_backend(self.backend, device, dtype, self.hidden_size, self.proj_size,
                               None if data is None else self._call_shape(input, data, hx))

    def _call_shape(self, input, data: torch.Tensor, hx) -> CallShape:
        if isinstance(input, PackedSequence):
            batch, seq_len = int(input.batch_sizes[0]), input.batch_sizes.shape[0]
        elif data.dim() == 3:
            batch, seq_len = (data.shape[0], data.shape[1]) if self.batch_first else (data.shape[1], data.shape[0])
        else:
            batch, seq_len = 1, data.shape[0]
        return CallShape(self.hidden_size, self.num_layers, self.bidirectional, batch, seq_len,
                         inference=not self._needs_grad(data, hx))

    def forward(self, input, hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            # ONNX and TorchScript graphs record nn.LSTM's own op, which they know (ONNX gets its LSTM nodes).
            return nn.LSTM.forward(self, input, hx)
        # As nn.LSTM's forward does: parametrizations (weight norm, pruning) and functional_call replace the
        # weights behind _flat_weights' back.
        self._update_flat_weights()
        choice = self._backend_choice(input, hx)
        if choice.fallback_reason is not None:
            _warn_once(f"rnn_fast.LSTM: {choice.fallback_reason}; using torch.nn.LSTM's implementation")
        backend = choice.module
        if backend is None:
            return nn.LSTM.forward(self, input, hx)

        num_directions = 2 if self.bidirectional else 1
        is_packed = isinstance(input, PackedSequence)
        inference = not self._needs_grad(input.data if is_packed else input, hx)
        sorted_indices = unsorted_indices = packed_lengths = None
        is_batched = True
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self.check_input(data, batch_sizes)
            if hx is not None:
                self.check_forward_args(data, hx, batch_sizes)
                # Rows stay in the packed (sorted) order; hx is permuted into it like nn.LSTM does.
                hx = self.permute_hidden(hx, sorted_indices)
            self._check_devices(data, hx)
            packed = self._run_packed(choice, data, batch_sizes, hx, inference)
            if packed is not None:
                output, h_n, c_n = packed
                return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                        self.permute_hidden((h_n, c_n), unsorted_indices))
            x, packed_lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                if hx is not None:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                                           f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            elif hx is not None and (hx[0].dim() != 3 or hx[1].dim() != 3):
                raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if hx is None:
                self.check_input(input, None)
            else:
                self.check_forward_args(input, hx, None)
            x = input.transpose(0, 1) if self.batch_first else input
        self._check_devices(x, hx)

        seq_len, batch = x.shape[:2]
        if hx is None:
            zeros = x.new_zeros(self.num_layers * num_directions, batch, self.hidden_size)
            hx = (zeros, zeros)
        lengths = None
        if packed_lengths is not None and bool((packed_lengths < seq_len).any()):
            lengths = packed_lengths.to(x.device)

        if lengths is None and self._runs_stack_inference(choice, inference):
            output, h_n, c_n = self._stack_inference(choice, x, hx[0], hx[1], None)
        else:
            output, h_n, c_n = self._run_layers(choice, x, hx[0], hx[1], lengths, inference)

        if is_packed:
            packed = pack_padded_sequence(output, packed_lengths)
            return (PackedSequence(packed.data, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden((h_n, c_n), unsorted_indices))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _check_devices(self, x: torch.Tensor, hx) -> None:
        weight = self.weight_ih_l0
        if x.device != weight.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor at "
                               f"{x.device} and parameter tensor at {weight.device}")
        if hx is None:
            return
        for state in hx:
            if state.device != x.device:
                raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor at "
                                   f"{x.device} and hidden tensor at {state.device}")
            if state.dtype != x.dtype and _autocast_dtype(x.device) is None:
                raise RuntimeError(f"Expected hidden and cell state dtype {x.dtype} (the input's), "
                                   f"got {state.dtype}")

    def _needs_grad(self, data: torch.Tensor, hx) -> bool:
        """Whether autograd will differentiate this call; if not, the backends' inference ops run, which keep
        nothing for a backward."""
        if not torch.is_grad_enabled():
            return False
        return (data.requires_grad or any(weight.requires_grad for weight in self._flat_weights)
                or (hx is not None and (hx[0].requires_grad or hx[1].requires_grad)))

    def _layer_weights(self, layer: int):
        """``w_ih [D, 4H, In]``, ``w_hh [D, 4H, H]`` and the summed biases ``[D, 4H]`` (or None) of one layer."""
        # _flat_weights (nn.RNNBase's, kept current when a parameter is replaced) holds each layer's directions'
        # (w_ih, w_hh[, b_ih, b_hh]) in order: read there, not through a getattr per parameter.
        num_directions = 2 if self.bidirectional else 1
        per_layer = len(self._flat_weights) // self.num_layers
        params = self._flat_weights[layer * per_layer:(layer + 1) * per_layer]
        return layer_parameters(params, num_directions, self.bias)

    def _run_layers(self, choice: BackendChoice, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                    lengths: Optional[torch.Tensor], inference: bool):
        """Time-major ``x [T, B, I]`` through all layers -> ``(output [T, B, D*H], h_n, c_n)``; with
        ``inference`` (autograd will not differentiate), through the backend's inference op if it has one."""
        seq_len, batch = x.shape[:2]
        # A layer's input travels as parts [P, T, B, K]: x itself, then the previous layer's y [D, T, B, H] as is.
        backend = choice.module
        project = backend.input_projection
        recurrence = (backend.lstm_recurrence_inference if inference and choice.inference
                      else backend.lstm_recurrence)
        y, h_n, c_n = self._stack_layers(project, recurrence, x.unsqueeze(0), lambda y: y, h0, c0, lengths,
                                         choice.bf16_products)
        # One direction is a reshape of y (no copy, nor a zero-filled gradient as y[0] would have).
        output = (y.reshape(seq_len, batch, -1) if y.shape[0] == 1
                  else y.permute(1, 2, 0, 3).reshape(seq_len, batch, -1))
        return output, h_n, c_n

    def _runs_stack_inference(self, choice: BackendChoice, inference: bool) -> bool:
        """Whether the backend's one op through all layers runs this call: autograd will not differentiate it, and
        no dropout applies between layers."""
        return inference and choice.stack_inference and not (self.dropout > 0 and self.training
                                                              and self.num_layers > 1)

    def _stack_inference(self, choice: BackendChoice, data: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                         batch_sizes: Optional[torch.Tensor]):
        """The backend's one inference op through all layers -> ``(output, h_n, c_n)``. With ``bf16_products`` the
        weights go in bf16, the input, biases and states in fp32 (the states rounded to bf16 first, as nn.LSTM's
        bf16 path takes them); the op rounds each product's operands to bf16, and the outputs come back in bf16."""
        params = self._flat_weights
        if choice.bf16_products:
            params = [p.to(torch.bfloat16) if p.dim() == 2 else p.float() for p in params]
            data = data.float()
            h0, c0 = (state.to(torch.bfloat16).float() for state in (h0, c0))
        output, h_n, c_n = choice.module.lstm_stack_inference(data, h0.contiguous(), c0.contiguous(), params,
                                                              self.bias, self.num_layers, self.bidirectional,
                                                              batch_sizes)
        if choice.bf16_products:
            output, h_n, c_n = (t.to(torch.bfloat16) for t in (output, h_n, c_n))
        return output, h_n, c_n

    def _initial_state(self, hx, data: torch.Tensor, batch_sizes: torch.Tensor):
        """PackedSequence input's ``(h0, c0)``, contiguous, zeros when ``hx`` is None."""
        if hx is None:
            zeros = data.new_zeros(self.num_layers * (2 if self.bidirectional else 1), int(batch_sizes[0]),
                                   self.hidden_size)
            return zeros, zeros
        return hx[0].contiguous(), hx[1].contiguous()

    def _run_packed(self, choice: BackendChoice, data: torch.Tensor, batch_sizes: torch.Tensor, hx,
                    inference: bool):
        """PackedSequence ``data [N, I]`` through all layers as it is, where every step, projection and weight
        gradient covers only the rows that run -> ``(output data [N, D*H], h_n, c_n)``, rows in the packed (sorted)
        order; None for a backend without the packed layout (docs/contract.md), which gets the input padded."""
        backend = choice.module
        if not choice.packed_layout:
            return None
        h0, c0 = self._initial_state(hx, data, batch_sizes)
        if self._runs_stack_inference(choice, inference):
            return self._stack_inference(choice, data, h0, c0, batch_sizes)
        num_tokens = data.shape[0]
        project = backend.input_projection
        recurrence = backend.lstm_packed_recurrence_inference if inference else backend.lstm_packed_recurrence
        # The packed rows are one step of N rows to the projection: parts [P, 1, N, K], y [D, N, H] -> [D, 1, N, H].
        y, h_n, c_n = self._stack_layers(lambda parts, w_ih, bias: project(parts, w_ih, bias).flatten(1, 2),
                                         recurrence, data.view(1, 1, num_tokens, -1), lambda y: y.unsqueeze(1),
                                         h0, c0, batch_sizes, choice.bf16_products)
        output = y.reshape(num_tokens, -1) if y.shape[0] == 1 else y.transpose(0, 1).reshape(num_tokens, -1)
        return output, h_n, c_n

    def _stack_layers(self, project, recurrence, parts, as_parts, h0, c0, lengths, bf16_products=False):
        """Each layer: ``xw = project(parts, w_ih, bias)``, ``recurrence(xw, w_hh, h0, c0, lengths)``, dropout,
        and ``as_parts(y)`` as the next layer's input -> ``(last y, h_n, c_n)``. With ``bf16_products``
        (BackendChoice), inputs, weights and states go in as nn.LSTM's bf16 path rounds them, xw and the state stay
        fp32, and the outputs come back in bf16."""
        num_directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            w_ih, w_hh, bias = self._layer_weights(layer)
            if bf16_products:
                parts, w_ih, w_hh = parts.to(torch.bfloat16), w_ih.to(torch.bfloat16), w_hh.to(torch.bfloat16)
                bias = None if bias is None else bias.float()
            xw = project(parts, w_ih, bias)
            states = slice(layer * num_directions, (layer + 1) * num_directions)
            layer_h0, layer_c0 = h0[states], c0[states]
            if bf16_products:
                # nn.LSTM's bf16 path takes the initial state in bf16 too.
                layer_h0, layer_c0 = layer_h0.to(torch.bfloat16), layer_c0.to(torch.bfloat16)
            y, layer_h_n, layer_c_n = recurrence(
                xw, w_hh if bf16_products else w_hh.to(xw.dtype), layer_h0.to(xw.dtype).contiguous(),
                layer_c0.to(xw.dtype).contiguous(), lengths)[:3]
            if bf16_products:
                y, layer_h_n, layer_c_n = (t.to(torch.bfloat16) for t in (y, layer_h_n, layer_c_n))
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                y = F.dropout(y, self.dropout, training=True)
            parts = as_parts(y)
            h_n.append(layer_h_n)
            c_n.append(layer_c_n)
        if self.num_layers == 1:
            return y, h_n[0], c_n[0]
        return y, torch.cat(h_n), torch.cat(c_n)


def _rebuilt(source: nn.RNNBase, cls, **kwargs) -> nn.RNNBase:
    """A ``cls`` LSTM with ``source``'s configuration, training mode and parameter objects (shared, not copied)."""
    weight = source.weight_ih_l0
    target = cls(source.input_size, source.hidden_size, source.num_layers, source.bias, source.batch_first,
                 source.dropout, source.bidirectional, source.proj_size, device="meta", dtype=weight.dtype, **kwargs)
    for name, parameter in source.named_parameters(recurse=False):
        setattr(target, name, parameter)
    target.flatten_parameters()
    return target.train(source.training)


def _swapped(module: nn.Module, should_swap, convert) -> nn.Module:
    if should_swap(module):
        return convert(module)
    for name, child in module.named_children():
        swapped = _swapped(child, should_swap, convert)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def to_torch(module: nn.Module) -> nn.Module:
    """Every :class:`rnn_fast.LSTM` in ``module`` (or ``module`` itself) replaced by a ``torch.nn.LSTM`` that shares
    its parameters, e.g. before ``torch.ao.quantization.quantize_dynamic(model, {nn.LSTM})``. Containers are
    changed in place and returned."""
    return _swapped(module, lambda m: isinstance(m, LSTM), lambda m: _rebuilt(m, nn.LSTM))


def from_torch(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Every ``torch.nn.LSTM`` in ``module`` (exactly that type) replaced by an :class:`rnn_fast.LSTM` with
    ``backend`` that shares its parameters. Containers are changed in place and returned."""
    return _swapped(module, lambda m: type(m) is nn.LSTM, lambda m: _rebuilt(m, LSTM, backend=backend))


def model_backend(model: nn.Module) -> str:
    """What runs the recurrences of ``model``'s :class:`rnn_fast.LSTM` layers on their own parameters' device and
    dtype: one backend name (``"torch"`` where they fall back to nn.LSTM's implementation), several joined by
    ``"+"``, or ``"none"`` when the model has no rnn_fast.LSTM."""
    names = sorted({m.resolved_backend() for m in model.modules() if isinstance(m, LSTM)})
    return "+".join(names) or "none"


# A pickled model holding rnn_fast.LSTM loads with torch.load's weights_only default wherever one holding nn.LSTM
# does: the class is as safe to rebuild as nn.LSTM, whose state it shares.
torch.serialization.add_safe_globals([LSTM])
