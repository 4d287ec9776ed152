"""The Triton kernels compile for the H100/H200 (sm_90) in every precision, with no GPU (triton_compile.py): with the
installed Triton, and with the GPU machine's Triton 3.6.0 from the folder that ``RNN_FAST_GPU_MACHINE_TRITON``
names (``.ci/run`` installs it there with ``pip install --no-deps --target``)."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from triton_compile import CASES, GPU_MACHINE_TRITON, run_in_subprocess

pytest.importorskip("triton")

# Where .ci/run puts the GPU machine's Triton; unset elsewhere, and then those cases skip.
GPU_MACHINE_TRITON_FOLDER = os.environ.get("RNN_FAST_GPU_MACHINE_TRITON")
TRITONS = {"installed": None, f"triton{GPU_MACHINE_TRITON}": GPU_MACHINE_TRITON_FOLDER}


@pytest.fixture(scope="module")
def records():
    """Per Triton, case name -> record. Both compile at once, in two processes: the machine has two cores."""
    folders = {name: folder for name, folder in TRITONS.items() if name == "installed" or folder}
    with ThreadPoolExecutor(len(folders)) as pool:
        futures = {name: pool.submit(run_in_subprocess, CASES, triton_folder=folder)
                   for name, folder in folders.items()}
        return {name: {record["case"]: record for record in future.result()} for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("triton_name", list(TRITONS))
def test_kernel_compiles_for_sm90(records, triton_name, case):
    if triton_name not in records:
        pytest.skip(f"set RNN_FAST_GPU_MACHINE_TRITON to a folder holding triton=={GPU_MACHINE_TRITON} (.ci/run does)")
    record = records[triton_name][str(case)]
    assert "error" not in record, record["error"]
    if triton_name != "installed":
        assert record["triton"] == GPU_MACHINE_TRITON, f"{GPU_MACHINE_TRITON_FOLDER} holds triton {record['triton']}"
    assert 0 < record["registers"] <= 255
    # The H100 and H200 give a block at most 227 KiB of shared memory.
    assert record["shared_bytes"] <= 227 * 1024, record


def test_tiles_are_the_autotuners():
    """The table of triton_compile.py covers exactly the configurations the autotuner keeps at H=128."""
    from rnn_fast.ops.lstm import triton as triton_backend
    from triton_compile import HIDDEN, TILES

    block_h = triton_backend.kernel_plan(HIDDEN, torch.float16, torch.device("cpu")).block_h
    assert set(TILES) == {(block_b, warps) for block_b, warps in triton_backend.TILE_CANDIDATES
                          if triton_backend.tile_fits(block_b, block_h, warps)}
