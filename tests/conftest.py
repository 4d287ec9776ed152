import os

import torch

# Triton reads TRITON_INTERPRET when it is imported; without a GPU its kernels run on CPU tensors through the
# interpreter. Set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rnn_fast.testing import poison_uninitialized_memory  # noqa: E402


@pytest.fixture(autouse=True)
def uninitialized_memory_is_nan():
    """Every test runs with NaN-filled allocations (:func:`rnn_fast.testing.poison_uninitialized_memory`)."""
    with poison_uninitialized_memory():
        yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
