"""Compiles the Triton LSTM kernels of rnn_fast/ops/lstm/triton.py ahead of time for NVIDIA targets, with no GPU:
Triton lowers them to PTX and its bundled ptxas assembles a cubin, whose resource usage cuobjdump reports.

The interpreter (how CI runs the kernels) never lowers them, so this is what catches code that only the compiler
rejects. It runs in its own process because ``TRITON_INTERPRET=1`` (set by the test session) replaces ``@triton.jit``
at import.

    python tests/library/ops/triton_compile.py          # the resource table of the test's cases (sm_90, one tile)
    python tests/library/ops/triton_compile.py --all    # every tile the autotuner may pick at H=128, sm_90 and sm_80
    python tests/library/ops/triton_compile.py --all --sm90 [--lengths]   # only sm_90 [only with per-row lengths]

It compiles with whichever triton it imports: put another version's folder first on PYTHONPATH to compile with that
one (.ci/run does this for the GPU machine's Triton 3.6.0, see GPU_MACHINE_TRITON).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

ARCHITECTURES = (90, 80)
# The Triton of the GPU machine that sessions are lent (its torch 2.11.0+cu130 bundles it).
GPU_MACHINE_TRITON = "3.6.0"
HIDDEN = 128
# The forward kernel as a training forward (saving gates and cells), as the inference forward, and the backward.
KERNELS = ("forward", "inference", "backward")
# (label, input dtype, TF32 switch) as the backend's launchers see them.
PRECISIONS = (("fp32", "float32", False), ("tf32", "float32", True), ("fp16", "float16", False),
              ("bf16", "bfloat16", False), ("fp64", "float64", False))
# The autotuner's candidates that its pruning keeps at H=128 (TILE_CANDIDATES and tile_fits of
# rnn_fast/ops/lstm/triton.py), and the one CI compiles.
TILES = ((16, 4), (16, 8), (16, 16), (32, 8), (32, 16), (64, 16))
CI_TILE = (32, 8)


class Case(NamedTuple):
    kernel: str
    precision: str
    arch: int
    block_b: int
    num_warps: int
    # Per-row lengths (packed input) compile the step-skipping code; padded batches (no lengths) do not.
    lengths: bool

    def __str__(self):
        return (f"{self.kernel}-{self.precision}-sm{self.arch}-B{self.block_b}-w{self.num_warps}"
                f"{'-lengths' if self.lengths else ''}")


ALL_CASES = [Case(kernel, precision, arch, block_b, warps, lengths) for lengths in (False, True) for kernel in KERNELS
             for precision, _, _ in PRECISIONS for arch in ARCHITECTURES for block_b, warps in TILES]
# What CI compiles (about 1.5 s each): every kernel in every precision for the H100, at one tile, with lengths
# (the superset of the code).
CASES = [case for case in ALL_CASES
         if case.arch == 90 and (case.block_b, case.num_warps) == CI_TILE and case.lengths]


def _compile_case(case: Case) -> Dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rnn_fast.ops.lstm import triton as triton_backend
    from rnn_fast.ops.lstm.precision import state_dtype

    _, dtype_name, allow_tf32 = next(p for p in PRECISIONS if p[0] == case.precision)
    dtype = getattr(torch, dtype_name)
    state = state_dtype(dtype)
    # The forward multiplies TF32 as fp16 weights with row scales (rnn_fast/ops/lstm/triton.py's module doc).
    forward_weights = torch.float16 if allow_tf32 else dtype
    weights = dtype if case.kernel == "backward" else forward_weights
    plan = triton_backend.kernel_plan(HIDDEN, weights, torch.device("cpu"))
    if case.kernel != "backward":
        kernel = triton_backend._lstm_forward_kernel
        saved = state if case.kernel == "forward" else None
        pointers = {"p_xw": dtype, "p_w": weights, "p_w_scale": torch.float32 if allow_tf32 else None,
                    "p_h0": dtype, "p_c0": dtype, "p_lengths": torch.int64, "p_y": dtype, "p_h_n": dtype,
                    "p_c_n": dtype, "p_gates": saved, "p_cell": saved}
        constants = {"HAS_LENGTHS": case.lengths, "HAS_W_SCALE": allow_tf32, "STORE_SAVED": saved is not None}
    else:
        kernel = triton_backend._lstm_backward_kernel
        pointers = {"p_grad_y": dtype, "p_grad_h_n": dtype, "p_grad_c_n": dtype, "p_w": dtype, "p_c0": dtype,
                    "p_gates": state, "p_cell": state, "p_lengths": torch.int64, "p_grad_xw": dtype,
                    "p_grad_h0": dtype, "p_grad_c0": dtype}
        constants = {"HAS_LENGTHS": case.lengths,
                     "INPUT_PRECISION": triton_backend._backward_precision(dtype, allow_tf32)}
    constants.update(BLOCK_H=plan.block_h, BLOCK_K=plan.block_k, BLOCK_B=case.block_b, RESIDENT=plan.resident)
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # under @autotune and @heuristics
        kernel = kernel.fn
    signature, constexprs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in pointers and pointers[name] is not None:
            signature[name] = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                                     torch.float64: "fp64", torch.int64: "i64"}[pointers[name]]
        elif name in pointers:
            signature[name], constexprs[(index,)] = "constexpr", None
        elif name in constants:
            signature[name], constexprs[(index,)] = "constexpr", constants[name]
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", case.arch, 32),
                              options={"num_warps": case.num_warps, "num_stages": 1})
    return {"case": str(case), "triton": triton.__version__, "resident": plan.resident, "block_k": plan.block_k,
            "shared_bytes": compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"])}


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                                check=True).stdout
    fields = dict(item.split(":") for item in report.split("Function", 1)[1].split()[1:] if ":" in item)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}


def compile_cases(cases: List[Case]) -> List[Dict]:
    """One record per case: the plan, shared memory, registers and stack, or the compiler's error."""
    records = []
    for case in cases:
        try:
            records.append(_compile_case(case))
        except Exception as error:  # reported per case; the test names the failing ones
            records.append({"case": str(case), "error": f"{type(error).__name__}: {error}"[-4000:]})
    return records


