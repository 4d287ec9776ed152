"""rnn_fast.LSTM where tools expect nn.LSTM: gradients of gradients, TorchScript, export, ONNX, torch.save /
torch.load, conversion to and from nn.LSTM (quantization), and reports of the backend that really runs."""
import io
import os
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnn_fast
from rnn_fast.testing import runnable_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = runnable_backends(DEVICE)
F64 = dict(device=DEVICE, dtype=torch.float64)


class Tagger(nn.Module):
    """A model that holds its LSTM the way clients do: an attribute beside other layers."""

    def __init__(self, lstm: nn.Module):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(lstm.hidden_size * (2 if lstm.bidirectional else 1), 3, **_like(lstm))

    def forward(self, x):
        output, _ = self.lstm(x)
        return self.head(output)


def _like(module):
    weight = module.weight_ih_l0
    return dict(device=weight.device, dtype=weight.dtype)


def _pair(backend, input_size=2, hidden=3, layers=2, **kwargs):
    candidate = rnn_fast.LSTM(input_size, hidden, layers, backend=backend, **kwargs)
    reference = nn.LSTM(input_size, hidden, layers, **kwargs)
    reference.load_state_dict(candidate.state_dict())
    return reference, candidate


def _grads_of_a_gradient_penalty(module, input, hx):
    """Second-order gradients: of the squared norm of every first-order gradient (a WGAN-GP-like penalty)."""
    inputs = [input.data if isinstance(input, nn.utils.rnn.PackedSequence) else input, *hx,
              *module.parameters()]
    output, (h_n, c_n) = module(input, hx)
    data = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    weight = torch.sin(torch.arange(data.numel(), device=data.device, dtype=data.dtype)).view_as(data)
    first = torch.autograd.grad((data * weight).sum() + (h_n * c_n).sum(), inputs, create_graph=True)
    penalty = sum((grad * grad).sum() for grad in first)
    return torch.autograd.grad(penalty, inputs)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_nn_lstm(backend, packed):
    torch.manual_seed(0)
    reference, candidate = _pair(backend, bidirectional=True, **F64)
    if packed:
        input = pack_sequence([torch.randn(length, 2, **F64) for length in (2, 4, 1)], enforce_sorted=False)
        input.data.requires_grad_()
    else:
        input = torch.randn(4, 3, 2, **F64, requires_grad=True)
    hx = tuple(torch.randn(4, 3, 3, **F64, requires_grad=True) for _ in range(2))
    for actual, expected in zip(_grads_of_a_gradient_penalty(candidate, input, hx),
                                _grads_of_a_gradient_penalty(reference, input, hx)):
        torch.testing.assert_close(actual, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend, packed):
    """With ``check_batched_grad``, as PyTorch's own module tests check nn.LSTM: the double backward also runs
    under vmap, which refuses in-place writes of batched values into unbatched buffers."""
    torch.manual_seed(1)
    module = rnn_fast.LSTM(2, 2, bidirectional=True, backend=backend, **F64)
    names = [name for name, _ in module.named_parameters()]
    # The interpreter runs Triton kernels in Python: there the parameters stay constants and the inputs are few.
    with_parameters = not (backend == "triton" and INTERPRETED)
    seq_len, batch = (3, 2) if with_parameters else (2, 2)

    def lstm(x, h0, c0, *parameters):
        weights = dict(zip(names, parameters)) if with_parameters else {}
        # Packed: the second row one step shorter than the first.
        input = pack_sequence([x[:, 0], x[:-1, 1]]) if packed else x
        output, (h_n, c_n) = torch.func.functional_call(module, weights, (input, (h0, c0)))
        return output.data if packed else output, h_n, c_n

    inputs = [torch.randn(seq_len, batch, 2, **F64), torch.randn(2, batch, 2, **F64), torch.randn(2, batch, 2, **F64)]
    if with_parameters:
        inputs += [parameter.detach().clone() for parameter in module.parameters()]
    assert torch.autograd.gradgradcheck(lstm, [tensor.requires_grad_() for tensor in inputs], check_batched_grad=True)


