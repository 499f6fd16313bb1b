"""The FusedAdam stand-in (tests/fused_adam_standin.py) that the checkpoint tests use in place of
Transformer Engine's FusedAdam: its updates equal torch's AdamW / Adam (TE documents FusedAdam as
their drop-in replacement), and its state layout is TE's (one int step per param group, no
per-parameter step; KeyError on any other per-parameter key, on save and on load)."""

import pytest
import torch

from tests.fused_adam_standin import FusedAdamStandIn


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]


def _run(opt, params, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_updates_equal_torch_adam(adam_w_mode):
    kw = dict(lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)
    ours, ref = _params(), _params()
    got = _run(FusedAdamStandIn(ours, adam_w_mode=adam_w_mode, **kw), ours)
    want = _run((torch.optim.AdamW if adam_w_mode else torch.optim.Adam)(ref, **kw), ref)
    start = _params()
    for a, b, s in zip(got, want, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_state_layout_is_te_fused_adams():
    params = _params()
    opt = FusedAdamStandIn([{"params": params[:1]}, {"params": params[1:]}, {"params": []}])
    assert all("step" not in g for g in opt.param_groups) and len(opt.state) == 0
    params[1].grad = None
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    opt.step()
    # a group steps even where no parameter has a gradient; an empty group never does
    assert [g.get("step") for g in opt.param_groups] == [2, 2, None]
    assert all(isinstance(g["step"], int) for g in opt.param_groups[:2])
    assert {tuple(sorted(s)) for s in opt.state.values()} == {("exp_avg", "exp_avg_sq")}
    saved = opt.state_dict()
    assert [g.get("step") for g in saved["param_groups"]] == [2, 2, None]

    fresh = FusedAdamStandIn([{"params": _params()[:1]}, {"params": _params()[1:]}, {"params": []}])
    fresh.load_state_dict(saved)
    assert [g.get("step") for g in fresh.param_groups] == [2, 2, None]

    # torch Adam's per-parameter step is not a FusedAdam state: TE raises KeyError('step')
    opt.state[params[0]]["step"] = torch.zeros(())
    with pytest.raises(KeyError, match="step"):
        opt.state_dict()
    saved["state"][0]["step"] = torch.zeros(())
    with pytest.raises(KeyError, match="step"):
        fresh.load_state_dict(saved)


def test_refuses_what_it_does_not_model():
    with pytest.raises(NotImplementedError):
        FusedAdamStandIn(_params(), master_weights=True)
    with pytest.raises(NotImplementedError):
        FusedAdamStandIn(_params(), exp_avg_dtype=torch.bfloat16)
