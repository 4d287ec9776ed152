"""The CUDA recurrence kernels of csrc/cuda, run unchanged on a CPU emulation of the GPU (tests/cuda_emulation),
against the readable float64 reference (rnn_fast.ops.lstm.naive).

This checks, without a GPU, what is easiest to get wrong in the kernels: the MMA operand layouts (the emulated
mma.sync follows the PTX ISA's fragment tables, not the kernels' arrangement), thread/unit/row indexing, the
cluster split and its shared-memory exchange, per-row lengths in both directions, padded hidden sizes and
batch tails, and that every output element is written (outputs start as NaN). The tensor cores' own rounding and
the real memory model are the GPU tests' job (tests run there with backend="cuda").
"""
import os
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Dict, NamedTuple, Optional

import numpy as np
import pytest
import torch

from rnn_fast.ops.lstm import naive

ROOT = Path(__file__).resolve().parents[1]

# precision -> (input dtype, saved-state dtype, max |error| / max(1, max |reference|))
PRECISIONS = {
    "bf16": (torch.bfloat16, torch.float32, 3e-2),
    "fp16": (torch.float16, torch.float32, 4e-3),
    "tf32": (torch.float32, torch.float32, 4e-3),
    "fp32": (torch.float32, torch.float32, 1e-5),
    "fp64": (torch.float64, torch.float64, 1e-10),
}

FORWARD_OUTPUTS = ("y", "h_n", "c_n", "gates", "cell")
BACKWARD_OUTPUTS = ("grad_xw", "grad_h0", "grad_c0")


def _cuda_include_dir() -> Optional[Path]:
    """The toolkit's include folder (only headers are used), where torch's extension builder would look."""
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_bf16.h").exists():
            return Path(home) / "include"
    return None


def build_emulator(folder: Path) -> Optional[Path]:
    """Compiles the emulation driver (tests/cuda_emulation/run_kernels.cpp) into `folder`; None without g++ or
    the CUDA toolkit's headers."""
    compiler, include = shutil.which("g++"), _cuda_include_dir()
    if compiler is None or include is None:
        return None
    binary = folder / "run_kernels"
    subprocess.run([compiler, "-std=c++17", "-O1", "-w", f"-I{ROOT / 'tests' / 'cuda_emulation'}",
                    f"-I{ROOT / 'csrc' / 'cuda'}", "-isystem", str(include),
                    '-DRNN_FAST_PRIMITIVES_HEADER="emulated_primitives.h"',
                    str(ROOT / "tests" / "cuda_emulation" / "run_kernels.cpp"), "-o", str(binary), "-pthread"],
                   check=True, timeout=900)
    return binary


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    binary = build_emulator(tmp_path_factory.mktemp("cuda_emulation"))
    if binary is None:
        pytest.skip("the CUDA emulation needs g++ and the CUDA toolkit's headers")
    return binary


def _write(folder: Path, name: str, tensor: torch.Tensor) -> None:
    (folder / f"{name}.bin").write_bytes(tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes())


def _read(folder: Path, name: str, like: torch.Tensor) -> torch.Tensor:
    raw = torch.from_numpy(np.fromfile(folder / f"{name}.bin", dtype=np.uint8).copy())
    return raw.view(like.dtype).reshape(like.shape)


def _emulate(binary: Path, folder: Path, precision: str, kernel: str, tiles: int, major: int,
             inputs: Dict[str, torch.Tensor], shape, has_lengths: bool, variants: str = "-"
             ) -> subprocess.CompletedProcess:
    """Runs one kernel (``forward``, ``inference`` or ``backward``) under ``variants`` (RNN_FAST_CUDA_VARIANTS's
    names, or "-" for the baseline)."""
    for name, tensor in inputs.items():
        _write(folder, name, tensor)
    args = [str(binary), precision, kernel, str(tiles), str(major), str(folder), *map(str, shape),
            str(int(has_lengths)), variants]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    (folder / "launch.txt").write_text(result.stdout)
    return result


class Case(NamedTuple):
    directions: int
    seq_len: int
    batch: int
    hidden: int
    lengths: bool

    @property
    def shape(self):
        return self.directions, self.seq_len, self.batch, self.hidden

    def __repr__(self) -> str:
        return (f"B{self.batch}-T{self.seq_len}-H{self.hidden}-{'bi' if self.directions == 2 else 'uni'}"
                f"{'-lengths' if self.lengths else ''}")


def _problem(case: Case, dtype: torch.dtype, seed: int):
    """Random inputs of the contract, rounded to `dtype`, and the float64 reference forward on them."""
    D, T, B, H = case.shape
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *size, scale=1.0: (torch.randn(*size, generator=generator, dtype=torch.float64) * scale).to(dtype)
    inputs = {"xw": randn(D, T, B, 4 * H), "w_hh": randn(D, 4 * H, H, scale=H ** -0.5),
              "h0": randn(D, B, H, scale=0.5), "c0": randn(D, B, H, scale=0.5)}
    lengths = torch.randint(1, T + 1, (B,), generator=generator) if case.lengths else None
    reference = naive.lstm_recurrence_forward(*(inputs[k].double() for k in ("xw", "w_hh", "h0", "c0")), lengths)
    return inputs, lengths, dict(zip(FORWARD_OUTPUTS, reference))


