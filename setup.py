"""Install popo_mega, its console scripts and (when a compiler is present) the csrc/ extension.

Always install with ``pip install --no-build-isolation -e .`` (launch/quickstart.sh and
launch/test.sh do): an isolated build environment would fetch a second, CUDA torch to compile
against. The extension is optional: when it cannot be built, ``popo_mega.ops`` falls back to the
pure-PyTorch reference twins with one warning that names the build command.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    """``popo_mega._C``: a CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension.

    Skipped (returning no modules) when torch is not importable at build time, when no C++
    compiler is on PATH, or when POPO_MEGA_NO_EXTENSION=1 is set by a build script.
    """
    if os.environ.get("POPO_MEGA_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("popo_mega: torch is not importable at build time; skipping the csrc/ extension", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("popo_mega: no C++ compiler found; skipping the csrc/ extension", file=sys.stderr)
        return [], {}

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    cpp_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    if not cpp_sources:
        return [], {}
    # -fno-trapping-math lets GCC if-convert (and so vectorise) the clamps/selects of the CPU
    # kernels' loops; nothing here relies on floating-point traps. No -std flag: BuildExtension adds
    # the one torch's headers need (C++20; torch 2.14's use `requires`, so -std=c++17 fails there).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    define_macros = []
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        define_macros.append(("POPO_WITH_CUDA", None))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo",
                      "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = cpp_extension.CUDAExtension(
            "popo_mega._C", cpp_sources + cuda_sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "popo_mega._C", cpp_sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="popo_mega",
    version="0.1.0",
    description="Megatron-scale training backend for POPO (Positive-Only Policy Optimization)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["popo_mega", "popo_mega.*"]),
    package_data={"popo_mega": ["assets/*", "assets/**/*"]},
    install_requires=[
        "megatron-core>=0.16.1",
        "torch",
        "transformers>=5.24,<5.25",  # the quickstart's base (docs/results.md) depends on its init
        "safetensors",
        "math-verify",
        "pyyaml",
        "psutil",
        "tensorboard",
        "numpy",
        "matplotlib",
        "requests",
        "fastapi>=0.100",   # the embedded rollout server's HTTP side (pydantic v2 request models)
        "uvicorn>=0.24",    # ... served by uvicorn (timeout_graceful_shutdown)
        "pydantic>=2.0",
    ],
    extras_require={
        "sglang": ["sglang", "sglang-router"],
        "te": ["transformer-engine[pytorch]"],
        "dev": ["pytest", "pytest-timeout", "ninja", "pyarrow", "hypothesis>=6.0"],
    },
    entry_points={
        "console_scripts": [
            "popo-eval=popo_mega.cli:eval_main",
            "popo-convert=popo_mega.cli:convert_main",
            "popo-rollout-server=popo_mega.cli:rollout_server_main",
            "popo-report=popo_mega.cli:report_main",
            "popo-plan=popo_mega.cli:plan_main",
            "popo-train=popo_mega.cli:train_main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
