"""What the GPU session (tools/gpu_session.py) runs in its child processes: correctness at the classifier's shape,
timings against cuDNN, and the small programs that compute-sanitizer and ncu wrap.

    python tools/gpu_checks.py env --json env.json
    python tools/gpu_checks.py run --smoke cuda --bench triton,cuda --json run.json
    python tools/gpu_checks.py sanitize --backend cuda       # tiny shape, the ops called directly
    python tools/gpu_checks.py profile                        # each recurrence kernel once, for ncu
    python tools/gpu_checks.py sweep --json sweep.json        # the Triton autotuner over its tiles

``--dry-run`` runs the same code on the CPU at a tiny shape: the Triton kernels in the interpreter and the ``cpu``
backend standing in for ``cuda`` (both implement the same ops), host clocks instead of CUDA events. The CUDA
kernel variant of a process comes from ``RNN_FAST_CUDA_VARIANTS``, set by the session.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from cuda_variants import VARIANT_ENV, kernel_variants  # noqa: E402  (tools/, this script's folder)

# precision -> (dtype, TF32 for cuDNN and the fused recurrences, the repo's tolerance relative to float64)
PRECISIONS = {"fp32": ("float32", False, 2e-5), "tf32": ("float32", True, 1e-3), "bf16": ("bfloat16", False, 1e-2)}
# An error this small against float64 passes in any precision: IEEE fp32's tolerance.
ERROR_FLOOR = 2e-5
# rnn_fast.LSTM's warning when it falls back to nn.LSTM: an error here, or nn.LSTM's time would pass as ours.
FALLBACK_WARNING = "rnn_fast.LSTM: "
# In the dry run a CPU backend stands in for one that needs a GPU (same ops, same driver).
DRY_RUN_STANDINS = {"cuda": "cpu"}


class Shape:
    def __init__(self, dry_run: bool):
        # The classifier's stack, or a tiny one for the dry run.
        self.batch, self.seq_len, self.input_size, self.hidden, self.layers = \
            (4, 3, 5, 4, 2) if dry_run else (768, 100, 160, 128, 2)
        self.rounds, self.warmup = (1, 0) if dry_run else (20, 3)

    def as_dict(self):
        return {"batch": self.batch, "seq_len": self.seq_len, "input_size": self.input_size,
                "hidden": self.hidden, "layers": self.layers, "rounds": self.rounds, "warmup_rounds": self.warmup}


def current_variant() -> str:
    return os.environ.get(VARIANT_ENV, "") or "baseline"


# ---------------------------------------------------------------------------------------------------------- env

def environment_record(device, backends=("cpu", "triton", "cuda")) -> Dict:
    """Versions, device and which of ``backends`` this install can run (asking loads them: triton's import alone
    takes seconds, so a process asks only about those it uses)."""
    import torch

    from rnn_fast.ops.lstm import unavailable_reason
    from _timing import environment

    record = environment(device)
    reasons = {name: unavailable_reason(name) for name in backends}
    record.update(python=sys.version.split()[0], cudnn=torch.backends.cudnn.version(),
                  backends=[name for name, reason in reasons.items() if reason is None],
                  unavailable={name: reason for name, reason in reasons.items() if reason},
                  triton_tile_pin=os.environ.get("RNN_FAST_TRITON_TILE"), cuda_variant=current_variant(),
                  cuda_variants=list(kernel_variants()))
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        record.update(multiprocessors=properties.multi_processor_count,
                      capability=f"{properties.major}.{properties.minor}",
                      memory_gib=round(properties.total_memory / 2 ** 30, 1),
                      l2_mib=round(getattr(properties, "L2_cache_size", 0) / 2 ** 20, 1),
                      shared_memory_per_block_optin=getattr(properties, "shared_memory_per_block_optin", None))
    return record


# -------------------------------------------------------------------------------------------------- smoke checks

@contextlib.contextmanager
def precision_flags(allow_tf32: bool):
    """cuDNN's RNN precision (which nn.LSTM, both fused recurrences and the driver's GEMMs follow)."""
    import torch

    previous = torch.backends.cudnn.rnn.fp32_precision
    torch.backends.cudnn.rnn.fp32_precision = "tf32" if allow_tf32 else "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.rnn.fp32_precision = previous


@contextlib.contextmanager
def poisoned_allocations():
    """Every uninitialised allocation filled with NaN, so that an output element nobody writes fails."""
    import torch

    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            # Deterministic mode's warnings (ops without a deterministic kernel, cuBLAS's workspace) are noise here.
            warnings.simplefilter("ignore")
            warnings.filterwarnings("error", message=FALLBACK_WARNING)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


class Problem:
    """One stack's weights, input, state and loss weighting, drawn once in float64 from values that bfloat16
    represents exactly, so that every precision and implementation sees the same numbers."""

    def __init__(self, shape: Shape, bidirectional: bool, device, seed: int, lengths=None):
        import torch
        from torch import nn

        self.shape, self.bidirectional, self.device, self.lengths = shape, bidirectional, device, lengths
        self._torch_results: Dict[tuple, Dict] = {}
        torch.manual_seed(seed)
        self.reference = nn.LSTM(shape.input_size, shape.hidden, shape.layers, batch_first=True,
                                 bidirectional=bidirectional, dtype=torch.float64)
        with torch.no_grad():
            for parameter in self.reference.parameters():
                parameter.copy_(parameter.to(torch.bfloat16).double())
        self.reference.to(device)
        generator = torch.Generator().manual_seed(seed + 1)
        directions = 2 if bidirectional else 1

        def draw(*size):
            return torch.randn(*size, generator=generator, dtype=torch.float64).bfloat16().double().to(device)

        self.x = draw(shape.batch, shape.seq_len, shape.input_size)
        self.hx = (draw(shape.layers * directions, shape.batch, shape.hidden),
                   draw(shape.layers * directions, shape.batch, shape.hidden))
        self.output_weight = draw(shape.batch, shape.seq_len, directions * shape.hidden)
        self.state_weight = draw(*self.hx[0].shape)

    def results(self, implementation: str, dtype, allow_tf32: bool) -> Dict:
        """:meth:`run` of ``implementation`` in ``dtype`` and cuDNN's precision; nn.LSTM's are kept for reuse."""
        key = (implementation, dtype, allow_tf32)
        if implementation == "torch" and key in self._torch_results:
            return self._torch_results[key]
        module = self.reference if implementation == "torch" and dtype == self.reference.weight_ih_l0.dtype \
            else self.module(implementation, dtype)
        with precision_flags(allow_tf32):
            result = self.run(module, dtype)
        if implementation == "torch":
            self._torch_results[key] = result
        return result

    def module(self, implementation: str, dtype):
        """``nn.LSTM`` (implementation "torch") or ``rnn_fast.LSTM`` with the reference's weights in ``dtype``."""
        import rnn_fast
        from torch import nn

        shape = self.shape
        kwargs = dict(batch_first=True, bidirectional=self.bidirectional, device=self.device, dtype=dtype)
        if implementation == "torch":
            module = nn.LSTM(shape.input_size, shape.hidden, shape.layers, **kwargs)
        else:
            module = rnn_fast.LSTM(shape.input_size, shape.hidden, shape.layers, backend=implementation, **kwargs)
            if module.resolved_backend() != implementation:
                raise RuntimeError(f"rnn_fast.LSTM(backend={implementation!r}) would run "
                                   f"{module.resolved_backend()!r} here")
        module.load_state_dict(self.reference.state_dict())
        return module

    def run(self, module, dtype) -> Dict:
        """Outputs and every gradient (input, h0, c0, each parameter) as float64, through a fixed weighting."""
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        x = self.x.to(dtype).detach().clone().requires_grad_()
        hx = tuple(state.to(dtype).detach().clone().requires_grad_() for state in self.hx)
        module.zero_grad(set_to_none=True)
        input = x if self.lengths is None else pack_padded_sequence(x, self.lengths, batch_first=True,
                                                                     enforce_sorted=False)
        output, (h_n, c_n) = module(input, hx)
        if self.lengths is not None:
            output, _ = pad_packed_sequence(output, batch_first=True, total_length=self.shape.seq_len)
        loss = ((output.double() * self.output_weight).sum() + (h_n.double() * self.state_weight).sum()
                + (c_n.double() * self.state_weight).sum())
        loss.backward()
        result = {"output": output, "h_n": h_n, "c_n": c_n, "grad_input": x.grad, "grad_h0": hx[0].grad,
                  "grad_c0": hx[1].grad}
        result.update({f"grad_{name}": parameter.grad for name, parameter in module.named_parameters()})
        return {name: value.detach().double() for name, value in result.items()}


