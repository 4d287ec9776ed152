"""rnn_fast.testing's own helpers: what they set is set in the body and restored after, and the comparisons and
records hold what the tests, benchmarks and GPU session read from them."""
import pytest
import torch

from rnn_fast.ops.lstm.precision import cudnn_fp32_precision, cudnn_rnn_allows_tf32
from rnn_fast.testing import cudnn_tf32, environment, poison_uninitialized_memory, relative_errors, results_file_name


def test_poisoning_restores_the_settings_before_it():
    # tests/conftest.py poisons every test and restores the settings it found once the test ends.
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = False
    with pytest.raises(ZeroDivisionError), poison_uninitialized_memory():
        assert torch.empty(3).isnan().all() and torch.are_deterministic_algorithms_enabled()
        1 / 0
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory


@pytest.mark.parametrize("allowed", [False, True])
def test_cudnn_tf32_is_what_rnn_fast_follows(allowed):
    before = cudnn_rnn_allows_tf32()
    with cudnn_tf32(allowed):
        assert cudnn_rnn_allows_tf32() is allowed
        assert cudnn_fp32_precision(torch.device("cuda"), torch.float32) == ("tf32" if allowed else "ieee")
        assert torch.backends.cudnn.allow_tf32 is allowed
    assert cudnn_rnn_allows_tf32() is before


def test_relative_errors_are_frobenius_and_infinite_where_missing_or_not_finite():
    expected = {"a": torch.tensor([3.0, 4.0]), "b": torch.ones(2)}
    errors = relative_errors({"a": torch.tensor([3.0, 4.5])}, expected)
    assert errors["a"] == pytest.approx(0.1) and errors["b"] == float("inf")
    assert relative_errors({"a": torch.tensor([float("nan"), 4.0]), "b": torch.ones(2)}, expected) == {
        "a": float("inf"), "b": 0.0}


def test_environment_names_what_a_result_ran_under(monkeypatch):
    monkeypatch.setenv("RNN_FAST_CUDA_VARIANTS", "saved_16bit")
    record = environment(torch.device("cpu"))
    assert {"device", "torch", "triton", "cuda", "date", "command"} <= set(record)
    assert record["torch"] == torch.__version__ and "pytest" in record["command"]
    assert record["settings"]["RNN_FAST_CUDA_VARIANTS"] == "saved_16bit"
    assert results_file_name({"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-02"}, "session") == \
        "nvidia-h100-80gb-hbm3-session-2026-12-02.json"
