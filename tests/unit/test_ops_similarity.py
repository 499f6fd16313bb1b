"""Kernels 3a/3b (masked mean pooling, weighted cosine penalty) against their reference twins."""

import pytest
import torch

from popo_mega.ops import cosine_penalty, cosine_penalty_ref, masked_mean_pool, masked_mean_pool_ref
from tests.unit.test_ops_common import require_extension, three_way

# segments: length 3, empty, length 1, fully masked, long odd, empty at the end
LENGTHS = [3, 0, 1, 4, 29, 0]


def _pool_case(H, dtype, mask_kind="bool", seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    T = int(cu[-1])
    hidden = torch.randn(T, H, generator=g).to(dtype)
    mask = torch.rand(T, generator=g) > 0.3
    mask[3] = True                   # the length-1 segment has its token
    mask[4:8] = False                # the fourth segment is fully masked
    if mask_kind == "float":
        mask = mask.float() * (0.5 + torch.rand(T, generator=g))
    grad = torch.randn(len(LENGTHS), H, generator=g).to(dtype)
    return hidden, cu, mask, grad


def _run_pool(fn, hidden, cu, mask, grad, **kw):
    h = hidden.clone().requires_grad_(True)
    out = fn(h, cu, mask, **kw)
    (out * grad).sum().backward()
    return out.detach(), h.grad


@pytest.mark.parametrize("H,mask_kind", [(33, "bool"), (8, "float"), (1, "bool")])
def test_pool_fp32_matches_reference(H, mask_kind):
    require_extension()
    args = _pool_case(H, torch.float32, mask_kind)
    k, r = _run_pool(masked_mean_pool, *args, impl="extension"), _run_pool(masked_mean_pool_ref, *args)
    for kk, rr, name in zip(k, r, ["pooled", "grad"]):
        torch.testing.assert_close(kk, rr, atol=1e-6, rtol=1e-5, msg=name)
    assert torch.all(k[0][1] == 0) and torch.all(k[0][3] == 0) and torch.all(k[0][5] == 0)
    torch.testing.assert_close(k[0][2], args[0][3])          # one token: its own hidden state


def test_pool_bf16_three_way():
    require_extension()
    args = _pool_case(65, torch.bfloat16)
    k, r = _run_pool(masked_mean_pool, *args, impl="extension"), _run_pool(masked_mean_pool_ref, *args)
    gold = _run_pool(masked_mean_pool_ref, args[0].float(), args[1], args[2], args[3].float())
    three_way(k[0], r[0], gold[0], "pooled", 2 ** -8)
    three_way(k[1], r[1], gold[1], "grad", 2 ** -8)


def _cos_case(B, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, H, generator=g)
    target = pred * 0.5 + torch.randn(B, H, generator=g)
    target[1] = 0.0                       # a zero target feature (empty response): cos 0, no grad
    weights = torch.rand(B, generator=g)
    weights[2] = 0.0
    return pred.to(dtype), target.to(dtype), weights, float(weights.sum()) + 0.5


def _run_cos(fn, pred, target, weights, normaliser, **kw):
    p = pred.clone().requires_grad_(True)
    loss = fn(p, target, weights, normaliser, **kw)
    (loss * 1.7).backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("B,H", [(5, 31), (3, 1024)])
def test_cosine_fp32_matches_reference_and_hand_formula(B, H):
    require_extension()
    args = _cos_case(B, H, torch.float32)
    k, r = _run_cos(cosine_penalty, *args, impl="extension"), _run_cos(cosine_penalty_ref, *args)
    torch.testing.assert_close(k[0], r[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k[1], r[1], atol=1e-6, rtol=1e-5)
    pred, target, w, D = args
    cos = torch.nn.functional.cosine_similarity(pred.double(), target.double(), dim=-1)
    cos[1] = 0.0
    torch.testing.assert_close(k[0].double(), -(w.double() * cos).sum() / D, atol=1e-6, rtol=1e-5)
    assert torch.all(k[1][1] == 0) and torch.all(k[1][2] == 0)


def test_cosine_bf16_three_way_and_tensor_normaliser():
    require_extension()
    pred, target, w, D = _cos_case(7, 96, torch.bfloat16, seed=4)
    D = torch.tensor(D)
    k, r = _run_cos(cosine_penalty, pred, target, w, D, impl="extension"), _run_cos(cosine_penalty_ref, pred, target, w, D)
    gold = _run_cos(cosine_penalty_ref, pred.float(), target.float(), w, D)
    three_way(k[0], r[0], gold[0], "loss", 1e-5)
    three_way(k[1], r[1], gold[1], "grad", 2 ** -8)


def test_opcheck():
    require_extension()
    hidden, cu, mask, grad = _pool_case(16, torch.float32)
    torch.library.opcheck(torch.ops.popo_mega.masked_mean_pool, (hidden.requires_grad_(True), cu, mask))
    torch.library.opcheck(torch.ops.popo_mega.masked_mean_pool_grad, (grad, cu, mask))
    pred, target, w, D = _cos_case(4, 9, torch.float32)
    D = torch.tensor(D)
    torch.library.opcheck(torch.ops.popo_mega.cosine_penalty, (pred.requires_grad_(True), target, w, D))
    torch.library.opcheck(torch.ops.popo_mega.cosine_penalty_grad, (torch.tensor(1.3), pred.detach(), target, w, D))


def test_bad_segments_are_named():
    require_extension()
    with pytest.raises(ValueError, match="cu_seqlens"):
        masked_mean_pool(torch.zeros(4, 2), torch.tensor([0, 3]), torch.ones(4, dtype=torch.bool), impl="extension")
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
        torch.ops.popo_mega.masked_mean_pool(torch.zeros(4, 2), torch.tensor([0, 3]), torch.ones(4, dtype=torch.bool))
