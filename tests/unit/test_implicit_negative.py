"""Where POPO's implicit negative gradient fails: a negative that shares a long prefix with a positive.

test_popo.py::test_implicit_negative_gradient_lowers_held_out_negatives shows positive-only steps
lowering negatives that share nothing with the positives. Here the same tabular policy
(p(y_t | x, y_{t-1}) = softmax(table[x, y_{t-1}])) and the same steps, with a negative equal to the
positive except for its last token: the steps raise the four shared tokens' log-probs and lower only
the last one, so the negative's log-prob rises. benchmarks/implicit_negative.py measures the same
on the quickstart model (benchmarks/results/implicit_negative_cpu.json: at lr 2e-4 negatives sharing
one answer digit rose in 5 of 5 seeds, disjoint ones fell in 5 of 5)."""

import torch

from popo_mega.algorithms.popo import popo_loss, positive_weights
from tests.unit.test_popo import SoftmaxTable


def _seq_logp(model, prompts, seqs):
    with torch.no_grad():
        logp, _, cu = model(prompts, seqs)
        return [logp[cu[i]:cu[i + 1]].sum().item() for i in range(len(seqs))]


def test_positive_only_steps_raise_a_negative_sharing_a_long_prefix_and_lower_a_disjoint_one():
    model = SoftmaxTable(prompts=1, vocab=6, seed=3)
    positives = [torch.tensor([1, 2, 3, 4, 5])]
    negatives = [torch.tensor([1, 2, 3, 4, 0]),    # shares 4 of 5 tokens, then diverges
                 torch.tensor([0, 0, 0, 0, 0])]    # diverges at the first token
    before = _seq_logp(model, [0, 0], negatives)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        logp, entropy, cu = model([0], positives)
        with torch.no_grad():
            w = positive_weights(logp.mean()[None], torch.tensor([True]), group_size=1)
        mask = torch.ones_like(logp)
        total, _ = popo_loss(logp, mask, cu, w, torch.tensor([True]), num_positive_tokens=float(mask.sum()),
                             entropy=entropy, entropy_token_count=float(mask.sum()))
        opt.zero_grad()
        total.backward()
        opt.step()
    after = _seq_logp(model, [0, 0], negatives)
    assert after[0] > before[0], (before, after)   # the shared-prefix negative is raised
    assert after[1] < before[1], (before, after)   # the disjoint negative is lowered
