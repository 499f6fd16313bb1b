"""vocab_parallel_logprob_entropy at TP=1 against a float64 full-vocab log_softmax (second formulation)."""

import pytest
import torch

from popo_mega.model.logprobs import vocab_parallel_logprob_entropy


def gold(logits64, target):
    """logp and entropy from float64 log_softmax, differentiated by autograd."""
    lsm = torch.log_softmax(logits64, dim=-1)
    logp = lsm.gather(1, target[:, None]).squeeze(1)
    entropy = -(lsm.exp() * lsm).sum(-1)
    return logp, entropy


def _case(T=37, V=53, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, V, (T,), generator=g)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_ent = torch.randn(T, generator=g, dtype=torch.float64)
    return logits, target, g_lp, g_ent


@pytest.mark.parametrize("chunk_tokens", [None, 1, 5])
def test_fp32_values_and_gradients_match_float64_log_softmax(chunk_tokens):
    logits64, target, g_lp, g_ent = _case()
    x = logits64.clone().requires_grad_(True)
    lp_ref, ent_ref = gold(x, target)
    (lp_ref * g_lp + ent_ref * g_ent).sum().backward()

    z = logits64.float().requires_grad_(True)
    before = z.detach().clone()
    lp, ent = vocab_parallel_logprob_entropy(z, target, chunk_tokens=chunk_tokens)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), x.grad, atol=2e-6, rtol=1e-5)
    assert torch.equal(z.detach(), before), "input logits were modified"


def test_hand_computed_uniform_logits():
    # All-equal logits over V entries: logp = -log V, entropy = log V, exactly.
    V = 7
    logits = torch.zeros(3, V)
    target = torch.tensor([0, 3, 6])
    lp, ent = vocab_parallel_logprob_entropy(logits, target)
    expected = torch.log(torch.tensor(float(V)))
    torch.testing.assert_close(lp, -expected.expand(3))
    torch.testing.assert_close(ent, expected.expand(3))


def test_bf16_input_is_as_close_as_its_rounding_allows():
    logits64, target, g_lp, g_ent = _case(T=19, V=101, seed=3)
    zb = logits64.bfloat16()
    x = zb.double().requires_grad_(True)        # gold on the exact bf16 values
    lp_ref, ent_ref = gold(x, target)
    (lp_ref * g_lp + ent_ref * g_ent).sum().backward()

    z = zb.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprob_entropy(z, target)
    (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
    assert z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), atol=1e-5, rtol=1e-5)
    # the gradient is rounded once to bf16 (8 bits of mantissa)
    torch.testing.assert_close(z.grad.double(), x.grad, atol=1e-3, rtol=8e-3)


def test_large_logits_do_not_overflow():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [88.0, 89.0, 90.0]])
    target = torch.tensor([0, 2])
    lp, ent = vocab_parallel_logprob_entropy(logits, target)
    lp_ref, ent_ref = gold(logits.double(), target)
    torch.testing.assert_close(lp.double(), lp_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent.double(), ent_ref, atol=1e-6, rtol=1e-6)


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match="logits must be"):
        vocab_parallel_logprob_entropy(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be"):
        vocab_parallel_logprob_entropy(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        vocab_parallel_logprob_entropy(torch.zeros(4, 5), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="no vocab shard"):
        vocab_parallel_logprob_entropy(torch.zeros(2, 5), torch.tensor([1, 5]))
