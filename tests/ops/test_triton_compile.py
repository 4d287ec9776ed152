"""The Triton kernels compile for the H100 (sm_90) in every precision, with no GPU (triton_compile.py)."""
import pytest

from triton_compile import CASES, run_in_subprocess

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def records():
    return {record["case"]: record for record in run_in_subprocess(CASES)}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_compiles_for_sm90(records, case):
    record = records[str(case)]
    assert "error" not in record, record["error"]
    assert 0 < record["registers"] <= 255
    # The H100 gives a block at most 227 KiB of shared memory.
    assert record["shared_bytes"] <= 227 * 1024, record
