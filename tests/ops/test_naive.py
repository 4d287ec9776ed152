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
