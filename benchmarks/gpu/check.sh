#!/usr/bin/env bash
# The one-command GPU check (~8 minutes on one H100 or H200): install the carried wheels, build the
# CUDA extension, run tests/gpu, the kernel benchmark and a bf16 train step of a ~0.5B Qwen2.
#
# Here (with network), once:   bash benchmarks/gpu/fetch_wheels.sh     # -> benchmarks/gpu/wheels/
# On the GPU machine (no network), from the repository root, carrying benchmarks/gpu/wheels:
#                              bash benchmarks/gpu/check.sh
# With this workplace's device tool:
#   run(command="bash benchmarks/gpu/check.sh", carry=["benchmarks/gpu/wheels"], timeout_s=600)
#
# Expects the device image (/work/.library/device/KINDS.md): python3 3.12 with torch (CUDA), triton,
# transformers, pytest, pytest-timeout, nvcc, ninja. Brings megatron-core 0.16.1 and math-verify
# (+ its parser) as wheels; no sglang, no Transformer Engine (their tests skip).
#
# Stages, each under its own time limit (seconds, env): 1 wheels; 2 build (BUILD_S=150):
# `setup.py build_ext --inplace`, sm_80 + sm_90, MAX_JOBS=nproc; 3 tests (TESTS_S=150): tests/gpu
# plus the CPU op tests against the CUDA build; 4 kernels (KERNELS_S=140): benchmarks/kernels.py
# --device cuda at V/tp 19,008 and 152,064 against eager torch and megatron's fused cross entropy
# (no torch.compile of the twins: its compile time does not fit; megatron's own helpers are
# torch.compile'd, and the warm-up absorbs that); 5 train (TRAIN_S=130):
# benchmarks/gpu/train_step.py. A failed stage is recorded and the next one still runs (a failed
# build skips the stages that need it).
# Writes, with the device named in each: benchmarks/results/{check_cuda.txt, extension_build_cuda.txt,
# tests_gpu_cuda.txt, kernels_cuda.csv, train_step_cuda.json}; copies them into $OUT (when set) after
# every stage, so that a cut-off run still returns what it measured.
# Exit status: the number of failed stages. Without CUDA it dry-runs (stages 1 and 3: every GPU
# test skips; 2, 4, 5 are reported as skipped), e.g.
#   PYTHON=.venv/bin/python POPO_CHECK_RESULTS=/tmp/check_dry bash benchmarks/gpu/check.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
RES="${POPO_CHECK_RESULTS:-$ROOT/benchmarks/results}"   # a dry run can write elsewhere
WHEELS="$ROOT/benchmarks/gpu/wheels"
SITE="${POPO_CHECK_SITE:-/tmp/popo_check_site}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RES"
SUMMARY="$RES/check_cuda.txt"
FAILED=0
: > "$SUMMARY"
say() { echo "[check $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }
publish() {  # copy the results so far into $OUT (the device tool returns it): a later stage may be cut off
  [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  for f in check_cuda.txt extension_build_cuda.txt tests_gpu_cuda.txt kernels_cuda.csv train_step_cuda.json; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"
  done
  return 0
}
stage() {  # stage NAME LIMIT_S LOGFILE CMD...: run CMD under a time limit, tee its output, record the outcome
  local name="$1" limit="$2" log="$3"; shift 3
  local t0=$SECONDS rc
  say "$name: start (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then say "$name: ok in $((SECONDS - t0))s"
  else say "$name: FAILED (exit $rc$([ "$rc" = 124 ] && echo ', time limit')) after $((SECONDS - t0))s"; FAILED=$((FAILED + 1)); fi
  publish
  return "$rc"
}

HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
say "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (dry run)")' 2>&1)"
say "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'), nvcc: $( (nvcc --version 2>/dev/null || echo none) | tail -1), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/  nvidia-smi: /' | tee -a "$SUMMARY"

# 1. wheels: into a private target directory (the image's site-packages stay untouched)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  stage wheels 120 "$RES/.wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --only-binary=:all: --python-version 3.12 --target "$SITE" "$WHEELS"/*.whl
else
  say "wheels: FAILED: no wheels in $WHEELS (run benchmarks/gpu/fetch_wheels.sh where there is network, and carry that folder)"
  FAILED=$((FAILED + 1))
fi
if [ "$HAS_CUDA" = 1 ]; then
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else  # dry run: the wheels are for Python 3.12; this environment keeps its own packages
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  say "dry run: the carried wheels were installed into $SITE but are not put on PYTHONPATH here"
fi
"$PY" -c 'import megatron.core, math_verify; print("megatron-core", megatron.core.__version__)' 2>&1 | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"

# 2. the CUDA extension, built in place (popo_mega/_C.cpython-312-*.so) as setup.py builds it
BUILT=0
if [ "$HAS_CUDA" = 1 ]; then
  rm -f popo_mega/_C.cpython-312-*.so
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  if stage build "${BUILD_S:-150}" "$RES/extension_build_cuda.txt" \
       "$PY" setup.py build_ext --inplace; then
    "$PY" -c 'import torch, popo_mega.ops._extension as e; assert e.load(), e._state["error"]; assert e.has_kernel("logprob_entropy_stats", torch.device("cuda")), "no CUDA kernels in the build"; print("popo_mega._C loaded with CUDA kernels")' 2>&1 | tail -1 | tee -a "$SUMMARY" \
      && BUILT=1
    echo "  compiler warnings: $(grep -ciE '\bwarning\b' "$RES/extension_build_cuda.txt")" | tee -a "$SUMMARY"
  fi
else
  say "build: skipped (no CUDA device)"
fi

# 3. tests: tests/gpu (CUDA kernels, padded vocabularies, 8,192 x 152k, opcheck, model parity, TE
#    spec if TE were there) and the CPU op tests, which run the CPU kernels of this same build
if [ "$HAS_CUDA" = 1 ] && [ "$BUILT" = 0 ]; then
  say "tests: skipped (the extension did not build)"; FAILED=$((FAILED + 1))
else
  stage tests "${TESTS_S:-150}" "$RES/tests_gpu_cuda.txt" \
    "$PY" -m pytest tests/gpu tests/unit/test_ops_logprob_entropy.py tests/unit/test_ops_clipped_surrogate.py \
    tests/unit/test_ops_similarity.py -q -rs --timeout=140
fi

# 4. kernel benchmark (eager twin, naive fp32, megatron fused cross entropy, extension; fwd + bwd)
if [ "$BUILT" = 1 ]; then
  stage kernels "${KERNELS_S:-140}" "$RES/.kernels.log" \
    "$PY" benchmarks/kernels.py --device cuda --no-compile --vocab 19008,152064 --out "$RES/kernels_cuda.csv"
else
  say "kernels: skipped ($([ "$HAS_CUDA" = 1 ] && echo 'no build' || echo 'no CUDA device'))"
fi

# 5. bf16 train step of a ~0.5B Qwen2 at TP=1 with the embedded rollout server
if [ "$BUILT" = 1 ]; then
  stage train "${TRAIN_S:-130}" "$RES/.train_step.log" "$PY" benchmarks/gpu/train_step.py --out "$RES/train_step_cuda.json"
else
  say "train: skipped ($([ "$HAS_CUDA" = 1 ] && echo 'no build' || echo 'no CUDA device'))"
fi

say "done: $FAILED failed stage(s)"
publish
exit "$FAILED"