def relative_errors(actual: Dict, expected: Dict) -> Dict[str, float]:
    """``|actual - expected| / |expected|`` (Frobenius norms) per tensor; NaN anywhere gives inf."""
    import torch

    errors = {}
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or not torch.isfinite(got).all():
            errors[name] = float("inf")
            continue
        errors[name] = float((got - want).norm() / want.norm().clamp_min(1e-300))
    return errors


def _worst(errors: Dict[str, float]):
    name = max(errors, key=errors.get)
    return name, errors[name]


def implementation_reason(backend: str, device, dtype, hidden: int) -> Optional[str]:
    """Why ``backend`` would not run this case itself (a fallback to nn.LSTM would time the wrong thing)."""
    from rnn_fast.ops.lstm import resolve_backend

    return resolve_backend(backend, device, dtype, hidden).fallback_reason


def smoke(problem: Problem, backend: str, label: str, precisions, case: str) -> List[Dict]:
    """One record per precision: ours and nn.LSTM's error against float64 per tensor, ours against nn.LSTM, and
    whether ours passes: every tensor within twice nn.LSTM's own error against float64, or within ERROR_FLOOR (if
    nn.LSTM itself cannot run the case, within the repo's tolerance for the precision)."""
    import torch

    reference = problem.results("torch", torch.float64, allow_tf32=False)
    records = []
    for precision in precisions:
        dtype_name, allow_tf32, tolerance = PRECISIONS[precision]
        dtype = getattr(torch, dtype_name)
        record = {"backend": label, "variant": current_variant(), "case": case, "precision": precision}
        reason = implementation_reason(backend, problem.device, dtype, problem.shape.hidden)
        if reason is not None:
            records.append({**record, "ok": False, "status": f"unsupported: {reason}"})
            continue
        try:
            with poisoned_allocations():
                ours = problem.results(backend, dtype, allow_tf32)
        except Exception as error:  # reported, and the next precision still runs
            records.append({**record, "ok": False, "status": f"error: {type(error).__name__}: {error}"[:2000]})
            continue
        ours_error = relative_errors(ours, reference)
        try:
            torch_error = relative_errors(problem.results("torch", dtype, allow_tf32), reference)
            bounds = {name: max(2 * torch_error[name], ERROR_FLOOR) for name in reference}
            note = ""
        except Exception as error:
            torch_error, bounds = {}, dict.fromkeys(reference, tolerance)
            note = f" (nn.LSTM failed, {type(error).__name__}: {error}; judged by the tolerance {tolerance:g})"[:500]
        failing = [name for name in reference if not ours_error[name] <= bounds[name]]
        worst_name, worst = _worst(ours_error)
        records.append({**record, "ok": not failing, "status": ("ok" if not failing else f"fails: {failing}") + note,
                        "tolerance": tolerance, "within_tolerance": worst <= tolerance,
                        "worst_tensor": worst_name, "worst_error": worst,
                        "torch_error_same_tensor": torch_error.get(worst_name), "errors": ours_error,
                        "torch_errors": torch_error})
        print(f"smoke {label} {current_variant()} {case} {precision}: {records[-1]['status']} "
              f"(worst {worst_name} {worst:.2e}, torch {torch_error.get(worst_name, float('nan')):.2e})", flush=True)
    return records


