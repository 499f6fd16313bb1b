"""popo-convert run as a user runs it, and a directory of safetensors read back, for round-trip tests."""

import glob
import os
import subprocess
import sys

from safetensors.torch import load_file


def convert_cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m popo_mega.model.convert_cli *args`` in a subprocess (output captured as text)."""
    return subprocess.run([sys.executable, "-m", "popo_mega.model.convert_cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def load_safetensors_dir(path: str) -> dict:
    """Every tensor of every ``*.safetensors`` file in ``path``, by name."""
    tensors = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors
