# Shared set-up for launch/quickstart.sh and launch/test.sh (sourced, not run).
# Creates .venv if missing, installs torch 2.13.0 first when no torch is importable (an unpinned
# torch would pull GBs of CUDA wheels), then installs this project without build isolation so that
# nothing replaces the torch already there. Re-installs only when setup.py or csrc/ changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${1:-}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch importable: installing torch==2.13.0 first"
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q torch==2.13.0
fi
STAMP_SRC="$(cat setup.py; echo "$EXTRAS"; find csrc -type f | sort | xargs cat 2>/dev/null)"
STAMP="$(printf '%s' "$STAMP_SRC" | sha256sum | cut -d' ' -f1)"
if [ "$(cat .venv/.popo_mega_stamp 2>/dev/null || true)" != "$STAMP" ] || ! python -c "import popo_mega" >/dev/null 2>&1; then
  echo "[setup] installing popo_mega${EXTRAS:+[$EXTRAS]} (and building csrc/ when a compiler is present)"
  python -m pip install -q setuptools wheel
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
  echo "$STAMP" > .venv/.popo_mega_stamp
fi
