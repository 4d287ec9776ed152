"""The naive reference ops: torch.library contract checks (schema, fake, autograd registration)."""
import pytest
import torch

from rnn_fast.ops.lstm import naive


def _inputs(num_directions, seq_len, batch, hidden, with_lengths):
    xw = torch.randn(num_directions, seq_len, batch, 4 * hidden, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(num_directions, 4 * hidden, hidden, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(num_directions, batch, hidden, dtype=torch.float64, requires_grad=True)
              for _ in range(2))
    lengths = torch.randint(1, seq_len + 1, (batch,)) if with_lengths else None
    return xw, w_hh, h0, c0, lengths


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
def test_opcheck(num_directions, with_lengths):
    args = _inputs(num_directions, 4, 3, 2, with_lengths)
    torch.library.opcheck(naive.forward_op, args)
    with torch.no_grad():
        y, h_n, c_n, gates, cell = naive.forward_op(*args)
    grads = tuple(torch.randn_like(t) for t in (y, h_n, c_n))
    # The backward op has no autograd of its own: double backward is not supported.
    torch.library.opcheck(naive.backward_op, (*grads, args[1].detach(), args[3].detach(), gates, cell, args[4]))


@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
def test_gradcheck_with_lengths(num_directions):
    xw, w_hh, h0, c0, lengths = _inputs(num_directions, 4, 3, 2, with_lengths=True)

    def outputs(xw, w_hh, h0, c0):
        return naive.lstm_recurrence(xw, w_hh, h0, c0, lengths)[:3]

    assert torch.autograd.gradcheck(outputs, (xw, w_hh, h0, c0))


def test_padded_steps_are_zero_and_reverse_starts_at_row_end():
    xw, w_hh, h0, c0, _ = _inputs(2, 5, 2, 3, with_lengths=False)
    lengths = torch.tensor([5, 2])
    y, h_n, c_n, gates, cell = naive.lstm_recurrence(xw, w_hh, h0, c0, lengths)
    assert (y[:, 2:, 1] == 0).all() and (gates[:, 2:, 1] == 0).all() and (cell[:, 2:, 1] == 0).all()
    short = naive.lstm_recurrence(xw[:, :2, 1:].contiguous(), w_hh, h0[:, 1:].contiguous(),
                                  c0[:, 1:].contiguous(), None)
    torch.testing.assert_close(y[:, :2, 1:], short[0])
    torch.testing.assert_close(h_n[:, 1:], short[1])
    torch.testing.assert_close(c_n[:, 1:], short[2])


def _packed_inputs(num_directions):
    lengths = torch.tensor([4, 4, 2, 1])
    batch_sizes = (lengths.unsqueeze(0) > torch.arange(4).unsqueeze(1)).sum(1)
    xw, w_hh, h0, c0, _ = _inputs(num_directions, 1, int(lengths.sum()), 2, with_lengths=False)
    h0, c0 = (state[:, :4].detach().clone().requires_grad_() for state in (h0, c0))
    return xw[:, 0].detach().clone().requires_grad_(), w_hh, h0, c0, batch_sizes


@pytest.mark.parametrize("num_directions", [1, 2], ids=["uni", "bi"])
def test_inference_and_packed_opcheck(num_directions):
    xw, w_hh, h0, c0, lengths = _inputs(num_directions, 4, 3, 2, with_lengths=True)
    torch.library.opcheck(naive.inference_op, tuple(t.detach() for t in (xw, w_hh, h0, c0)) + (lengths,))
    args = _packed_inputs(num_directions)
    torch.library.opcheck(naive.packed_forward_op, args)
    torch.library.opcheck(naive.packed_inference_op, tuple(t.detach() for t in args[:4]) + args[4:])
    with torch.no_grad():
        y, h_n, c_n, gates, cell = naive.packed_forward_op(*args)
    grads = tuple(torch.randn_like(t) for t in (y, h_n, c_n))
    torch.library.opcheck(naive.packed_backward_op, (*grads, args[1].detach(), args[3].detach(), gates, cell, args[4]))


def test_packed_layout_holds_the_steps_each_row_runs():
    xw, w_hh, h0, c0, batch_sizes = (t.detach() if t.is_floating_point() else t for t in _packed_inputs(2))
    y, h_n, c_n, _, _ = naive.lstm_packed_recurrence(xw, w_hh, h0, c0, batch_sizes)
    # Row 2 (length 2) is packed rows 2 and 6: its own padded run of two steps gives the same values.
    short = naive.lstm_recurrence(xw[:, [2, 6]].unsqueeze(2), w_hh, h0[:, 2:3], c0[:, 2:3], None)
    torch.testing.assert_close(y[:, [2, 6]], short[0][:, :, 0])
    torch.testing.assert_close(h_n[:, 2:3], short[1])
    torch.testing.assert_close(c_n[:, 2:3], short[2])
