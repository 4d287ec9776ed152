"""Every CUDA source of csrc/cuda compiles with this machine's nvcc for sm_80 and sm_90a, with CUDA headers only
(no torch), and its recurrent kernels do not spill registers. The torch binding (csrc/cuda/*.cpp) compiles
against this torch's headers, as a CUDA build of the extension would compile it. Needs nvcc, not a GPU.

``python tests/test_cuda_compile.py`` prints the per-kernel register / shared-memory / spill table of
csrc/cuda/README.md (shared memory from the launch planner at the classifier's hidden size, through the CPU
emulation's driver).
"""
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
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
                       dependencies.read_text() if dependencies.exists() else "")


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


def _tiles(kernel: str) -> str:
    match = re.search(r", (\d+)>\(", kernel)
    return match.group(1) if match else "-"


def _planned_shared_bytes(hidden: int, folder: Path) -> Dict[Tuple[str, str, str], str]:
    """(source stem, architecture, tiles) -> dynamic shared memory per CTA that the planner picks at `hidden`."""
    from test_cuda_emulation import build_emulator  # this file runs as a script from tests/

    binary = build_emulator(folder)
    planned = {}
    for source in SOURCES:
        direction, _, precision = source.stem.partition("_")[2].partition("_")
        for architecture, major in (("sm_80", 8), ("sm_90a", 9)):
            for tiles in ("1", "2"):
                result = subprocess.run([str(binary), precision, direction, tiles, str(major), "-", "2", "100",
                                         "768", str(hidden), "0"], capture_output=True, text=True)
                match = re.search(r"cluster=(\d+) .*shared_bytes=(\d+)", result.stdout)
                planned[source.stem, architecture, tiles] = (
                    f"{int(match.group(2)) / 1024:.1f} KiB, cluster of {match.group(1)}" if match else "not launched")
    return planned


def markdown_table(hidden: int = 128) -> str:
    folder = Path(tempfile.mkdtemp())
    compilations = compile_all(shutil.which("nvcc"), folder)
    planned = _planned_shared_bytes(hidden, folder)
    lines = [f"| source | kernel, batch tile | arch | registers | spill stores / loads (B) | "
             f"dynamic shared memory per CTA at H={hidden} (planner) |",
             "|---|---|---|---|---|---|"]
    for source, architecture in ((source.name, architecture) for source in SOURCES for architecture in ARCHITECTURES):
        for report in kernel_reports(source, architecture, compilations[source]):
            if "lstm_" not in report.kernel:
                continue
            tiles = _tiles(report.kernel)
            kind = "forward" if "forward_kernel" in report.kernel else "backward"
            lines.append(f"| {source} | {kind}, {16 * int(tiles)} rows | {architecture} | {report.registers} | "
                         f"{report.spill_stores} / {report.spill_loads} | "
                         f"{planned.get((Path(source).stem, architecture, tiles), '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
