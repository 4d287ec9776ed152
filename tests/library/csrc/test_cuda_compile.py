"""Every CUDA source of csrc/cuda compiles with this machine's nvcc for sm_80 and sm_90a, with CUDA headers only
(no torch), and its recurrent kernels, every variant's included, do not spill registers. The variant with the
mbarrier exchange has no memory fence in its step loop, and the baseline has one (SASS, through cuobjdump). The
torch binding (csrc/cuda/*.cpp) compiles against this torch's headers, as a CUDA build of the extension would
compile it. Needs nvcc, not a GPU.

``python tests/library/csrc/test_cuda_compile.py`` prints the per-kernel register / shared-memory / spill tables of
csrc/cuda/README.md (shared memory from the launch planner at the classifier's hidden size, through the CPU
emulation's driver), and the step loop's synchronisation instructions per kernel.
"""
import bisect
import re
import runpy
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
# tools/ is not a package: run its file rather than put the folder on sys.path.
kernel_variants = runpy.run_path(str(ROOT / "tools" / "cuda_variants.py"))["kernel_variants"]

SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
RECURRENCE_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("lstm_*_*.cu"))  # one pass and precision each
BINDINGS = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
# setup.py's nvcc and host compiler flags and default architectures; one nvcc call per source builds both (one host pass).
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
HOST_FLAGS = ["-O3", "-std=c++17"]
ARCHITECTURES = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
FRAMEWORK_HEADERS = re.compile(r"/(torch|ATen|c10|pybind11)/")
# The nvcc of the build box compiles two sources at a time; the machine is shared.
WORKERS = 2


@dataclass
class Compilation:
    returncode: int
    output: str
    dependencies: str
    object: Path


@dataclass
class KernelReport:
    source: str
    architecture: str
    kernel: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    static_shared_bytes: int


def compile_source(nvcc: str, source: Path, folder: Path) -> Compilation:
    dependencies = folder / f"{source.stem}.d"
    result = subprocess.run([nvcc, *NVCC_FLAGS, *ARCHITECTURES.values(), "-MD", "-MF", str(dependencies),
                             "-c", str(source), "-o", str(folder / f"{source.stem}.o")],
                            cwd=source.parent, capture_output=True, text=True, timeout=600)
    return Compilation(result.returncode, result.stdout + result.stderr,
                       dependencies.read_text() if dependencies.exists() else "", folder / f"{source.stem}.o")


def compile_all(nvcc: str, folder: Path) -> Dict[str, Compilation]:
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return dict(zip((source.name for source in SOURCES),
                        pool.map(lambda source: compile_source(nvcc, source, folder), SOURCES)))


def _demangle(names: List[str]) -> List[str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    return subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


def kernel_reports(source: str, architecture: str, compilation: Compilation) -> List[KernelReport]:
    """ptxas -v's resource lines for `architecture`, one report per entry function."""
    blocks = re.findall(rf"Compiling entry function '(\w+)' for '{architecture}'\n(.*?)(?=ptxas info    : Compiling|"
                        r"ptxas info    : \d+ bytes gmem|\Z)", compilation.output, flags=re.S)
    names = _demangle([name for name, _ in blocks])
    reports = []
    for name, (_, text) in zip(names, blocks):
        spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
        registers = re.search(r"Used (\d+) registers", text)
        shared = re.search(r"(\d+) bytes smem", text)
        reports.append(KernelReport(source, architecture, name, int(registers.group(1)), int(spills.group(1)),
                                    int(spills.group(2)), int(spills.group(3)), int(shared.group(1)) if shared else 0))
    return reports


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Dict[str, Compilation]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    return compile_all(nvcc, tmp_path_factory.mktemp("cuda_objects"))


def _params():
    return [pytest.param(source.name, architecture, id=f"{source.stem}-{architecture}")
            for source in SOURCES for architecture in ARCHITECTURES]


@pytest.mark.parametrize("source, architecture", _params())
def test_compiles_with_cuda_headers_only(compiled, source, architecture):
    compilation = compiled[source]
    assert compilation.returncode == 0, compilation.output
    assert f"for '{architecture}'" in compilation.output, f"ptxas did not compile {source} for {architecture}"
    assert compilation.dependencies, "nvcc wrote no dependency list"
    framework = [line for line in compilation.dependencies.split() if FRAMEWORK_HEADERS.search(line)]
    assert not framework, f"{source} includes framework headers: {framework}"


@pytest.mark.parametrize("source, architecture", _params())
def test_kernels_do_not_spill(compiled, source, architecture):
    compilation = compiled[source]
    assert compilation.returncode == 0, compilation.output
    reports = kernel_reports(source, architecture, compilation)
    assert reports, f"ptxas reported no entry function for {source}"
    spilling = [report for report in reports if report.spill_stores or report.spill_loads or report.stack_bytes]
    assert not spilling, "\n".join(f"{r.kernel}: {r.stack_bytes} B stack, {r.spill_stores} B spill stores, "
                                   f"{r.spill_loads} B spill loads" for r in spilling)


def cuda_include_dirs(nvcc: str) -> List[str]:
    """The include directories nvcc itself passes to the host compiler."""
    result = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "-", "-o", "-"], input="", capture_output=True,
                            text=True)
    return re.findall(r"-I(\S+?)\"", "\n".join(re.findall(r'INCLUDES="[^\n]*', result.stdout + result.stderr)))


