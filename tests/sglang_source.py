"""SGLang 0.5.23's own source files, read without importing the sglang package (its full dependency
set is not installed on CPU machines). CI installs sglang with ``--no-deps`` from
launch/requirements-test-nodeps.txt; without it, the tests that need these files are skipped."""

import functools
import importlib.util
import os

import pytest

INSTALL = "pip install --no-deps -r launch/requirements-test-nodeps.txt"


def sglang_dir() -> str:
    """The installed sglang package's directory (found without running its ``__init__``)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"SGLang's schema module is not installed ({INSTALL})")
    return list(spec.submodule_search_locations)[0]


@functools.cache
def _load_api_types(path: str):
    spec = importlib.util.spec_from_file_location("sglang_api_types_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sglang_api_types():
    """``sglang/api/v1/api_types.py``, the module SGLang's ``/generate`` route validates with."""
    pytest.importorskip("msgspec", reason=f"msgspec is not installed ({INSTALL})")
    path = os.path.join(sglang_dir(), "api", "v1", "api_types.py")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing: the installed sglang is not the pinned one ({INSTALL})")
    return _load_api_types(path)
