"""The served EMA (popo_mega/train/served_model.py): the fp32 EMA master cast to the model's dtype as it
is read, under the model's state-dict names, holding no copy of its own; the live policy is never touched."""

import torch
from torch import nn

from popo_mega.algorithms.ema import EMA
from popo_mega.train.served_model import ServedModel


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight (two state-dict names), and a buffer."""

    def __init__(self, dtype):
        super().__init__()
        self.embed = nn.Embedding(11, 4, dtype=dtype)
        self.out = nn.Linear(4, 11, bias=False, dtype=dtype)
        self.out.weight = self.embed.weight
        self.norm = nn.Linear(4, 4, dtype=dtype)
        self.register_buffer("inv_freq", torch.arange(3, dtype=torch.float32))


def _step(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def test_served_view_is_the_fp32_ema_cast_to_bf16_and_leaves_the_policy_alone():
    torch.manual_seed(0)
    model = Tied(torch.bfloat16)
    ema = EMA(model, tau=0.9)
    served = ServedModel(model, ema)
    for k in range(3):
        _step(model, k)
        ema.update(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd = served.state_dict(keep_vars=True)
    assert sorted(sd) == sorted(model.state_dict())            # the model's names, both tied names included
    assert torch.equal(sd["out.weight"], sd["embed.weight"])   # the shared parameter: one average under both
    assert sd["inv_freq"] is model.inv_freq                    # buffers are the model's own
    shadow = dict(ema.named_tensors())
    for name, p in model.named_parameters():
        assert sd[name].dtype == torch.bfloat16 and sd[name].data_ptr() != p.data_ptr()
        # the fp32 master rounded once to bf16 (by hand: bf16 keeps the top 16 bits of fp32, round-to-nearest-even)
        bits = shadow[name].contiguous().view(torch.int32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(torch.int16)
        assert torch.equal(sd[name].contiguous().view(torch.int16), rounded)
        assert not torch.equal(sd[name], p.detach())                    # the EMA, not the policy
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the policy untouched
    assert served.nbytes() == 0


def test_served_view_reads_the_ema_at_each_read_and_holds_no_copy():
    model = Tied(torch.bfloat16)
    ema = EMA(model, tau=0.5)
    served = ServedModel(model, ema)
    first = {k: v.clone() for k, v in served.state_dict().items()}
    _step(model, 1)
    ema.update(model)
    now = served.state_dict()
    assert not torch.equal(now["norm.weight"], first["norm.weight"])   # no snapshot: the EMA as it is now
    assert torch.equal(now["norm.weight"], dict(ema.named_tensors())["norm.weight"].to(torch.bfloat16))
    a, b = now["norm.weight"], now["norm.weight"]
    assert a.data_ptr() != b.data_ptr()   # each read is a fresh cast: nothing of the view's own is kept
