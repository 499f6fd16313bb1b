#!/usr/bin/env bash
# Build the COMPLETE popo_mega._C CUDA extension (CPU kernels, CUDA kernels, torch bindings) exactly
# as setup.py builds it, on a machine without a GPU, and check that the library loads and registers
# a CUDA kernel for every op. Writes the build log (date, versions, wall time, warnings) to
# benchmarks/results/cuda_build_log.txt.
#
#   python3 -m venv /work/venv-cuda && /work/venv-cuda/bin/pip install torch==2.14.1   # a CUDA torch
#   MAX_JOBS=2 bash benchmarks/gpu/compile_check.sh /work/venv-cuda/bin/python
#
# Arguments: [PYTHON] an interpreter whose torch has CUDA (torch.version.cuda set; no GPU needed),
# default $POPO_CUDA_PYTHON or /work/venv-cuda/bin/python. Needs nvcc (CUDA_HOME or on PATH) and a
# C++ compiler. The build goes to a temporary directory, never over the in-place popo_mega/_C*.so
# (which is the CPU build the tests load). Exit status: 0 when the build and the load check pass.
# Environment: MAX_JOBS (default 2: nvcc is heavy), LOG (default benchmarks/results/cuda_build_log.txt),
# KEEP_BUILD=1 keeps the build directory (its path is logged).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${1:-${POPO_CUDA_PYTHON:-/work/venv-cuda/bin/python}}"
LOG="${LOG:-$ROOT/benchmarks/results/cuda_build_log.txt}"
export MAX_JOBS="${MAX_JOBS:-2}"

die() { echo "compile_check.sh: $*" >&2; exit 2; }
[ -x "$PY" ] || die "no Python interpreter at $PY (give one whose torch has CUDA as the first argument)"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null \
  || die "$PY has no CUDA torch (torch.version.cuda is None or torch is missing)"
# torch takes CUDA_HOME from `which nvcc` when unset; a wrapper such as /usr/local/bin/nvcc then
# gives /usr/local, which has no CUDA headers: prefer the toolkit directory itself.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then export CUDA_HOME=/usr/local/cuda; fi
NVCC="$("$PY" -c 'import os; from torch.utils.cpp_extension import CUDA_HOME as h; print(os.path.join(h, "bin", "nvcc") if h else "")')"
[ -n "$NVCC" ] && [ -x "$NVCC" ] || die "nvcc not found: set CUDA_HOME or put nvcc on PATH"
CUDA_INC="$(dirname "$(dirname "$NVCC")")/include"
[ -f "$CUDA_INC/cuda_runtime_api.h" ] || die "no CUDA headers in $CUDA_INC: set CUDA_HOME to the CUDA toolkit"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/popo_cuda_build.XXXXXX")"
[ "${KEEP_BUILD:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$LOG")"
{
  echo "# popo_mega._C CUDA extension: full build + load check without a GPU (benchmarks/gpu/compile_check.sh)"
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm), $(nproc) CPUs, MAX_JOBS=$MAX_JOBS"
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY)"
  echo "torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
  echo "nvcc: $("$NVCC" --version | tail -1) ($NVCC)"
  echo "c++: $(${CXX:-c++} --version | head -1)"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- csrc setup.py 2>/dev/null || echo ' (csrc/ or setup.py modified)')"
  echo "build dir: $WORK"
  echo "command: $PY setup.py build_ext --build-lib $WORK/lib --build-temp $WORK/tmp"
  echo "----- build output -----"
} > "$LOG"

# setuptools' own deprecation notices are not compiler diagnostics
NOT_COMPILER='SetuptoolsDeprecationWarning|BuildBackendWarning|UserWarning|setuptools|easy_install|!!'
START=$(date +%s)
# setup.py picks a CUDAExtension because this torch has CUDA and nvcc is found. A copy of the
# sources keeps build artefacts (popo_mega.egg-info, build/) out of the working tree.
mkdir -p "$WORK/src"
cp -r "$ROOT/setup.py" "$ROOT/README.md" "$ROOT/csrc" "$ROOT/popo_mega" "$WORK/src/" 2>/dev/null
rm -f "$WORK"/src/popo_mega/_C*.so
(cd "$WORK/src" && "$PY" setup.py build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp") >> "$LOG" 2>&1
BUILD_RC=$?
END=$(date +%s)

SO="$(ls "$WORK"/lib/popo_mega/_C*.so 2>/dev/null | head -1)"
{
  echo "----- summary -----"
  echo "build exit status: $BUILD_RC"
  echo "wall time: $((END - START)) s"
  # compiler diagnostics only (not setuptools' own deprecation chatter)
  warnings_of() { sed -n '/^----- build output -----$/,$p' "$LOG" | grep -iE '\bwarning\b' | grep -v -E "$NOT_COMPILER"; }
  echo "compiler warnings: $(warnings_of | wc -l)"
  warnings_of | sed 's/^/  /' | head -50
  echo "compiled objects: $(find "$WORK/tmp" -name '*.o' 2>/dev/null | wc -l)"
  [ -n "$SO" ] && echo "library: $(basename "$SO"), $(du -k "$SO" | cut -f1) KiB"
} >> "$LOG"

LOAD_RC=1
if [ "$BUILD_RC" = 0 ] && [ -n "$SO" ]; then
  # Load the library into the CUDA torch (no GPU needed) and ask the dispatcher for every op's
  # CPU and CUDA kernels: an unresolved symbol or a missing registration fails here.
  "$PY" - "$SO" >> "$LOG" 2>&1 <<'EOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
ops = ["logprob_entropy_stats", "logprob_entropy_grad", "clipped_surrogate", "clipped_surrogate_grad",
       "masked_mean_pool", "masked_mean_pool_grad", "cosine_penalty", "cosine_penalty_grad"]
missing = [f"{op}:{key}" for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"popo_mega::{op}", key)]
print("load check:", "every op has CPU and CUDA kernels" if not missing else f"MISSING {missing}")
print("schema:", torch.ops.popo_mega.logprob_entropy_stats.default._schema)
sys.exit(1 if missing else 0)
EOF
  LOAD_RC=$?
fi
echo "load check exit status: $LOAD_RC" >> "$LOG"
tail -n 25 "$LOG"
[ "$BUILD_RC" = 0 ] && [ "$LOAD_RC" = 0 ]
