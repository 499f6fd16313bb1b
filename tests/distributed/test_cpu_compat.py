"""The CPU compatibility layer for megatron-core: each patch does what its docstring says.

Runs in a spawned process: the patches are process-wide and irreversible by design.
"""

import pytest
import torch

from tests.multiprocess import run_world
from tests.tiny_models import qwen2_config, save_tiny


def _compat_checks(rank, world_size, hf_dir):
    from popo_mega.runtime import cpu_compat

    checks = {}
    try:
        torch.zeros(2, device="cuda")
        checks["cuda_factory_failed_before"] = False
    except (RuntimeError, AssertionError):
        checks["cuda_factory_failed_before"] = True
    assert not cpu_compat.is_applied()
    cpu_compat.apply()
    cpu_compat.apply()  # idempotent
    checks["applied"] = cpu_compat.is_applied()
    checks["factory_device"] = [str(f(2, device="cuda").device) for f in (torch.zeros, torch.ones, torch.empty)] + \
        [str(torch.tensor([1.0], device=0).device), str(torch.arange(3, device=torch.device("cuda")).device)]
    checks["current_device"] = str(torch.cuda.current_device())
    t = torch.ones(3)
    checks["dot_cuda_is_self"] = t.cuda() is t
    checks["type_name"] = (t.type(), torch.ones(1, dtype=torch.bfloat16).type(), t.type(torch.float64).dtype)
    torch.cuda.synchronize()

    # 4. megatron's model-parallel RNG tracker on the CPU generator: reproducible, restores the default.
    from megatron.core.tensor_parallel import random as mrandom

    from popo_mega.runtime import initialize

    rt = initialize(1, 1, seed=7, device="cpu")
    tracker = mrandom.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.randn(4)
    checks["default_state_restored"] = torch.equal(before, torch.get_rng_state())
    with tracker.fork():
        b = torch.randn(4)
    mrandom.model_parallel_cuda_manual_seed(7)
    with tracker.fork():
        a2 = torch.randn(4)
    checks["fork_advances"] = not torch.equal(a, b)
    checks["reseed_reproduces"] = torch.equal(a, a2)

    # 8. transformers' meta-device init still builds correct rotary buffers after the factories are wrapped.
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    m2 = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        checks["hf_logits"] = (m1(ids).logits, m2(ids).logits)
    checks["inv_freq"] = m1.model.rotary_emb.inv_freq.clone()
    checks["rt"] = (rt.tp, rt.pp, rt.dp, str(rt.device))
    return checks


def test_cpu_compat_layer(tmp_path):
    cfg = qwen2_config()
    save_tiny(cfg, tmp_path / "m")
    with torch.no_grad():
        ref = save_tiny(cfg, tmp_path / "m2")(torch.arange(12).unsqueeze(0)).logits  # same seed -> same weights
    c = run_world(_compat_checks, 1, str(tmp_path / "m"))[0]
    assert c["cuda_factory_failed_before"] and c["applied"]
    assert c["factory_device"] == ["cpu"] * 5
    assert c["current_device"] == "cpu" and c["dot_cuda_is_self"]
    assert c["type_name"] == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", torch.float64)
    assert c["default_state_restored"] and c["fork_advances"] and c["reseed_reproduces"]
    assert c["rt"] == (1, 1, 1, "cpu")
    l1, l2 = c["hf_logits"]
    assert torch.equal(l1, l2)
    assert (l1 - ref).abs().max() < 1e-5  # equal to a model never touched by the compat layer
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    assert torch.allclose(c["inv_freq"].double(), expected, rtol=1e-6)


def test_apply_refuses_to_run_with_cuda(monkeypatch):
    from popo_mega.runtime import cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    with pytest.raises(RuntimeError, match="CPU-only"):
        cpu_compat.apply()