@pytest.mark.parametrize("binding", BINDINGS, ids=lambda path: path.name)
def test_binding_compiles_against_torch_headers(binding, tmp_path):
    from torch.utils.cpp_extension import include_paths

    nvcc, compiler = shutil.which("nvcc"), shutil.which("c++")
    if nvcc is None or compiler is None:
        pytest.skip("needs nvcc (for the CUDA runtime headers) and a host C++ compiler")
    cuda_includes = cuda_include_dirs(nvcc)
    assert cuda_includes, "nvcc --dryrun named no include directory"
    # CPU wheels ship c10/cuda's headers but not this one, which CMake writes for CUDA builds.
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*include_paths(), str(tmp_path), *cuda_includes]
    result = subprocess.run([compiler, *HOST_FLAGS, "-fsyntax-only", "-DRNN_FAST_WITH_CUDA",
                             *(f"-I{path}" for path in includes), str(binding)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]


VARIANT_NAMES = kernel_variants()  # by bit
KERNEL_NAME = re.compile(r"lstm_(forward|backward)_kernel<\(rnn_fast::cuda::Precision\)(\d), (\d+)u, (\d)(, (true|false))?>")
MANGLED_KERNEL = re.compile(r"lstm_(forward|backward)_kernelILNS0_9PrecisionE(\d)ELj(\d+)ELi(\d)E(Lb(\d)E)?")


@dataclass
class Kernel:
    """What a recurrence kernel's template arguments say: pass, variant set, batch tile (m-tiles)."""
    kind: str  # forward, inference, backward
    variants: int
    tiles: int

    @classmethod
    def parse(cls, name: str):
        """From a demangled or a mangled name; None for anything that is not a recurrence kernel."""
        match = KERNEL_NAME.search(name) or MANGLED_KERNEL.search(name)
        if match is None:
            return None
        direction, _, variants, tiles, _, saves = match.groups()
        kind = "backward" if direction == "backward" else ("forward" if saves in ("true", "1") else "inference")
        return cls(kind, int(variants), int(tiles))

    @property
    def variant_names(self) -> str:
        return ", ".join(name for bit, name in enumerate(VARIANT_NAMES) if self.variants >> bit & 1) or "baseline"


def _planned_shared_bytes(binary: Path, source: Path, major: int, kernel: Kernel, hidden: int) -> str:
    """The dynamic shared memory per CTA the planner gives `kernel` at `hidden` (B=768, bi)."""
    precision = source.stem.split("_")[-1]
    names = ",".join(name for bit, name in enumerate(VARIANT_NAMES) if kernel.variants >> bit & 1) or "-"
    result = subprocess.run([str(binary), precision, kernel.kind, str(kernel.tiles), str(major), "-", "2", "100",
                             "768", str(hidden), "0", names], capture_output=True, text=True)
    match = re.search(r"cluster=(\d+) .*shared_bytes=(\d+) ring_slots=(\d+)", result.stdout)
    if match is None:
        return "not launched"
    ring = f", {match.group(3)} input slots" if int(match.group(3)) else ""
    return f"{int(match.group(2)) / 1024:.1f} KiB, cluster of {match.group(1)}{ring}"


def markdown_tables(hidden: int = 128) -> str:
    """The baseline kernels on both architectures, then every variant kernel on sm_90a (the only one they are
    compiled for)."""
    from test_cuda_emulation import build_emulator  # this folder is on sys.path, as a script or under pytest

    folder = Path(tempfile.mkdtemp())
    compilations = compile_all(shutil.which("nvcc"), folder)
    binary = build_emulator(folder)
    header = ["| source | kernel, batch tile | variants | arch | registers | spill stores / loads (B) | "
              f"dynamic shared memory per CTA at H={hidden} (planner) |", "|---|---|---|---|---|---|---|"]
    baseline, variants = list(header), list(header)
    for source in SOURCES:
        for architecture, major in (("sm_80", 8), ("sm_90a", 9)):
            for report in kernel_reports(source.name, architecture, compilations[source.name]):
                kernel = Kernel.parse(report.kernel)
                if kernel is None or (kernel.variants and architecture != "sm_90a"):
                    continue
                (variants if kernel.variants else baseline).append(
                    f"| {source.name} | {kernel.kind}, {16 * kernel.tiles} rows | {kernel.variant_names} | "
                    f"{architecture} | {report.registers} | {report.spill_stores} / {report.spill_loads} | "
                    f"{_planned_shared_bytes(binary, source, major, kernel, hidden)} |")
    return "\n".join(baseline) + "\n\n" + "\n".join(variants)


# ---------------------------------------------------------------------------------------------------------
# The step loop's synchronisation in the SASS.

def _cuobjdump() -> Optional[str]:
    """cuobjdump from the CUDA toolkit, or the copy triton's wheel ships."""
    found = shutil.which("cuobjdump")
    if found is None:
        nvcc = shutil.which("nvcc")
        if nvcc and (Path(nvcc).parent / "cuobjdump").exists():
            found = str(Path(nvcc).parent / "cuobjdump")
    if found is None:
        try:
            import triton
        except ImportError:
            return None
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.exists() else None
    return found


@dataclass
class StepLoop:
    """Counts of instructions in a kernel's step loop: the outermost backward branch around the multiply."""
    instructions: int
    membar: int
    cluster_barrier: int  # UCGABAR_ARV / UCGABAR_WAIT
    async_stores: int     # STAS: st.async
    mbarrier_waits: int   # SYNCS.PHASECHK: mbarrier.try_wait
    async_copies: int     # LDGSTS: cp.async


def step_loops(cuobjdump: str, object_file: Path) -> Dict[str, StepLoop]:
    """Mangled kernel name -> its step loop's counts, from the sm_90a SASS."""
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90a", str(object_file)], capture_output=True, text=True,
                          check=True).stdout
    loops = {}
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S):
        instructions = [(int(address, 16), text.strip())
                        for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", body)]
        multiplies = [address for address, text in instructions if re.search(r"MMA|FFMA|DFMA", text)]
        widest = None
        for address, text in instructions:
            branch = re.search(r"BRA (0x[0-9a-f]+)", text)
            start = int(branch.group(1), 16) if branch else address
            first_multiply = bisect.bisect_left(multiplies, start)
            if start < address and first_multiply < len(multiplies) and multiplies[first_multiply] <= address and (
                    widest is None or address - start > widest[1] - widest[0]):
                widest = (start, address)
        loop = [text for address, text in instructions if widest and widest[0] <= address <= widest[1]]
        count = lambda pattern: sum(1 for text in loop if re.search(pattern, text))
        loops[name] = StepLoop(len(loop), count(r"\bMEMBAR"), count(r"UCGABAR"), count(r"\bSTAS\b"),
                               count(r"SYNCS\.PHASECHK"), count(r"\bLDGSTS\b"))
    return loops


# cuobjdump takes seconds per source; the inference kernels are the forward's code without its stores.
@pytest.mark.parametrize("source", [source.name for source in RECURRENCE_SOURCES if "inference" not in source.name])
def test_mbarrier_exchange_has_no_fence_in_the_step_loop(compiled, source):
    """cluster_mbarrier's step loop exchanges through st.async and one mbarrier wait, with no MEMBAR and no
    cluster barrier; the baseline's has barrier.cluster's MEMBAR.ALL.GPU and UCGABAR arrive/wait. The prefetching
    backward's loop issues cp.async (LDGSTS)."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's wheel)")
    compilation = compiled[source]
    assert compilation.returncode == 0, compilation.output
    loops = {name: loop for name, loop in step_loops(cuobjdump, compilation.object).items() if Kernel.parse(name)}
    assert loops, f"no recurrence kernel in {source}'s sm_90a SASS"
    for name, loop in loops.items():
        kernel = Kernel.parse(name)
        assert loop.instructions > 0, f"{kernel}: no step loop found"
        if kernel.variants & 1:
            assert loop.membar == 0 and loop.cluster_barrier == 0, f"{kernel}: {loop}"
            assert loop.async_stores > 0 and loop.mbarrier_waits == 1, f"{kernel}: {loop}"
        else:
            assert loop.membar >= 1 and loop.cluster_barrier == 2 and loop.async_stores == 0, f"{kernel}: {loop}"
        prefetching = kernel.kind == "backward" and kernel.variants & 16 and not (kernel.variants & 8 and kernel.tiles == 2)
        assert (loop.async_copies > 0) == bool(prefetching), f"{kernel}: {loop}"


def sass_table() -> str:
    folder = Path(tempfile.mkdtemp())
    compilations = compile_all(shutil.which("nvcc"), folder)
    lines = ["| source | kernel, batch tile | variants | step-loop instructions | MEMBAR | UCGABAR | STAS | "
             "SYNCS.PHASECHK | LDGSTS |", "|---|---|---|---|---|---|---|---|---|"]
    for source in RECURRENCE_SOURCES:
        for name, loop in step_loops(_cuobjdump(), compilations[source.name].object).items():
            kernel = Kernel.parse(name)
            if kernel is not None:
                lines.append(f"| {source.name} | {kernel.kind}, {16 * kernel.tiles} rows | {kernel.variant_names} | "
                             f"{loop.instructions} | {loop.membar} | {loop.cluster_barrier} | {loop.async_stores} | "
                             f"{loop.mbarrier_waits} | {loop.async_copies} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(sass_table() if "--sass" in sys.argv else markdown_tables())
