import os

import torch

# Triton reads TRITON_INTERPRET when it is imported; without a GPU its kernels run on CPU tensors through the
# interpreter. Set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every ``empty`` allocation, in Python or in C++ (``at::empty``), comes back filled with NaN (and
    integers with their maximum), so an output element a kernel forgets to write fails the comparison."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
