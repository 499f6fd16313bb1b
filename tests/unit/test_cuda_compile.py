"""CUDA code compiles without a GPU: nvcc on every csrc/cuda/*.cu for sm_80 and sm_90, and a
syntax check of the torch glue (csrc/cuda/cuda_bindings.cpp) against the CPU wheel's headers.

The .cu files include only CUDA headers (cuda_runtime, cuda_bf16, CUB from CCCL), so nvcc needs
nothing from torch. Skipped with a message when nvcc is missing.
"""

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")   # where to look for nvcc (test-only)
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) \
    else shutil.which("nvcc")
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]

needs_nvcc = pytest.mark.skipif(NVCC is None, reason=f"nvcc not found (looked in {CUDA_HOME}/bin and on PATH): "
                                                      "CUDA sources not compiled")


def _torch_nvcc_flags():
    """The defines torch's CUDAExtension adds to every nvcc call (so this test sees what the build sees)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
        return list(COMMON_NVCC_FLAGS)
    except ImportError:
        return []


def _nvcc(path, out_dir):
    cmd = [NVCC, "-std=c++20", "-O3", "--use_fast_math", *_torch_nvcc_flags(), *ARCH_FLAGS, "-c", path,
           "-o", os.path.join(out_dir, os.path.basename(path) + ".o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return path, proc.returncode, proc.stdout + proc.stderr


def test_there_are_cuda_sources():
    names = {os.path.basename(p) for p in CU_FILES}
    for kernel in ["logprob_entropy", "clipped_surrogate", "masked_mean_pool", "cosine_penalty"]:
        assert {f"{kernel}_fwd.cu", f"{kernel}_bwd.cu"} <= names


def test_cu_files_include_no_torch():
    for path in CU_FILES + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")):
        text = open(path).read()
        for banned in ("torch/", "ATen/", "c10/"):
            assert f"#include <{banned}" not in text, f"{path} includes {banned} (device code must be framework-free)"


@needs_nvcc
def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: _nvcc(p, str(tmp_path)), CU_FILES))
    failures = [f"{os.path.relpath(p, ROOT)} (rc={rc}):\n{out}" for p, rc, out in results if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)


@needs_nvcc
def test_cuda_glue_parses_against_torch_headers(tmp_path):
    """g++ -fsyntax-only on the torch glue. The CPU wheel lacks one generated CUDA header
    (c10/cuda/impl/cuda_cmake_macros.h), which an empty stub replaces for this check."""
    torch_include = os.path.join(os.path.dirname(__import__("torch").__file__), "include")
    if not os.path.isdir(os.path.join(torch_include, "c10", "cuda")):
        pytest.skip("this torch wheel ships no c10/cuda headers")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-w", f"-I{tmp_path}", f"-I{torch_include}",
           f"-I{os.path.join(torch_include, 'torch', 'csrc', 'api', 'include')}",
           f"-I{os.path.join(os.path.dirname(os.path.dirname(NVCC)), 'include')}",
           f"-I{sys.base_prefix}/include/python{sys.version_info.major}.{sys.version_info.minor}",
           os.path.join(ROOT, "csrc", "cuda", "cuda_bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


# The whole extension (CPU + CUDA kernels + torch bindings) built by setup.py against a CUDA torch,
# then loaded into it (no GPU needed): benchmarks/gpu/compile_check.sh. Minutes of nvcc on 2 cores,
# so it runs only when asked for, by naming that torch's interpreter:
#     POPO_CUDA_PYTHON=/work/venv-cuda/bin/python pytest tests/unit/test_cuda_compile.py -k whole
# (python3 -m venv /work/venv-cuda && /work/venv-cuda/bin/pip install torch==2.14.1 gives one).
CUDA_PYTHON = os.environ.get("POPO_CUDA_PYTHON")


@pytest.mark.slow
@needs_nvcc
@pytest.mark.skipif(not CUDA_PYTHON, reason="set POPO_CUDA_PYTHON to a Python whose torch has CUDA to build the "
                                            "whole CUDA extension (benchmarks/gpu/compile_check.sh)")
def test_whole_cuda_extension_builds_and_registers_cuda_kernels(tmp_path):
    log = tmp_path / "cuda_build_log.txt"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "compile_check.sh"), CUDA_PYTHON],
                          capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "LOG": str(log), "MAX_JOBS": os.environ.get("MAX_JOBS", "2")})
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + text[-4000:]
    assert "load check: every op has CPU and CUDA kernels" in text