def run_in_subprocess(cases: List[Case], timeout: float = 900, triton_folder: Optional[str] = None) -> List[Dict]:
    """``compile_cases`` in a fresh process, with the triton found first in ``triton_folder`` if given."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    folders = [triton_folder] if triton_folder else []
    env["PYTHONPATH"] = os.pathsep.join(folders + [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, __file__, "--json", *map(str, cases)], env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the compile process failed:\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: List[str]) -> None:
    names = [arg for arg in argv if not arg.startswith("--")]
    cases = [case for case in ALL_CASES if str(case) in names] if names else ALL_CASES if "--all" in argv else CASES
    if "--sm90" in argv:
        cases = [case for case in cases if case.arch == 90]
    if "--lengths" in argv:
        cases = [case for case in cases if case.lengths]
    records = compile_cases(cases)
    if "--json" in argv:
        print(json.dumps(records))
        return
    import triton

    print(f"Triton {triton.__version__}\n")
    print("| case | weights on chip | registers | stack (B) | shared memory (KiB) |\n|---|---|---|---|---|")
    for record in records:
        if "error" in record:
            print(f"| {record['case']} | compile error: {record['error'].splitlines()[0]} | | | |")
        else:
            print(f"| {record['case']} | {'yes' if record['resident'] else 'no'} | {record['registers']} | "
                  f"{record['stack_bytes']} | {record['shared_bytes'] / 1024:.0f} |")
    print()
    print(spill_summary(cases, records))


def spill_summary(cases: List[Case], records: List[Dict]) -> str:
    """Per pass, precision and architecture: the tiles that compile without stack, else the one with least."""
    groups: Dict[tuple, List[tuple]] = {}
    for case, record in zip(cases, records):
        if "error" not in record:
            groups.setdefault((case.kernel, case.precision, case.arch, case.lengths), []).append((case, record))
    lines = ["| pass | precision | arch | lengths | tiles without spills (rows x warps: registers) | "
             "least stack otherwise |", "|---|---|---|---|---|---|"]
    for (kernel, precision, arch, lengths), entries in groups.items():
        clean = [f"{case.block_b}x{case.num_warps}: {record['registers']}" for case, record in entries
                 if record["stack_bytes"] == 0]
        case, record = min(entries, key=lambda entry: entry[1]["stack_bytes"])
        least = "-" if clean else f"{case.block_b}x{case.num_warps}: {record['registers']} + {record['stack_bytes']} B"
        lines.append(f"| {kernel} | {precision} | sm_{arch} | {'yes' if lengths else 'no'} | "
                     f"{', '.join(clean) or 'none'} | {least} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main(sys.argv[1:])
