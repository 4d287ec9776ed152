"""What the tests, the benchmarks and the GPU session (tools/gpu_session.py) share: checks of ``rnn_fast.LSTM``
against ``torch.nn.LSTM``, NaN-filled allocations, the precisions compared and how to set them, and the environment
a result was measured in."""
import contextlib
import datetime
import os
import platform
import re
import shlex
import sys
from typing import Callable, ContextManager, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .ops.lstm import FUSED_BACKENDS, resolve_backend

# Absolute and relative tolerance per dtype for a backend run in full precision (IEEE for float32).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 2e-5}


class Precision(NamedTuple):
    """How a case multiplies: its dtype, whether cuDNN's RNNs (and so rnn_fast) may use TF32, and the tolerance
    relative to float64 that this repository holds a backend to in it."""
    dtype: torch.dtype
    tf32: bool
    tolerance: float


PRECISIONS = {"fp32": Precision(torch.float32, False, TOLERANCES[torch.float32]),
              "tf32": Precision(torch.float32, True, 1e-3),
              "bf16": Precision(torch.bfloat16, False, 1e-2)}


@contextlib.contextmanager
def cudnn_tf32(allowed: bool) -> Iterator[None]:
    """TF32 allowed (or not) in cuDNN for the body, then the previous setting. nn.LSTM's cuDNN path, the fused
    recurrences and the driver's GEMMs all follow cuDNN's RNN setting (rnn_fast/ops/lstm/precision.py). It goes
    through the legacy ``allow_tf32`` flag, which sets the RNN and convolution settings alike: torch refuses to read
    that flag back once they differ."""
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=allowed):
        yield


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Runs the body on ``count`` intra-op threads (a benchmark's stated machine, a test's thread count), then
    restores the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def poison_uninitialized_memory() -> Iterator[None]:
    """Every ``empty`` allocation in the body, in Python or in C++ (``at::empty``), comes back filled with NaN (and
    integers with their maximum), so that an output element a kernel forgets to write fails the comparison.
    Deterministic algorithms are on (warning only) for the body, which the filling needs."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def runnable_backends(device: torch.device) -> List[str]:
    """The fused backends this install runs on ``device`` in float32 and float64 (the dtypes the tests compare)."""
    return [name for name in FUSED_BACKENDS
            if all(resolve_backend(name, device, dtype, 5).name == name for dtype in TOLERANCES)]


def _leaf_input(input):
    """A fresh leaf requiring grad with the same value (and packing) as ``input``."""
    if isinstance(input, PackedSequence):
        data = input.data.detach().clone().requires_grad_()
        return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), data
    leaf = input.detach().clone().requires_grad_()
    return leaf, leaf


def run_lstm(module: nn.LSTM, input, hx: Optional[Tuple[torch.Tensor, torch.Tensor]], seed: int,
             forward_context: Callable[[], ContextManager] = contextlib.nullcontext) -> Dict[str, torch.Tensor]:
    """Forward (inside ``forward_context()``, e.g. autocast), then one backward through a random weighting of every
    output, taken in float64 so that modules of any dtype get the same weights; returns outputs and all grads."""
    input, input_leaf = _leaf_input(input)
    if hx is not None:
        hx = tuple(state.detach().clone().requires_grad_() for state in hx)
    module.zero_grad(set_to_none=True)
    with forward_context():
        output, (h_n, c_n) = module(input, hx)
    output_data = output.data if isinstance(output, PackedSequence) else output
    weighted_loss(tuple(t.double() for t in (output_data, h_n, c_n)), seed).backward()
    result = {"output": output_data, "h_n": h_n, "c_n": c_n}
    result.update(gradients(module, input_leaf, hx))
    return result


def weighted_loss(tensors, seed: int) -> torch.Tensor:
    """A random weighting of every element of ``tensors``, summed: one backward of it reaches every gradient with
    a different weight per element. The same ``seed`` gives the same weights."""
    generator = torch.Generator(device=tensors[0].device).manual_seed(seed)
    return sum((tensor * torch.randn(tensor.shape, generator=generator, device=tensor.device,
                                     dtype=tensor.dtype)).sum() for tensor in tensors)


def gradients(module: nn.Module, input: Optional[torch.Tensor] = None,
              hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Dict[str, Optional[torch.Tensor]]:
    """``.grad`` of every parameter of ``module`` (``grad_<name>``), and of ``input`` and ``hx`` where given."""
    result = {}
    if input is not None:
        result["grad_input"] = input.grad
    if hx is not None:
        result["grad_h0"], result["grad_c0"] = hx[0].grad, hx[1].grad
    for name, parameter in module.named_parameters():
        result[f"grad_{name}"] = parameter.grad
    return result


def assert_named_close(expected: Dict[str, Optional[torch.Tensor]], actual: Dict[str, Optional[torch.Tensor]],
                       *, atol: float, rtol: float) -> None:
    """The same names, each tensor (an output, a gradient) present where expected and equal within the
    tolerances."""
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, f"{name}: expected None"
            continue
        assert actual[name] is not None, f"{name} is missing"
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_no_shared_storage(tensors: Dict[str, Optional[torch.Tensor]]) -> None:
    """No two of ``tensors`` share storage: whatever changes one in place (``clip_grad_norm_``, a backward that
    accumulates into ``.grad``) must leave the others alone, as it does for nn.LSTM's gradients."""
    owners: Dict[int, str] = {}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        storage = tensor.untyped_storage().data_ptr()
        assert storage not in owners, f"{name} shares storage with {owners[storage]}"
        owners[storage] = name


def assert_lstm_matches(reference: nn.LSTM, candidate: nn.LSTM, input, hx=None, *, atol: float, rtol: float,
                        seed: int = 0) -> None:
    """``candidate`` (with ``reference``'s weights) gives the same outputs and every gradient."""
    candidate.load_state_dict(reference.state_dict())
    expected = run_lstm(reference, input, hx, seed)
    actual = run_lstm(candidate, input, hx, seed)
    assert_named_close(expected, actual, atol=atol, rtol=rtol)


def relative_errors(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """``|actual - expected| / |expected|`` in the Frobenius norm, per name of ``expected``, computed in float64;
    infinite where ``actual`` lacks the name or holds a NaN or an infinity."""
    errors = {}
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or not torch.isfinite(got).all():
            errors[name] = float("inf")
            continue
        want = want.detach().double()
        errors[name] = float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-300))
    return errors


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} x{os.cpu_count()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set features that decide which kernels a CPU can run fast (fp32 FMA width, bf16 and int8 dot
# products, AMX tiles), as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_features() -> List[str]:
    """Which of :data:`CPU_FEATURES` this CPU has."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [feature for feature in CPU_FEATURES if feature in flags]


def environment(device: torch.device) -> dict:
    """Device, library versions, date, the exact command, and the ``RNN_FAST_*`` settings (CUDA kernel variants,
    Triton tile) it ran under: recorded with every result; on CPU also the instruction-set features
    (:data:`CPU_FEATURES`)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "-m", "pytest"] + sys.argv[1:]) if "pytest" in sys.argv[0]
        else shlex.join(["python"] + sys.argv),
        "settings": {name: value for name, value in sorted(os.environ.items()) if name.startswith("RNN_FAST_")},
        **({"cpu_features": cpu_features()} if device.type == "cpu" else {}),
    }


def results_file_name(record: dict, kind: str) -> str:
    """``<device>-<kind>-<date>.json``, the name of a record in benchmarks/results/."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(record["device"]).lower()).strip("-")
    return f"{slug}-{kind}-{record['date']}.json"