def inference_check(backend_module, label: str, shape: Shape, device, precisions) -> List[Dict]:
    """The no-grad forward op (if the backend has one) against the training forward's ``(y, h_n, c_n)``."""
    import torch

    if not hasattr(backend_module, "lstm_recurrence_inference"):
        return [{"backend": label, "case": "inference-op", "ok": False, "status": "no lstm_recurrence_inference"}]
    records = []
    for precision in precisions:
        dtype_name, allow_tf32, _tolerance = PRECISIONS[precision]
        dtype = getattr(torch, dtype_name)
        record = {"backend": label, "variant": current_variant(), "case": "inference-op", "precision": precision}
        reason = backend_module.unsupported_reason(device, dtype, shape.hidden)
        if reason is not None:
            records.append({**record, "ok": False, "status": f"unsupported: {reason}"})
            continue
        inputs = recurrence_inputs(shape, 2, dtype, device, with_lengths=True)
        with torch.no_grad(), precision_flags(allow_tf32), poisoned_allocations():
            trained = backend_module.lstm_recurrence(*inputs)[:3]
            inferred = backend_module.lstm_recurrence_inference(*inputs)
        errors = relative_errors(dict(zip(("y", "h_n", "c_n"), (t.double() for t in inferred))),
                                 dict(zip(("y", "h_n", "c_n"), (t.double() for t in trained))))
        worst_name, worst = _worst(errors)
        records.append({**record, "ok": worst == 0.0,
                        "status": "ok: identical to the training forward" if worst == 0.0
                        else f"differs from the training forward: {worst_name} {worst:.2e}"})
    return records


