"""The popo-train end-to-end tests' micro warm-started base (the command line is in runs.py)."""

import pytest


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny Qwen2 (hidden 64, 2 layers) warm-started for a few seconds on the 16-problem task, so
    that rollouts contain positives (POPO learns only from them)."""
    from popo_mega.rewards.synthetic import SyntheticTask
    from popo_mega.train.warmstart import warm_start

    out = str(tmp_path_factory.mktemp("base"))
    warm_start(SyntheticTask(max_operand=3, n_heldout=4, seed=0), out, low=0.0, high=1.0, hidden=64, lr=3e-3,
               batch_size=32, eval_every=40, max_steps=40, eval_problems=4)
    return out
