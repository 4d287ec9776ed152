import pytest
import torch


@pytest.fixture(autouse=True)
def ieee_float32():
    """fp32 in full precision unless a test asks for TF32; restored afterwards."""
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        yield