def _functional_loss(module, input):
    """The module's loss as a function of its parameters, for torch.func transforms."""

    def loss(parameters, input=input):
        output, (h_n, c_n) = torch.func.functional_call(module, parameters, (input,))
        return output.sin().sum() + (h_n * c_n).sum()

    return loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_of_jacrev_matches_nn_lstm(backend):
    """The Hessian over the parameters, through two nested torch.func transforms (vmap over both backwards)."""
    torch.manual_seed(2)
    reference, candidate = _pair(backend, hidden=2, layers=1, bidirectional=True, **F64)
    input = torch.randn(3, 2, 2, **F64)
    parameters = {name: parameter.detach() for name, parameter in candidate.named_parameters()}
    expected = torch.func.jacrev(torch.func.jacrev(_functional_loss(reference, input)))(parameters)
    actual = torch.func.jacrev(torch.func.jacrev(_functional_loss(candidate, input)))(parameters)
    for name, row in expected.items():
        for other, block in row.items():
            torch.testing.assert_close(actual[name][other], block, atol=1e-9, rtol=1e-9)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_match_nn_lstm(backend):
    """vmap over grad: each example's own parameter gradients, as differential-privacy training takes them, against
    nn.LSTM's one example at a time (nn.LSTM's CPU kernel itself refuses vmap)."""
    torch.manual_seed(3)
    reference, candidate = _pair(backend, hidden=3, layers=2, **F64)
    examples = torch.randn(4, 5, 1, 2, **F64)
    parameters = {name: parameter.detach() for name, parameter in candidate.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(_functional_loss(candidate, None)), in_dims=(None, 0))(parameters,
                                                                                                     examples)
    for index, example in enumerate(examples):
        expected = torch.func.grad(_functional_loss(reference, example))(parameters)
        for name, grad in expected.items():
            torch.testing.assert_close(per_sample[name][index], grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_with_only_the_parameters_requiring_grad(backend):
    reference, candidate = _pair(backend, **F64)
    input = torch.randn(5, 2, 2, **F64)
    penalties = []
    for module in (reference, candidate):
        output, _ = module(input)
        grads = torch.autograd.grad(output.square().sum(), list(module.parameters()), create_graph=True)
        penalties.append(sum(grad.square().sum() for grad in grads))
    torch.testing.assert_close(penalties[1], penalties[0], atol=1e-9, rtol=1e-9)
    second = [torch.autograd.grad(penalty, list(module.parameters()))
              for penalty, module in zip(penalties, (reference, candidate))]
    for actual, expected in zip(second[1], second[0]):
        torch.testing.assert_close(actual, expected, atol=1e-9, rtol=1e-9)


def test_first_order_backward_stays_on_the_fused_op():
    """Only autograd asking for a graph takes the differentiable reference; a plain backward runs the kernel."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the cpu backend")
    module = rnn_fast.LSTM(2, 3, backend="cpu")
    input = torch.randn(4, 2, 2, requires_grad=True)
    for create_graph, kernel_runs in ((False, True), (True, False)):
        with torch.profiler.profile() as profile:
            output, _ = module(input)
            torch.autograd.grad(output.sum(), input, create_graph=create_graph)
        names = {event.name for event in profile.events()}
        assert ("rnn_fast::lstm_recurrence_backward" in names) == kernel_runs


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torchscript_scripts_through_nn_lstm(backend):
    model = Tagger(rnn_fast.LSTM(2, 3, 2, bidirectional=True, backend=backend))
    input = torch.randn(5, 2, 2, device=DEVICE)
    expected = model(input)
    scripted = torch.jit.script(model)
    assert "aten::lstm" in str(scripted.inlined_graph)
    torch.testing.assert_close(scripted(input), expected, atol=2e-5, rtol=2e-5)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(input), scripted(input), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning",
                            "ignore:Converting a tensor to a Python boolean:torch.jit.TracerWarning")
def test_torchscript_tracing_records_nn_lstm():
    model = Tagger(rnn_fast.LSTM(2, 3, 2, backend=BACKENDS[-1]))
    input = torch.randn(5, 2, 2, device=DEVICE)
    traced = torch.jit.trace(model, input)
    assert "aten::lstm" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(input), model(input))


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "triton"])
def test_torch_export_keeps_the_fused_ops(backend):
    model = Tagger(rnn_fast.LSTM(2, 3, 2, bidirectional=True, backend=backend))
    input = torch.randn(5, 2, 2, device=DEVICE)
    exported = torch.export.export(model, (input,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any(target.startswith("rnn_fast.") for target in targets), targets
    torch.testing.assert_close(exported.module()(input), model(input))


# Both are torch's, for nn.LSTM's own export too.
@pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm._flat_weights:UserWarning",
                            "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_onnx_export_writes_lstm_nodes():
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = Tagger(rnn_fast.LSTM(2, 3, 2, bidirectional=True, backend=BACKENDS[-1]).cpu()).cpu().eval()
    input = torch.randn(5, 2, 2)
    program = torch.onnx.export(model, (input,), dynamo=True, verbose=False)
    assert [node.op_type for node in program.model.graph].count("LSTM") == 2
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (output,) = session.run(None, {session.get_inputs()[0].name: input.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), model(input), atol=1e-5, rtol=1e-5)


def test_a_saved_model_loads_where_one_with_nn_lstm_does():
    """torch.load's weights_only default refuses classes it does not know; rnn_fast.LSTM is registered as safe."""
    input = torch.randn(5, 2, 2)
    allowed = [Tagger, nn.Linear, nn.LSTM]
    for lstm in (nn.LSTM(2, 3), rnn_fast.LSTM(2, 3, backend="naive")):
        buffer = io.BytesIO()
        torch.save(Tagger(lstm), buffer)
        buffer.seek(0)
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(buffer)
        assert type(loaded.lstm) is type(lstm)
        assert getattr(loaded.lstm, "backend", None) == getattr(lstm, "backend", None)
        torch.testing.assert_close(loaded(input), Tagger.forward(loaded, input))
        torch.testing.assert_close(loaded.lstm(input)[0], lstm(input)[0], atol=0, rtol=0)
        buffer.seek(0)
        with pytest.raises(Exception, match="Unsupported global"), torch.serialization.safe_globals([nn.Linear]):
            torch.load(buffer)


def test_to_torch_and_back_share_the_parameters():
    fast = Tagger(rnn_fast.LSTM(2, 3, 2, bidirectional=True, backend="naive"))
    parameters = list(fast.lstm.parameters())
    input = torch.randn(5, 2, 2)
    expected = fast(input)
    torch_model = rnn_fast.to_torch(fast)
    assert torch_model is fast and type(fast.lstm) is nn.LSTM
    assert all(a is b for a, b in zip(fast.lstm.parameters(), parameters))
    torch.testing.assert_close(fast(input), expected)
    back = rnn_fast.from_torch(fast, backend="naive")
    assert isinstance(back.lstm, rnn_fast.LSTM) and back.lstm.backend == "naive"
    assert all(a is b for a, b in zip(back.lstm.parameters(), parameters))
    torch.testing.assert_close(back(input), expected)
    lone = rnn_fast.to_torch(rnn_fast.LSTM(2, 3))
    assert type(lone) is nn.LSTM


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning",
                            "ignore:torch.quantize_per_tensor:UserWarning")
