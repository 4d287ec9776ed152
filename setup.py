"""Builds ``rnn_fast._C``: the fused C++ CPU recurrence always, the CUDA kernels when nvcc and a CUDA torch exist.

Switches (flash-attention style):
    RNN_FAST_SKIP_CUDA_BUILD=1   never build the CUDA sources
    RNN_FAST_CUDA_ARCHS="80;90"  SM architectures to build for (90 builds sm_90a)
    MAX_JOBS                     parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import warnings

from setuptools import setup
import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _cuda_build_wanted() -> bool:
    if os.environ.get("RNN_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return False
    # A build box may have no GPU, so ask for a CUDA toolchain and a CUDA torch, not for a device.
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None:
        return False
    if not nvcc or not os.path.exists(nvcc):
        warnings.warn("rnn_fast: nvcc not found; building without the CUDA backend")
        return False
    return True


def _gencode_flags():
    flags = []
    for arch in os.environ.get("RNN_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        # sm_90a unlocks Hopper-only instructions; it still runs on every sm_90 part.
        code = f"{arch}a" if arch == "90" else arch
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
    return flags


def _openmp_flags():
    return ["-fopenmp"] if os.name != "nt" else ["/openmp"]


def extensions():
    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17"] + _openmp_flags()
    link_flags = _openmp_flags()
    if not _cuda_build_wanted():
        return [CppExtension("rnn_fast._C", cpu_sources,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"] + _gencode_flags()
    return [CUDAExtension("rnn_fast._C", cpu_sources + cuda_sources,
                          define_macros=[("RNN_FAST_WITH_CUDA", None)],
                          extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
