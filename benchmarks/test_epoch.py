"""pytest-benchmark view of ``benchmarks/epoch.py``: one training epoch per round, per model and backend.

    pytest benchmarks/test_epoch.py --benchmark-only

On CUDA a round is a seed-configuration epoch (369 iterations of batch 768); on CPU a two-iteration epoch of
batch 8, so the file takes seconds. ``epoch.py`` is the benchmark the README quotes; this view is for comparing
runs with pytest-benchmark's own tooling (``--benchmark-autosave``, ``--benchmark-compare``).
"""
import pytest
import torch

from epoch import (DEFAULT_BACKENDS, SEED_BATCH_SIZE, SEED_ITERS, DeviceDataset, EpochConfig, TrainingRun,
                   model_backends, skip_reason)
from rnn_fast.nsynth.models import MODEL_NAMES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPOCH_SIZE = {"cuda": {"iters": SEED_ITERS, "batch_size": SEED_BATCH_SIZE}, "cpu": {"iters": 2, "batch_size": 8}}
ROUNDS = {"cuda": 3, "cpu": 2}


@pytest.mark.parametrize("model,backend", [(model, backend) for model in MODEL_NAMES
                                           for backend in model_backends(model, DEFAULT_BACKENDS[DEVICE.type])],
                         ids=lambda value: value)
def test_training_epoch(benchmark, model, backend):
    config = EpochConfig(model, backend, str(DEVICE), **EPOCH_SIZE[DEVICE.type])
    reason = skip_reason(model, backend, DEVICE, config.hidden)
    if reason is not None:
        pytest.skip(reason)
    run = TrainingRun(config, DeviceDataset(config))
    benchmark.group = f"epoch-{model}"
    benchmark.extra_info.update(iters=config.iters, batch_size=config.batch_size, hidden=config.hidden)
    benchmark.pedantic(run.epoch, rounds=ROUNDS[DEVICE.type], warmup_rounds=1, iterations=1)