def test_dynamic_quantization_through_to_torch():
    model = Tagger(rnn_fast.LSTM(4, 8, backend="naive"))
    input = torch.randn(6, 2, 4)
    expected = model(input)
    untouched = torch.ao.quantization.quantize_dynamic(Tagger(rnn_fast.LSTM(4, 8)), {nn.LSTM})
    assert isinstance(untouched.lstm, rnn_fast.LSTM), "quantize_dynamic matches nn.LSTM by exact type"
    quantized = torch.ao.quantization.quantize_dynamic(rnn_fast.to_torch(model), {nn.LSTM, nn.Linear})
    assert type(quantized.lstm) is torch.ao.nn.quantized.dynamic.LSTM
    torch.testing.assert_close(quantized(input), expected, atol=0.05, rtol=0.05)


def test_dynamo_still_refuses_subclasses_of_nn_lstm():
    """Why rnn_fast.LSTM is not an nn.LSTM subclass: torch.compile refuses every nn.LSTM instance (torch._dynamo
    checks isinstance), so a subclass would lose fullgraph compilation. When this fails, torch has lifted that
    limit: derive rnn_fast.LSTM from nn.LSTM so that isinstance(m, nn.LSTM) holds."""

    class SubclassedLSTM(nn.LSTM):
        def forward(self, input, hx=None):
            return input * 2, (input, input)

    # As a submodule, where models hold their LSTMs (dynamo wraps the top-level module differently).
    compiled = torch.compile(Tagger(SubclassedLSTM(2, 3)), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="Dynamo does not support RNN, GRU, or LSTM"):
        compiled(torch.randn(2, 2))
    assert not isinstance(rnn_fast.LSTM(2, 3), nn.LSTM)
    fast = torch.compile(Tagger(rnn_fast.LSTM(2, 3, backend=BACKENDS[0])), fullgraph=True, backend="eager")
    fast(torch.randn(4, 2, 2, device=DEVICE))


def test_reports_name_the_backend_that_runs():
    fused = BACKENDS[-1]
    model = Tagger(rnn_fast.LSTM(2, 3, backend=fused))
    assert model.lstm.resolved_backend() == fused and rnn_fast.model_backend(model) == fused
    fallback = Tagger(rnn_fast.LSTM(2, 3, backend=fused, dtype=torch.bfloat16))
    assert rnn_fast.model_backend(fallback) == "torch"
    assert rnn_fast.model_backend(nn.Sequential(nn.Linear(2, 2))) == "none"
    # What the profiler sees run is what the report names.
    rnn_fast.modules.lstm._warned.clear()
    for lstm, op in ((model.lstm, "rnn_fast::"), (fallback.lstm, "aten::lstm")):
        with torch.profiler.profile() as profile, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lstm(torch.randn(4, 2, 2, device=DEVICE, dtype=lstm.weight_ih_l0.dtype))
        assert [str(w.message) for w in caught if "rnn_fast" in str(w.message)] == (
            [] if lstm is model.lstm else [f"rnn_fast.LSTM: {fallback.lstm._backend_choice(None, None).fallback_reason}; "
                                           "using torch.nn.LSTM's implementation"])
        assert any(event.name.startswith(op) for event in profile.events()), op
