"""What training loops do to gradients, against nn.LSTM: clipping, accumulation over several backward passes,
zeroing, optimizer steps between rounds, and a word-LM loop. A gradient that shares storage with another passes a
single backward from empty ``.grad`` and fails all of these, so the first test checks that no two do."""
import itertools
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnn_fast
from rnn_fast.testing import TOLERANCES, assert_named_close, assert_no_shared_storage, gradients, runnable_backends, \
    weighted_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = runnable_backends(DEVICE)
DTYPES = [pytest.param(dtype, tol, id=str(dtype).split(".")[1]) for dtype, tol in TOLERANCES.items()]


def _pair(backend, dtype, layers=2, bidirectional=True, bias=True, batch_first=False, input_size=3, hidden=5):
    kwargs = dict(bias=bias, batch_first=batch_first, bidirectional=bidirectional, device=DEVICE, dtype=dtype)
    reference = nn.LSTM(input_size, hidden, layers, **kwargs)
    candidate = rnn_fast.LSTM(input_size, hidden, layers, backend=backend, **kwargs)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def _leaves(dtype, seed, layers=2, directions=2, packed=False, batch_first=False, input_size=3, hidden=5):
    """``(input, input_leaf, (h0, c0))``: fresh leaves requiring grad; the input packed from rows of lengths
    4, 2 and 3 when ``packed``."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(DEVICE).requires_grad_()

    hx = (leaf(layers * directions, 3, hidden), leaf(layers * directions, 3, hidden))
    if packed:
        data = leaf(9, input_size)
        rows = torch.split(data, [4, 2, 3])
        return pack_sequence(rows, enforce_sorted=False), data, hx
    input = leaf(3, 4, input_size) if batch_first else leaf(4, 3, input_size)
    return input, input, hx


def _backward(module, input, hx, seed, **kwargs):
    output, (h_n, c_n) = module(input, hx)
    data = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    weighted_loss((data, h_n, c_n), seed).backward(**kwargs)
    return output


def _both(reference, candidate, dtype, seed=0):
    """The same leaves for each module: ``{module: (input, input_leaf, hx)}``."""
    return {module: _leaves(dtype, seed) for module in (reference, candidate)}


STRUCTURES = list(itertools.product((1, 2), (False, True), (True, False), (False, True), (False, True)))


def _structure_cases():
    for backend in BACKENDS:
        # The Triton interpreter runs each kernel program in Python: a sample keeps CI short.
        for index, structure in enumerate(STRUCTURES):
            if backend == "triton" and INTERPRETED and index % 4:
                continue
            layers, bidirectional, bias, packed, batch_first = structure
            name = (f"{backend}-L{layers}-{'bi' if bidirectional else 'uni'}{'' if bias else '-nobias'}"
                    f"{'-packed' if packed else ''}{'-bf' if batch_first else ''}")
            yield pytest.param(backend, *structure, id=name)


@pytest.mark.parametrize("backend, layers, bidirectional, bias, packed, batch_first", list(_structure_cases()))
def test_no_two_gradients_share_storage(backend, layers, bidirectional, bias, packed, batch_first):
    _, candidate = _pair(backend, torch.float64, layers, bidirectional, bias, batch_first)
    input, input_leaf, hx = _leaves(torch.float64, 1, layers, 2 if bidirectional else 1, packed, batch_first)
    _backward(candidate, input, hx, seed=2)
    grads = gradients(candidate, input_leaf, hx)
    assert all(grad is not None for grad in grads.values())
    assert_no_shared_storage(grads)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("clip", ["norm", "value"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_after_one_backward(backend, clip, dtype, tol):
    reference, candidate = _pair(backend, dtype)
    results = []
    for module, (input, input_leaf, hx) in _both(reference, candidate, dtype).items():
        _backward(module, input, hx, seed=3)
        if clip == "norm":
            # Well below the gradients' norm, so that every gradient is scaled in place.
            norm = nn.utils.clip_grad_norm_(module.parameters(), max_norm=0.1)
            results.append(dict(gradients(module, input_leaf, hx), norm=norm))
        else:
            nn.utils.clip_grad_value_(module.parameters(), clip_value=0.05)
            results.append(gradients(module, input_leaf, hx))
    assert_named_close(*results, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("retain_graph", [False, True], ids=["fresh-forwards", "retain-graph"])
@pytest.mark.parametrize("passes", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_backward_accumulates(backend, passes, retain_graph, dtype, tol):
    """Every gradient after each pass, as PyTorch's parity tests compare two implementations."""
    reference, candidate = _pair(backend, dtype)
    snapshots = {reference: [], candidate: []}
    for module, (input, input_leaf, hx) in _both(reference, candidate, dtype).items():
        if retain_graph:
            output, (h_n, c_n) = module(input, hx)
        for seed in range(passes):
            if retain_graph:
                weighted_loss((output, h_n, c_n), seed).backward(retain_graph=True)
            else:
                _backward(module, input, hx, seed)
            snapshots[module].append({name: grad.clone() for name, grad in
                                      gradients(module, input_leaf, hx).items()})
    for expected, actual in zip(snapshots[reference], snapshots[candidate]):
        assert_named_close(expected, actual, atol=tol, rtol=tol)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set-to-none", "zeroed-in-place"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_then_accumulate(backend, set_to_none):
    reference, candidate = _pair(backend, torch.float64)
    results = []
    for module, (input, input_leaf, hx) in _both(reference, candidate, torch.float64).items():
        _backward(module, input, hx, seed=0)
        module.zero_grad(set_to_none=set_to_none)
        for seed in (1, 2):
            _backward(module, input, hx, seed)
        results.append(gradients(module))
    assert_named_close(*results, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_steps_between_accumulation_rounds(backend, dtype, tol):
    """Two micro-batches per step, clipped, an Adam step, gradients zeroed in place; three rounds."""
    reference, candidate = _pair(backend, dtype)
    results = []
    for module in (reference, candidate):
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        for round in range(3):
            for micro_batch in range(2):
                input, _, hx = _leaves(dtype, seed=10 * round + micro_batch)
                _backward(module, input, hx, seed=micro_batch)
            nn.utils.clip_grad_norm_(module.parameters(), max_norm=0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        results.append(dict(module.named_parameters()))
    assert_named_close(*results, atol=tol, rtol=tol)


class WordLanguageModel(nn.Module):
    """Embedding, LSTM, linear decoder: the shape of pytorch/examples' word_language_model."""

    def __init__(self, lstm: nn.Module, vocabulary: int):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, lstm.input_size, device=DEVICE, dtype=lstm.weight_ih_l0.dtype)
        self.lstm = lstm
        self.decoder = nn.Linear(lstm.hidden_size, vocabulary, device=DEVICE, dtype=lstm.weight_ih_l0.dtype)

    def forward(self, tokens, hidden):
        output, hidden = self.lstm(self.embedding(tokens), hidden)
        return self.decoder(output), hidden


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_word_language_model_loop(backend, dtype, tol):
    """Truncated backpropagation through time as the example trains: hidden state carried over and detached,
    ``clip_grad_norm_(0.25)`` and a plain SGD step of lr 20 on every parameter."""
    vocabulary, steps, bptt, batch = 11, 6, 5, 3
    reference_lstm, candidate_lstm = _pair(backend, dtype, bidirectional=False, input_size=4, hidden=6)
    reference = WordLanguageModel(reference_lstm, vocabulary)
    candidate = WordLanguageModel(candidate_lstm, vocabulary)
    candidate.load_state_dict(reference.state_dict())
    corpus = torch.randint(vocabulary, (steps * bptt + 1, batch), generator=torch.Generator().manual_seed(0))
    corpus = corpus.to(DEVICE)
    losses = {reference: [], candidate: []}
    for model in (reference, candidate):
        hidden = None
        for step in range(steps):
            tokens, targets = corpus[step * bptt:(step + 1) * bptt], corpus[step * bptt + 1:(step + 1) * bptt + 1]
            hidden = None if hidden is None else tuple(state.detach() for state in hidden)
            model.zero_grad()
            logits, hidden = model(tokens, hidden)
            loss = nn.functional.cross_entropy(logits.view(-1, vocabulary), targets.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(parameter.grad, alpha=-20)
            losses[model].append(loss.detach())
    torch.testing.assert_close(torch.stack(losses[candidate]), torch.stack(losses[reference]), atol=tol, rtol=tol)
    assert_named_close(dict(reference.named_parameters()), dict(candidate.named_parameters()), atol=tol, rtol=tol)
