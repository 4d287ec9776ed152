"""Forward + backward of the classifier's LSTM stack on CPU: ``rnn_fast.LSTM(backend="cpu")`` vs ``torch.nn.LSTM``.

    python -m pytest benchmarks/test_lstm_cpu.py --benchmark-only

The stack is 2 layers of hidden size 128 over ``[B, 100, 160]`` batch-first input that does not require grad,
unidirectional and bidirectional, B in {256, 768}, on 2 threads. A round is one forward and one backward of a
random weighting of the output. The fused backend and nn.LSTM, with the same weights, alternate round by round
and share whatever load the machine has (``_timing.alternating``). The medians, p20/p80 and the speedup (nn.LSTM median / fused median) go to
``benchmarks/results/cpu-<date>.json`` (timing and recording helpers: ``_timing.py``).
"""
import datetime
import os

import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.ops.lstm import unavailable_reason

from _timing import RESULTS_DIR, alternating, report, threads_then_results

INPUT_SIZE, HIDDEN, LAYERS, SEQ_LEN = 160, 128, 2, 100
BATCHES = (256, 768)
NUM_THREADS = 2
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "10"))
WARMUP_ROUNDS = 1

_records = []


@pytest.fixture(scope="module", autouse=True)
def results_file():
    """Runs the module on NUM_THREADS threads, then writes every case's figures to one JSON file."""
    yield from threads_then_results("cpu", NUM_THREADS, _records, lambda: {
        "config": {"input_size": INPUT_SIZE, "hidden": HIDDEN, "layers": LAYERS, "seq_len": SEQ_LEN,
                   "batch_first": True, "input_requires_grad": False, "rounds": ROUNDS,
                   "warmup_rounds": WARMUP_ROUNDS}},
        RESULTS_DIR / f"cpu-{datetime.date.today().isoformat()}.json")


def _forward_backward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        output, _ = module(x)
        (output * weight).sum().backward()

    return step


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=f"cpu backend: {unavailable_reason('cpu')}")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda batch: f"B{batch}")
def test_forward_backward(benchmark, batch, bidirectional):
    torch.manual_seed(0)
    kwargs = dict(num_layers=LAYERS, batch_first=True, bidirectional=bidirectional)
    reference = nn.LSTM(INPUT_SIZE, HIDDEN, **kwargs)
    fused = rnn_fast.LSTM(INPUT_SIZE, HIDDEN, backend="cpu", **kwargs)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(batch, SEQ_LEN, INPUT_SIZE)
    weight = torch.randn(batch, SEQ_LEN, HIDDEN * (2 if bidirectional else 1))
    benchmark.group = f"lstm-cpu-B{batch}-{'bi' if bidirectional else 'uni'}"
    timed = alternating(benchmark, _forward_backward(fused, x, weight), _forward_backward(reference, x, weight),
                        ROUNDS, WARMUP_ROUNDS)
    fused_stats, torch_stats, speedup = timed["fused"], timed["torch"], timed["speedup"]
    _records.append({"batch": batch, "bidirectional": bidirectional, "cpu": fused_stats, "torch": torch_stats,
                     "speedup_vs_torch": speedup})
    report(f"{'BLSTM' if bidirectional else 'LSTM'} B={batch}: nn.LSTM {torch_stats['median_ms']:.0f} ms, "
           f"cpu {fused_stats['median_ms']:.0f} ms, {speedup:.2f}x (medians of {ROUNDS} rounds, {NUM_THREADS} threads)")
