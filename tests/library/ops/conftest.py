import pytest

from rnn_fast.testing import cudnn_tf32


@pytest.fixture(autouse=True)
def ieee_float32():
    """fp32 in full precision unless a test asks for TF32; restored afterwards."""
    with cudnn_tf32(False):
        yield