def recurrence_inputs(shape: Shape, directions: int, dtype, device, with_lengths: bool = False, seed: int = 5):
    """Random contract inputs ``(xw, w_hh, h0, c0, lengths)`` at the session's shape."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    d, t, b, h = directions, shape.seq_len, shape.batch, shape.hidden

    def draw(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=generator, dtype=torch.float64)).to(device, dtype)

    lengths = None
    if with_lengths:
        lengths = torch.randint(1, t + 1, (b,), generator=generator)
        lengths[0] = t
        lengths = lengths.to(device)
    return draw(d, t, b, 4 * h), draw(d, 4 * h, h, scale=h ** -0.5), draw(d, b, h), draw(d, b, h), lengths


# ------------------------------------------------------------------------------------------------------- timing

class Clock:
    """Milliseconds of one call: CUDA events on a GPU, the host clock (after the work is done) on the CPU."""

    def __init__(self, device):
        import torch

        self.device, self.torch = device, torch

    def time(self, fn: Callable, setup: Optional[Callable] = None) -> float:
        torch = self.torch
        arguments = setup() if setup else ()
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn(*arguments)
            return 1000 * (time.perf_counter() - start)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*arguments)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def summarize(milliseconds: List[float]) -> Dict:
    from _timing import summary

    return summary([value / 1000 for value in milliseconds])


def time_alternating(clock: Clock, calls: Dict[str, tuple], rounds: int, warmup: int) -> Dict[str, Dict]:
    """``name -> (fn, setup)`` timed round-robin (so that drift hits all alike); median/p20/p80 per name."""
    times = {name: [] for name in calls}
    for index in range(warmup + rounds):
        for name, (fn, setup) in calls.items():
            elapsed = clock.time(fn, setup)
            if index >= warmup:
                times[name].append(elapsed)
    return {name: summarize(values) for name, values in times.items()}


def bench_stacks(problem_shape: Shape, device, backends: Dict[str, str], directions, precisions) -> List[Dict]:
    """Each backend against cuDNN (nn.LSTM) in the same process, per direction, precision and pass."""
    import torch
    from _timing import TRAINING_PASSES, training_passes

    records = []
    clock = Clock(device)
    for bidirectional in directions:
        for precision in precisions:
            dtype_name, allow_tf32, _ = PRECISIONS[precision]
            dtype = getattr(torch, dtype_name)
            problem = Problem(problem_shape, bidirectional, device, seed=11)
            x = problem.x.to(dtype)
            weight = problem.output_weight.to(dtype)
            modules = {"cudnn": problem.module("torch", dtype)}
            for label, backend in backends.items():
                if implementation_reason(backend, device, dtype, problem_shape.hidden) is None:
                    modules[label] = problem.module(backend, dtype)
            with precision_flags(allow_tf32), warnings.catch_warnings():
                warnings.filterwarnings("error", message=FALLBACK_WARNING)
                for pass_name in TRAINING_PASSES:
                    calls = {label: training_passes(module, x, weight)[pass_name] for label, module in modules.items()}
                    try:
                        timings = time_alternating(clock, calls, problem_shape.rounds, problem_shape.warmup)
                    except Exception as error:
                        records.append({"kind": "stack", "bidirectional": bidirectional, "precision": precision,
                                        "pass": pass_name, "error": f"{type(error).__name__}: {error}"[:2000]})
                        continue
                    for label, timing in timings.items():
                        if label == "cudnn":
                            continue
                        cudnn = timings["cudnn"]["median_ms"]
                        records.append({"kind": "stack", "backend": label, "variant": current_variant(),
                                        "bidirectional": bidirectional, "precision": precision, "pass": pass_name,
                                        "ours": timing, "cudnn": timings["cudnn"],
                                        "speedup_vs_cudnn": cudnn / timing["median_ms"]})
                        print(f"bench {label} {current_variant()} {'bi' if bidirectional else 'uni'} {precision} "
                              f"{pass_name}: cuDNN {cudnn:.2f} ms, ours {timing['median_ms']:.2f} ms, "
                              f"{records[-1]['speedup_vs_cudnn']:.2f}x", flush=True)
    return records


def recurrence_ops(backend: str):
    """``(forward, backward, inference or None)`` contract ops of a backend, each taking the contract's arguments.
    The C++ ops of ``cpu`` and ``cuda`` are one pair that dispatches on the tensors' device."""
    if backend == "triton":
        from rnn_fast.ops.lstm import precision, triton as fused

        def tf32(xw):
            return precision.cudnn_fp32_precision(xw.device, xw.dtype) == "tf32"

        return (lambda *args: fused.launch_forward(*args, tf32(args[0])),
                lambda *args: fused.launch_backward(*args, tf32(args[3])),
                lambda *args: fused.launch_forward(*args, tf32(args[0]), store_saved=False)[:3])
    from rnn_fast.ops.lstm import extension, load_backend

    inference = getattr(load_backend(backend), "lstm_recurrence_inference", None)
    return extension.forward_op, extension.backward_op, inference


