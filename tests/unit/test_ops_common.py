"""Shared helpers of the tests of popo_mega.ops (extension presence, three-way numerics check)."""

import shutil

import pytest
import torch


def require_extension():
    """Skip when no C++ compiler could have built the extension; FAIL when one could but did not."""
    from popo_mega.ops import _extension
    if _extension.load():
        return
    if shutil.which("c++") or shutil.which("g++"):
        pytest.fail(f"a C++ compiler is present but popo_mega._C is not built ({_extension._state['error']}); "
                    f"build it with: {_extension.BUILD_COMMAND}")
    pytest.skip("no C++ compiler: the extension cannot be built here")


def three_way(kernel_low, ref_low, gold, name, rtol_floor):
    """The kernel in the low dtype must be at least as close to the fp32 gold as the reference in
    the low dtype, up to a floor of ``rtol_floor * max|gold|`` (different rounding of the last bit)."""
    gold = gold.double()
    k_err = (kernel_low.double() - gold).abs().max().item() if gold.numel() else 0.0
    r_err = (ref_low.double() - gold).abs().max().item() if gold.numel() else 0.0
    floor = 1e-6 + rtol_floor * (gold.abs().max().item() if gold.numel() else 0.0)
    assert k_err <= 1.05 * r_err + floor, f"{name}: kernel error {k_err:.3g} > reference error {r_err:.3g} + {floor:.3g}"
