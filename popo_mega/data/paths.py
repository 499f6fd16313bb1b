"""Where the shared math data lives: ``<repo root>/../shared/data/math`` (read-only copies; see its
PROVENANCE.md). Callers may pass their own directory instead (``data_dir=`` / ``--data-dir``)."""

from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shared_math_dir(data_dir: str | None = None) -> str:
    """The math data directory: ``data_dir`` when given, else ``<repo root>/../shared/data/math``.

    Raises FileNotFoundError naming the path that was looked for and how to point elsewhere.
    """
    path = os.path.abspath(data_dir) if data_dir else os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "math"))
    if not os.path.isdir(path):
        how = "" if data_dir else " (the default: <repo root>/../shared/data/math)"
        raise FileNotFoundError(
            f"math data directory not found: {path}{how}. Copy the benchmark files there "
            "(aime2025.jsonl, math500.jsonl, ...; see PROVENANCE.md) or pass --data-dir / data_dir=.")
    return path
