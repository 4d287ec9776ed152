"""``rnn_fast.LSTM`` on variable-length batches and on its inference path, against ``torch.nn.LSTM``.

Variable length: odd length patterns through every backend this install can run, in both layouts the driver
has (docs/contract.md): the packed layout, whose ops compute only the rows that run, and the padded layout with
per-row lengths (the naive reference computes every row there and masks the ended ones). Inference: the inference
ops run and nothing is kept for a backward; weights are read as views, so in-place updates show at once.
"""
import os
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import rnn_fast
from rnn_fast.ops.lstm import InferenceBackend, PackedLayoutBackend, StackInferenceBackend, load_backend
from rnn_fast.testing import TOLERANCES, assert_lstm_matches, runnable_backends, torch_threads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [pytest.param(dtype, tol, tol, id=str(dtype).split(".")[1]) for dtype, tol in TOLERANCES.items()]


BACKENDS = runnable_backends(DEVICE)
# Backends with the packed layout's ops; the others always get PackedSequence input padded.
PACKED_BACKENDS = [name for name in BACKENDS if isinstance(load_backend(name), PackedLayoutBackend)]
INFERENCE_BACKENDS = [name for name in BACKENDS if isinstance(load_backend(name), InferenceBackend)]

# Row lengths in batch order: all 1, all equal, one long row among short ones, unsorted (packed with
# enforce_sorted=False, so the driver permutes rows and states into length order and back).
LENGTH_PATTERNS = {
    "ones": [1, 1, 1, 1, 1],
    "equal": [4, 4, 4, 4],
    "one-long": [1, 2, 9, 1, 1, 2],
    "unsorted": [3, 7, 1, 7, 5, 2, 4],
}


def _packed_input(pattern, input_size, dtype, generator):
    sequences = [torch.randn(length, input_size, generator=generator, dtype=dtype).to(DEVICE)
                 for length in LENGTH_PATTERNS[pattern]]
    return pack_sequence(sequences, enforce_sorted=False)


def _state(num_layers, bidirectional, batch, hidden, dtype, generator):
    shape = (num_layers * (2 if bidirectional else 1), batch, hidden)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype).to(DEVICE) for _ in range(2))


def _pair(backend, num_layers, bidirectional, dtype, input_size=3, hidden=5, **kwargs):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, device=DEVICE, dtype=dtype, **kwargs)
    reference = nn.LSTM(input_size, hidden, **kwargs)
    candidate = rnn_fast.LSTM(input_size, hidden, backend=backend, **kwargs)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def _varlen_cases():
    for backend in BACKENDS:
        # The Triton interpreter runs a kernel one program at a time in Python: one layer and two patterns.
        interpreted = backend == "triton" and INTERPRETED
        layouts = ("packed", "padded") if backend in PACKED_BACKENDS else ("padded",)
        for layout in layouts:
            for pattern in (("ones", "unsorted") if interpreted else LENGTH_PATTERNS):
                for bidirectional in (False, True):
                    yield pytest.param(backend, layout, pattern, bidirectional, 1 if interpreted else 2,
                                       id=f"{backend}-{layout}-{pattern}-{'bi' if bidirectional else 'uni'}")


@pytest.mark.parametrize("backend, layout, pattern, bidirectional, num_layers", list(_varlen_cases()))
def test_varlen_matches_nn_lstm(backend, layout, pattern, bidirectional, num_layers, monkeypatch):
    if layout == "padded" and backend in PACKED_BACKENDS:
        # As for a backend without the packed layout: the driver pads PackedSequence data and runs the padded ops
        # with per-row lengths.
        resolve = rnn_fast.modules.lstm.resolve_backend
        monkeypatch.setattr(rnn_fast.modules.lstm, "resolve_backend",
                            lambda *args: resolve(*args)._replace(packed_layout=False))
    generator = torch.Generator().manual_seed(zlib.crc32(f"{pattern}{bidirectional}".encode()))
    reference, candidate = _pair(backend, num_layers, bidirectional, torch.float64)
    input = _packed_input(pattern, 3, torch.float64, generator)
    hx = _state(num_layers, bidirectional, len(LENGTH_PATTERNS[pattern]), 5, torch.float64, generator)
    assert_lstm_matches(reference, candidate, input, hx, atol=1e-9, rtol=1e-9)


