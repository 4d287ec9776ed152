"""What PyTorch's own LSTM tests check of nn.LSTM, asked of rnn_fast.LSTM in our words: weights replaced or made
non-contiguous between calls, weight norm and pruning, dropout state and a changed dropout, and empty input."""
import io
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import rnn_fast
from rnn_fast.testing import assert_named_close, gradients, runnable_backends, weighted_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = runnable_backends(DEVICE)
F64 = dict(device=DEVICE, dtype=torch.float64)


def _pair(backend, **kwargs):
    reference = nn.LSTM(3, 4, 2, **F64, **kwargs)
    candidate = rnn_fast.LSTM(3, 4, 2, backend=backend, **F64, **kwargs)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def _run(module, input, seed=0):
    """Outputs and every gradient of one forward and backward; the gradients are zeroed in place afterwards, as
    PyTorch's weight-format test does between calls."""
    input = input.detach().requires_grad_()
    output, (h_n, c_n) = module(input)
    weighted_loss((output, h_n, c_n), seed).backward()
    result = {"output": output.detach(), "h_n": h_n.detach(), "c_n": c_n.detach()}
    result.update({name: grad.clone() for name, grad in gradients(module, input).items()})
    for parameter in module.parameters():
        parameter.grad.zero_()
    return result


def _new_weight(module, name, seed):
    shape = getattr(module, name).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE) * 0.3


def _replace_data(module, name, value):
    getattr(module, name).data = value


def _set_storage(module, name, value):
    with torch.no_grad():
        getattr(module, name).set_(value)


def _new_parameter(module, name, value):
    setattr(module, name, nn.Parameter(value))


def _non_contiguous(module, name, value):
    # The same values at every other element of a buffer twice as wide: a weight that is a non-contiguous view.
    strided = value.new_zeros(*value.shape[:-1], 2 * value.shape[-1])[..., ::2]
    getattr(module, name).data = strided.copy_(value)
    assert not getattr(module, name).is_contiguous()


def _flatten_after_new_parameter(module, name, value):
    _new_parameter(module, name, value)
    module.flatten_parameters()


REPLACEMENTS = {"data-assigned": _replace_data, "set_": _set_storage, "new-parameter": _new_parameter,
                "non-contiguous": _non_contiguous, "flatten-parameters": _flatten_after_new_parameter}


@pytest.mark.parametrize("how", REPLACEMENTS, ids=list(REPLACEMENTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_replaced_between_calls(backend, how):
    """Each call reads the weights the module holds now, and the gradients land on them; two calls after the
    change give the same, with the gradients zeroed in place in between."""
    reference, candidate = _pair(backend, bidirectional=True)
    input = torch.randn(5, 2, 3, **F64)
    before = _run(candidate, input)
    runs = {}
    for module in (reference, candidate):
        for index, name in enumerate(("weight_hh_l0", "bias_ih_l1_reverse")):
            REPLACEMENTS[how](module, name, _new_weight(module, name, seed=index))
        runs[module] = [_run(module, input, seed) for seed in (1, 1)]
    for expected, actual in zip(runs[reference], runs[candidate]):
        assert_named_close(expected, actual, atol=1e-9, rtol=1e-9)
    assert not torch.allclose(runs[candidate][0]["output"], before["output"])


def _weight_norm(module):
    parametrizations.weight_norm(module, "weight_hh_l0")


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def _legacy_weight_norm(module):
    torch.nn.utils.weight_norm(module, "weight_ih_l1")


def _pruning(module):
    # A fixed mask, so that both modules prune the same entries.
    mask = torch.rand(module.weight_hh_l1.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    prune.custom_from_mask(module, "weight_hh_l1", mask.to(DEVICE))


PARAMETRIZATIONS = {"weight-norm": _weight_norm, "legacy-weight-norm": _legacy_weight_norm, "pruning": _pruning}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", PARAMETRIZATIONS, ids=list(PARAMETRIZATIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_weights(backend, kind):
    """The weights as the parametrization computes them, gradients on its own parameters (``weight_hh_l0``'s
    ``original0``/``original1``, ``weight_ih_l1_g``/``_v``, ``weight_hh_l1_orig``), twice in a row."""
    reference, candidate = _pair(backend)
    input = torch.randn(4, 3, 3, **F64)
    runs = {}
    for module in (reference, candidate):
        PARAMETRIZATIONS[kind](module)
        runs[module] = [_run(module, input, seed) for seed in (0, 1)]
    for expected, actual in zip(runs[reference], runs[candidate]):
        assert_named_close(expected, actual, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_removed_restores_the_parameter(backend):
    for module in _pair(backend):
        prune.l1_unstructured(module, "weight_ih_l0", amount=0.5)
        assert sum(isinstance(weight, nn.Parameter) for weight in module._flat_weights) == 7
        prune.remove(module, "weight_ih_l0")
        assert sum(isinstance(weight, nn.Parameter) for weight in module._flat_weights) == 8
        assert (module.weight_ih_l0 == 0).sum() == module.weight_ih_l0.numel() // 2
    reference, candidate = _pair(backend)
    input = torch.randn(4, 3, 3, **F64)
    for module in (reference, candidate):
        prune.l1_unstructured(module, "weight_ih_l0", amount=0.5)
        prune.remove(module, "weight_ih_l0")
    assert_named_close(_run(reference, input), _run(candidate, input), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_state(backend, dropout, train):
    """Two calls differ exactly when dropout is on in training; a module saved and loaded again computes the same
    as before in eval."""
    module = rnn_fast.LSTM(6, 8, 2, dropout=dropout, backend=backend, **F64).train(train)
    input = torch.randn(4, 3, 6, **F64)
    first, second = module(input)[0], module(input)[0]
    assert torch.equal(first, second) == (dropout == 0 or not train)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert loaded.dropout == dropout and loaded.backend == backend
    module.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input)[0], module(input)[0], atol=0, rtol=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_dropout_takes_effect(backend, train):
    module = rnn_fast.LSTM(6, 8, 2, backend=backend, **F64).train(train)
    input = torch.randn(4, 3, 6, **F64)
    previous = None
    for dropout in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        module.dropout = dropout
        first, (h_first, _) = module(input)
        second, (h_second, _) = module(input)
        deterministic = dropout in (0, 1) or not train
        assert torch.equal(first, second) == deterministic
        assert torch.equal(h_first, h_second) == deterministic
        if previous is not None:
            # In training a new dropout changes the result; in eval dropout never applies.
            assert torch.equal(first, previous) == (not train)
        previous = first


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_like_nn_lstm(backend):
    """Zero rows give empty outputs and states of the right shapes, as nn.LSTM returns them."""
    reference, candidate = _pair(backend, bidirectional=True)
    input = torch.randn(5, 0, 3, **F64)
    expected, (h_expected, c_expected) = reference(input)
    actual, (h_actual, c_actual) = candidate(input)
    for got, want in ((actual, expected), (h_actual, h_expected), (c_actual, c_expected)):
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_sequence_is_an_error_like_nn_lstm(backend):
    reference, candidate = _pair(backend)
    input = torch.randn(0, 2, 3, **F64)
    with pytest.raises(RuntimeError) as expected:
        reference(input)
    with pytest.raises(RuntimeError, match=str(expected.value).split("\n")[0][:60]):
        candidate(input)
