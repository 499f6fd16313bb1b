#!/usr/bin/env bash
# README's first command: set up .venv (torch 2.13.0 CPU first when no torch is importable), install
# popo_mega, and run the main job on the CPU with the embedded defaults. Extra arguments go to the job.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" ""  # no extras (a bare source would pass this script's arguments on)
python -m popo_mega.quickstart "$@"