@pytest.mark.skipif("cpu" not in PACKED_BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_float32_batch_first_without_state(bidirectional):
    # float32 at its tolerance, more rows than one sub-block of the kernels (128), lengths from a padded batch-first
    # tensor.
    generator = torch.Generator().manual_seed(3)
    reference, candidate = _pair("cpu", 2, bidirectional, torch.float32, input_size=7, hidden=9, batch_first=True)
    lengths = torch.randint(1, 7, (140,), generator=generator)
    input = pack_padded_sequence(torch.randn(140, 6, 7, generator=generator), lengths, batch_first=True,
                                 enforce_sorted=False)
    assert_lstm_matches(reference, candidate, input, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# The inference path.

class _RecordOps(TorchDispatchMode):
    """Every op dispatched inside, with the tensors it returns: their shapes, and the bytes of those that are new
    memory rather than views of memory that existed before the op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        results = [r for r in torch.utils._pytree.tree_leaves(out) if isinstance(r, torch.Tensor)]
        new = [r for r in results if r.untyped_storage().data_ptr() not in inputs]
        self.calls.append((str(func.overloadpacket), [tuple(r.shape) for r in new],
                           sum(r.numel() * r.element_size() for r in new)))
        return out

    def names(self):
        return {name for name, _, _ in self.calls}

    def bytes(self):
        return sum(size for _, _, size in self.calls)


INFERENCE_MODES = ["no_grad", "inference_mode", "nothing_requires_grad"]


def _run_in_mode(mode, module, input, hx=None):
    if mode == "no_grad":
        with torch.no_grad():
            return module(input, hx)
    if mode == "inference_mode":
        with torch.inference_mode():
            return module(input, hx)
    module.requires_grad_(False)
    try:
        return module(input, hx)
    finally:
        module.requires_grad_(True)


def _inference_inputs(packed, generator):
    if packed:
        return _packed_input("unsorted", 3, torch.float64, generator), None
    input = torch.randn(4, 6, 3, generator=generator, dtype=torch.float64).to(DEVICE)  # batch-first [B, T, I]
    return input, _state(2, True, 4, 5, torch.float64, generator)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode", INFERENCE_MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_matches_nn_lstm(backend, mode, packed):
    reference, candidate = _pair(backend, 2, True, torch.float64, batch_first=not packed)
    input, hx = _inference_inputs(packed, torch.Generator().manual_seed(5))
    expected_output, expected_state = _run_in_mode(mode, reference, input, hx)
    output, state = _run_in_mode(mode, candidate, input, hx)
    if packed:
        expected_output, output = expected_output.data, output.data
    for got, want in zip((output, *state), (expected_output, *expected_state)):
        assert not got.requires_grad
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", INFERENCE_BACKENDS)
def test_inference_keeps_nothing_for_a_backward(backend, packed):
    reference, candidate = _pair(backend, 2, True, torch.float64, input_size=3, hidden=5, batch_first=not packed)
    input, hx = _inference_inputs(packed, torch.Generator().manual_seed(6))
    saved = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        candidate(input, hx)
        assert saved, "the training call saves tensors: the hook sees them"
        saved.clear()
        for mode in INFERENCE_MODES:
            _run_in_mode(mode, candidate, input, hx)
            assert not saved, f"{mode}: {saved}"

    # What each call allocates: the inference ops return no gates and no cells, so the call allocates less than
    # the training forward by at least what those would hold; an op through the whole stack copies no weights.
    with _RecordOps() as training:
        candidate(input, hx)
    with torch.no_grad(), _RecordOps() as inference:
        candidate(input, hx)
    assert not any("inference" in name for name in training.names())
    assert any("inference" in name for name in inference.names()), inference.names()
    assert not any("recurrence_forward" in name for name in inference.names()), inference.names()
    tokens = input.data.shape[0] if packed else input.shape[0] * input.shape[1]
    gates_and_cells = 2 * 2 * tokens * (4 * 5 + 5) * 8  # layers x directions x tokens x (4H + H) x float64
    assert inference.bytes() <= training.bytes() - gates_and_cells
    if isinstance(load_backend(backend), StackInferenceBackend):
        weight_shapes = {tuple(w.shape) for w in candidate.parameters()}
        weight_shapes |= {(2, *shape) for shape in weight_shapes}
        copied = [(name, shapes) for name, shapes, _ in inference.calls if weight_shapes & set(shapes)]
        assert not copied, f"weights copied per call: {copied}"


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("num_layers", [2, 4], ids=["L2", "L4"])
@pytest.mark.parametrize("batch", [1, 5], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_small_batch_layers_running_at_once_match_nn_lstm(batch, num_layers, packed, dtype, atol, rtol,
                                                           two_threads):
    # On 2 threads, a unidirectional stack of an even number of layers, at most 16 rows, at least 16 steps and
    # hidden size at most 512 runs its layers at once, each a chunk of 8 steps behind the one below (4 layers: each
    # thread runs two of them). 37 steps end mid-chunk.
    reference, candidate = _pair("cpu", num_layers, False, dtype, input_size=7, hidden=9)
    generator = torch.Generator().manual_seed(batch * num_layers)
    input = torch.randn(37, batch, 7, generator=generator, dtype=dtype)
    if packed:
        lengths = torch.randint(1, 38, (batch,), generator=generator)
        lengths[0] = 37
        input = pack_padded_sequence(input, lengths, enforce_sorted=False)
    hx = _state(num_layers, False, batch, 9, dtype, generator)
    with torch.no_grad():
        expected, expected_state = reference(input, hx)
        output, state = candidate(input, hx)
    if packed:
        expected, output = expected.data, output.data
    for got, want in zip((output, *state), (expected, *expected_state)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", INFERENCE_BACKENDS)
def test_streaming_one_step_at_a_time_carries_the_state(backend):
    reference, candidate = _pair(backend, 2, False, torch.float64, batch_first=True)
    steps = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    with torch.no_grad():
        expected, (h_ref, c_ref) = reference(steps)
        state = None
        outputs = []
        for t in range(steps.shape[1]):
            output, state = candidate(steps[:, t:t + 1], state)
            outputs.append(output)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(state[0], h_ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(state[1], c_ref, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Inference reads the parameters as they are now: every kind of update between two calls shows, as in nn.LSTM.

def _optimizer_step(module, input):
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    output, _ = module(input)
    output.square().sum().backward()
    optimizer.step()


def _replace_data(module, input):
    for parameter in module.parameters():
        parameter.data = parameter.data * 0.5 + 0.1


def _edit_data_in_place(module, input):
    for parameter in module.parameters():
        parameter.data.mul_(-0.5)
    module.weight_hh_l0.data[0] += 1.0


def _assign_state_dict(module, input):
    torch.manual_seed(11)
    weights = nn.LSTM(3, 5, 2, bidirectional=True, dtype=torch.float64, device=DEVICE).state_dict()
    module.load_state_dict(weights, assign=True)


def _load_state_dict(module, input):
    torch.manual_seed(12)
    module.load_state_dict(nn.LSTM(3, 5, 2, bidirectional=True, dtype=torch.float64, device=DEVICE).state_dict())


UPDATES = {"optimizer-step": _optimizer_step, "load_state_dict": _load_state_dict,
           "load_state_dict-assign": _assign_state_dict, "param.data-in-place": _edit_data_in_place,
           "param.data-replaced": _replace_data}


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("backend", INFERENCE_BACKENDS)
def test_inference_sees_parameter_updates(backend, update):
    reference, candidate = _pair(backend, 2, True, torch.float64)
    input = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    with torch.no_grad():
        before, _ = candidate(input)
    for module in (reference, candidate):
        UPDATES[update](module, input)
    with torch.no_grad():
        expected, (h_ref, c_ref) = reference(input)
        output, (h_n, c_n) = candidate(input)
    assert not torch.allclose(output, before)
    for got, want in zip((output, h_n, c_n), (expected, h_ref, c_ref)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", INFERENCE_BACKENDS)
def test_inference_after_changing_dtype(backend):
    reference, candidate = _pair(backend, 2, True, torch.float32)
    input = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with torch.no_grad():
        candidate(input)
        reference.double(), candidate.to(torch.float64)
        expected, _ = reference(input.double())
        output, _ = candidate(input.double())
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, expected, atol=1e-9, rtol=1e-9)