def bench_recurrence(shape: Shape, device, backends: Dict[str, str], precisions) -> List[Dict]:
    """The recurrence ops alone, both directions in one launch as the BLSTM runs them: µs per step."""
    import torch

    records = []
    clock = Clock(device)
    for label, backend in backends.items():
        forward, backward, inference = recurrence_ops(backend)
        for precision in precisions:
            dtype_name, allow_tf32, _ = PRECISIONS[precision]
            dtype = getattr(torch, dtype_name)
            if implementation_reason(backend, device, dtype, shape.hidden) is not None:
                continue
            xw, w_hh, h0, c0, lengths = recurrence_inputs(shape, 2, dtype, device)
            with torch.no_grad(), precision_flags(allow_tf32):
                try:
                    y, h_n, c_n, gates, cell = forward(xw, w_hh, h0, c0, lengths)
                    grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n))
                    calls = {"forward": (lambda: forward(xw, w_hh, h0, c0, lengths), None),
                             "backward": (lambda: backward(*grads, w_hh, c0, gates, cell, lengths), None)}
                    if inference is not None:
                        calls["inference"] = (lambda: inference(xw, w_hh, h0, c0, lengths), None)
                    timings = time_alternating(clock, calls, shape.rounds, shape.warmup)
                except Exception as error:
                    records.append({"kind": "recurrence", "backend": label, "precision": precision,
                                    "error": f"{type(error).__name__}: {error}"[:2000]})
                    continue
            for op, timing in timings.items():
                records.append({"kind": "recurrence", "backend": label, "variant": current_variant(),
                                "precision": precision, "op": op, "directions": 2, **timing,
                                "us_per_step": 1000 * timing["median_ms"] / shape.seq_len})
                print(f"recurrence {label} {current_variant()} {precision} {op}: "
                      f"{records[-1]['us_per_step']:.2f} us/step", flush=True)
    return records


# ------------------------------------------------------------------------------------------------------ commands

def _device(dry_run: bool):
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run on a CPU machine)")
    return torch.device("cpu" if dry_run else "cuda")


def _backend_map(names: List[str], dry_run: bool) -> Dict[str, str]:
    """Label (what the summary says) -> backend that runs it."""
    return {name: DRY_RUN_STANDINS.get(name, name) if dry_run else name for name in names}


def command_env(args) -> Dict:
    return environment_record(_device(args.dry_run))


