#!/usr/bin/env bash
# The test command (README.md's second command; .ci/run calls it). Sets up .venv, installs the
# project with its dev extras, and runs the whole suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" dev
# Test-only packages installed WITHOUT their dependencies (e.g. SGLang's schema module: its full
# install would pin a CUDA torch). Pinned, one per line; pip skips what is already satisfied.
NODEPS="$(grep -vE '^[[:space:]]*(#|$)' launch/requirements-test-nodeps.txt || true)"
if [ -n "$NODEPS" ]; then
  # shellcheck disable=SC2086
  python -m pip install -q --no-deps $NODEPS
fi
# -m "not extended": the miniature runs of the shipped configs CI leaves out (README, "Two commands");
# a later -m in "$@" replaces it (bash launch/test.sh -m extended runs them).
python -m pytest tests -m "not extended" --durations=30 "$@"