def _check(outputs: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor], tolerance: float) -> None:
    for name, expected in reference.items():
        got = outputs[name].double()
        assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) or non-finite elements"
        error = (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        assert error <= tolerance, f"{name}: max error {error:.3g} > {tolerance:.1g}"


CASES = [
    Case(2, 5, 19, 8, lengths=True),     # 4 warps; two batch tiles, the second mostly past the batch
    Case(1, 4, 7, 40, lengths=False),    # units 40..63 padded
    Case(2, 4, 5, 33, lengths=True),     # odd hidden size: scalar global accesses, a thread with one real unit
    Case(2, 3, 3, 1, lengths=True),      # one real unit in the whole CTA
    Case(2, 3, 18, 72, lengths=True),    # 96 padded units = 12 warps: a cluster of 2 CTAs
    Case(2, 3, 16, 128, lengths=False),  # the classifier's hidden size: a cluster of 2 (float64: 4 and 8)
]

# Which directions have a two-m-tile (32-row) kernel: lstm_recurrence.cuh's PrecisionTraits.
TWO_TILE_DIRECTIONS = {"bf16": ("forward", "backward"), "fp16": ("forward", "backward"), "tf32": ("forward",)}


def _run_forward(emulator, folder, precision, case, tiles=1, major=9):
    """Emulated forward outputs, the float64 reference's, and the inputs."""
    dtype, state, _ = PRECISIONS[precision]
    D, T, B, H = case.shape
    inputs, lengths, reference = _problem(case, dtype, seed=zlib.crc32(f"{precision}-{case!r}".encode()))
    files = dict(inputs, **({"lengths": lengths} if lengths is not None else {}))
    result = _emulate(emulator, folder, precision, "forward", tiles, major, files, case.shape, case.lengths)
    assert result.returncode == 0, result.stdout + result.stderr
    like = {"y": inputs["h0"].new_empty(D, T, B, H), "h_n": inputs["h0"], "c_n": inputs["h0"],
            "gates": torch.empty(D, T, B, 4 * H, dtype=state), "cell": torch.empty(D, T, B, H, dtype=state)}
    return {name: _read(folder, name, like[name]) for name in FORWARD_OUTPUTS}, reference, inputs, lengths


def _run_backward(emulator, folder, precision, case, forward_reference, inputs, lengths, tiles=1):
    """Emulated backward outputs and the float64 reference's, from the reference forward's saved state."""
    dtype, state, _ = PRECISIONS[precision]
    generator = torch.Generator().manual_seed(1)
    grads = {name: torch.randn(*like.shape, generator=generator, dtype=torch.float64).to(dtype)
             for name, like in (("grad_y", forward_reference["y"]), ("grad_h_n", inputs["h0"]),
                                ("grad_c_n", inputs["c0"]))}
    saved = {"gates": forward_reference["gates"].to(state), "cell": forward_reference["cell"].to(state)}
    files = dict(grads, **saved, w_hh=inputs["w_hh"], c0=inputs["c0"],
                 **({"lengths": lengths} if lengths is not None else {}))
    result = _emulate(emulator, folder, precision, "backward", tiles, 9, files, case.shape, case.lengths)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = naive.lstm_recurrence_backward(
        grads["grad_y"].double(), grads["grad_h_n"].double(), grads["grad_c_n"].double(), inputs["w_hh"].double(),
        inputs["c0"].double(), saved["gates"].double(), saved["cell"].double(), lengths)
    like = {"grad_xw": inputs["xw"], "grad_h0": inputs["h0"], "grad_c0": inputs["c0"]}
    return {name: _read(folder, name, like[name]) for name in BACKWARD_OUTPUTS}, dict(zip(BACKWARD_OUTPUTS, expected))


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_emulated_kernels_match_reference(emulator, tmp_path, precision, case):
    tolerance = PRECISIONS[precision][2]
    outputs, reference, inputs, lengths = _run_forward(emulator, tmp_path, precision, case)
    _check(outputs, reference, tolerance)
    _check(*_run_backward(emulator, tmp_path, precision, case, reference, inputs, lengths), tolerance)


@pytest.mark.parametrize("precision", list(TWO_TILE_DIRECTIONS))
def test_emulated_two_tile_kernels_match_reference(emulator, tmp_path, precision):
    case, tolerance = Case(2, 4, 45, 72, lengths=True), PRECISIONS[precision][2]  # 32-row tiles, a tail
    outputs, reference, inputs, lengths = _run_forward(emulator, tmp_path, precision, case, tiles=2)
    _check(outputs, reference, tolerance)
    if "backward" in TWO_TILE_DIRECTIONS[precision]:
        _check(*_run_backward(emulator, tmp_path, precision, case, reference, inputs, lengths, tiles=2), tolerance)


def test_pre_hopper_plan_runs_hidden_64_in_one_cta(emulator, tmp_path):
    case = Case(2, 3, 9, 64, lengths=True)
    outputs, reference, _, _ = _run_forward(emulator, tmp_path, "bf16", case, major=8)
    _check(outputs, reference, PRECISIONS["bf16"][2])
    assert "cluster=1 " in (tmp_path / "launch.txt").read_text()


def test_pre_hopper_plan_refuses_clusters(emulator, tmp_path):
    dtype = PRECISIONS["bf16"][0]
    case = Case(1, 2, 4, 66, lengths=False)
    inputs, _, _ = _problem(case, dtype, seed=0)
    result = _emulate(emulator, tmp_path, "bf16", "forward", 1, 8, inputs, case.shape, False)
    assert result.returncode == 3 and "unsupported" in result.stdout