def command_run(args) -> Dict:
    """Smoke checks of ``--smoke`` backends, then timings of ``--bench`` backends against cuDNN. A backend checked in
    this process is timed only in the precisions where it passed."""
    import torch

    from rnn_fast.ops.lstm import load_backend

    device = _device(args.dry_run)
    shape = Shape(args.dry_run)
    smoked = _backend_map(_names(args.smoke), args.dry_run)
    benched = _backend_map(_names(args.bench), args.dry_run)
    precisions = args.precisions.split(",")
    result = {"environment": environment_record(device, sorted({*smoked.values(), *benched.values()})),
              "shape": shape.as_dict(), "variant": current_variant(),
              "smoke": [], "benchmarks": []}
    if smoked:
        for bidirectional in (False, True):
            problem = Problem(shape, bidirectional, device, seed=3)
            for label, backend in smoked.items():
                result["smoke"] += smoke(problem, backend, label, precisions, "L2-bi" if bidirectional else "L2-uni")
                save(args, result)
        generator = torch.Generator().manual_seed(4)
        lengths = torch.randint(max(1, shape.seq_len // 10), shape.seq_len + 1, (shape.batch,), generator=generator)
        packed = Problem(shape, True, device, seed=5, lengths=lengths)
        for label, backend in smoked.items():
            result["smoke"] += smoke(packed, backend, label, ["fp32"], "L2-bi-packed")
            save(args, result)
            if hasattr(load_backend(backend), "lstm_recurrence_inference"):
                result["smoke"] += inference_check(load_backend(backend), label, shape, device, precisions)
    checked = [record for record in result["smoke"] if record["case"].startswith("L2-")]
    passed = ({(r["backend"], r["precision"]) for r in checked}
              - {(r["backend"], r["precision"]) for r in checked if not r["ok"]})
    # The recurrence precisions that matter for speed; IEEE fp32 is checked, not timed.
    timed_precisions = [precision for precision in precisions if precision != "fp32"]
    for label, backend in benched.items():
        allowed = [precision for precision in timed_precisions if label not in smoked or (label, precision) in passed]
        result["benchmarks"] += bench_stacks(shape, device, {label: backend}, args.directions, allowed)
        save(args, result)
        result["benchmarks"] += bench_recurrence(shape, device, {label: backend}, allowed)
        save(args, result)
    if "triton" in {**smoked, **benched}:
        from rnn_fast.ops.lstm import triton as fused

        result["triton_tiles"] = fused.tile_choices()
    return result


def _names(text: str) -> List[str]:
    return [name for name in text.split(",") if name]


def command_sanitize(args) -> Dict:
    """A tiny problem through the forward, backward (and inference) ops of one backend, checked against the naive
    reference, in every precision the backend runs: the program compute-sanitizer wraps."""
    import torch

    from rnn_fast.ops.lstm import naive

    device = _device(args.dry_run)
    label = args.backend
    backend = _backend_map([label], args.dry_run)[label]
    forward, backward, inference = recurrence_ops(backend)
    shape = Shape(True)
    # Three 16-row tiles, the last one ragged, at the classifier's hidden size (smaller in the interpreter).
    shape.batch, shape.seq_len, shape.hidden = 37, 6, 8 if args.dry_run else 128
    failures = []
    for precision in args.precisions.split(","):
        dtype_name, allow_tf32, tolerance = PRECISIONS[precision]
        dtype = getattr(torch, dtype_name)
        if implementation_reason(backend, device, dtype, shape.hidden):
            continue
        xw, w_hh, h0, c0, lengths = recurrence_inputs(shape, 2, dtype, device, with_lengths=True)
        with torch.no_grad(), precision_flags(allow_tf32):
            outputs = forward(xw, w_hh, h0, c0, lengths)
            grads = tuple(torch.randn_like(t) for t in outputs[:3])
            grad_inputs = backward(*grads, w_hh, c0, outputs[3], outputs[4], lengths)
            inferred = inference(xw, w_hh, h0, c0, lengths) if inference is not None else ()
            if device.type == "cuda":
                torch.cuda.synchronize()
        # The reference on the CPU: the sanitizer then instruments only the ops under test.
        def host(tensors):
            return [tensor.double().cpu() for tensor in tensors]

        host_lengths = None if lengths is None else lengths.cpu()
        expected = naive.lstm_recurrence_forward(*host((xw, w_hh, h0, c0)), host_lengths)
        expected_grads = naive.lstm_recurrence_backward(*host((*grads, w_hh, c0)), expected[3], expected[4],
                                                        host_lengths)
        state_names, grad_names = ("y", "h_n", "c_n"), ("grad_xw", "grad_h0", "grad_c0")
        actual = {**dict(zip(state_names, outputs)), **dict(zip(grad_names, grad_inputs)),
                  **{f"{name}_inference": value for name, value in zip(state_names, inferred)}}
        want = {**dict(zip(state_names, expected)), **dict(zip(grad_names, expected_grads)),
                **{f"{name}_inference": value for name, value in zip(state_names, expected) if inferred}}
        errors = relative_errors({name: value.double().cpu() for name, value in actual.items()}, want)
        bad = {name: error for name, error in errors.items() if not error <= 2 * tolerance}
        print(f"sanitize {label} {current_variant()} {precision}: worst {_worst(errors)[0]} "
              f"{_worst(errors)[1]:.2e}{' FAILS ' + str(bad) if bad else ''}", flush=True)
        if bad:
            failures.append((precision, bad))
    if failures:
        raise SystemExit(f"wrong results under the sanitizer: {failures}")
    return {"ok": True}


def command_profile(args) -> Dict:
    """Each recurrence kernel at the session's shape, once per backend and precision, for ncu to profile."""
    import torch

    device = _device(args.dry_run)
    shape = Shape(args.dry_run)
    for label, backend in _backend_map(args.backends.split(","), args.dry_run).items():
        forward, backward, _inference = recurrence_ops(backend)
        for precision in args.precisions.split(","):
            dtype_name, allow_tf32, _ = PRECISIONS[precision]
            dtype = getattr(torch, dtype_name)
            if implementation_reason(backend, device, dtype, shape.hidden):
                continue
            xw, w_hh, h0, c0, lengths = recurrence_inputs(shape, 2, dtype, device)
            with torch.no_grad(), precision_flags(allow_tf32):
                y, h_n, c_n, gates, cell = forward(xw, w_hh, h0, c0, lengths)
                backward(torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), w_hh, c0, gates, cell,
                         lengths)
            print(f"profiled {label} {precision}", flush=True)
    return {"ok": True}


def command_sweep(args) -> Dict:
    """Without a pinned tile: the autotuner's timing of every candidate tile at the session's shape."""
    import torch

    from rnn_fast.ops.lstm import triton as fused

    if fused.pinned_tile() is not None:
        raise SystemExit(f"unset {fused.TILE_ENV} for the sweep")
    device = _device(args.dry_run)
    shape = Shape(args.dry_run)
    forward, backward, _ = recurrence_ops("triton")
    sweeps = []
    result = {"sweeps": sweeps}
    # The BLSTM's two directions first: the case the next session most needs a tile for.
    for directions in (2, 1):
        for precision in args.precisions.split(","):
            dtype_name, allow_tf32, _ = PRECISIONS[precision]
            dtype = getattr(torch, dtype_name)
            if implementation_reason("triton", device, dtype, shape.hidden):
                continue
            xw, w_hh, h0, c0, lengths = recurrence_inputs(shape, directions, dtype, device)
            with torch.no_grad(), precision_flags(allow_tf32):
                y, h_n, c_n, gates, cell = forward(xw, w_hh, h0, c0, lengths)
                forward_timings = getattr(fused._lstm_forward_kernel, "configs_timings", None) or {}
                backward(torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), w_hh, c0, gates, cell,
                         lengths)
                backward_timings = getattr(fused._lstm_backward_kernel, "configs_timings", None) or {}
            for kernel, timings in (("forward", forward_timings), ("backward", backward_timings)):
                sweeps.append({"kernel": kernel, "precision": precision, "directions": directions,
                               "ms_by_tile": {fused._tile_name(config): _first(value)
                                              for config, value in timings.items()}})
                print(f"sweep {kernel} {precision} D={directions}: {sweeps[-1]['ms_by_tile']}", flush=True)
            result["triton_tiles"] = fused.tile_choices()
            save(args, result)
    return result


def _first(value):
    """do_bench returns a number or a list of quantiles, depending on the Triton version."""
    return value[0] if isinstance(value, (list, tuple)) else value


def save(args, record: Dict) -> None:
    """Writes what a command has so far, so that a step cut by its timeout still leaves its results."""
    if args.json:
        partial = args.json.with_suffix(".partial")
        partial.write_text(json.dumps(record, indent=1, default=str) + "\n")
        partial.replace(args.json)


COMMANDS = {"env": command_env, "run": command_run, "sanitize": command_sanitize, "profile": command_profile,
            "sweep": command_sweep}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape (the session's --dry-run)")
    parser.add_argument("--json", type=Path, help="write the command's record here")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--backend", default="cuda", help="sanitize: the backend whose ops run")
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--smoke", default="", help="run: backends to check (comma-separated)")
    parser.add_argument("--bench", default="", help="run: backends to time against cuDNN")
    parser.add_argument("--directions", default="bi,uni",
                        type=lambda text: [part == "bi" for part in text.split(",")])
    args = parser.parse_args(argv)
    save(args, COMMANDS[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
