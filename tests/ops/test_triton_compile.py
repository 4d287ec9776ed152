"""The Triton kernels compile for the H100 (sm_90) in every precision, with no GPU (triton_compile.py)."""
import pytest
import torch

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


def test_tiles_are_the_autotuners():
    """The table of triton_compile.py covers exactly the configurations the autotuner keeps at H=128."""
    from rnn_fast.ops.lstm import fused
    from triton_compile import HIDDEN, TILES

    block_h = fused.kernel_plan(HIDDEN, torch.float16, torch.device("cpu")).block_h
    assert set(TILES) == {(block_b, warps) for block_b, warps in fused.TILE_CANDIDATES
                          if fused.tile_fits(block_b, block_h, warps)}
