"""Which weights the held-out evaluation during training sees (popo_mega/train/evaluation.py), in the
loop's order: ``after_batch`` -> the loop's weight sync of step N -> ``metrics``.

A fake engine answers each greedy request with the version it holds (one token, the version's last
digit) and the grader accepts a prompt iff that token equals its gold, so the accuracy names the
weights evaluated. Held-out accuracy logged at step N must be that of step N's weights: the online
policy's (synced in as ``stepN-policy``) with eval.model policy on an EMA-serving run, else the
served weights of step N. Before, a run serving its policy (GRPO) or evaluating the served EMA was
evaluated before the sync, on step N-1's weights; a colocated server, whose weights are freed for
the step, had none at all.
"""

from types import SimpleNamespace

import pytest

from popo_mega.config import config_from_dict
from popo_mega.rollout.engine import Completion
from popo_mega.train.evaluation import Evaluation


class VersionEngine:
    """``sync(module, version)`` loads a version; ``http.generate`` answers every prompt with it."""

    def __init__(self):
        self.version, self.syncs = "step0", []
        self.http = self

    def sync(self, module, version):
        self.version = version
        self.syncs.append(version)

    def generate(self, prompts, sampling, n=1):
        return [[Completion([self.version], [0.0], "stop")] for _ in prompts]


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return ids[0]


def _evaluation(eval_model: str, weights: str, monkeypatch):
    from popo_mega.rewards import synthetic
    monkeypatch.setattr(synthetic, "score", lambda text, gold: float(text == gold))
    cfg = config_from_dict({"rollout": {"weights": weights}, "eval": {"interval": 1, "model": eval_model}})
    setup = SimpleNamespace(heldout=[SimpleNamespace(ids=[1], gold="step2")], stop_ids=(), tokenizer=Tok(),
                            log_line=print)
    trainer = SimpleNamespace(rt=SimpleNamespace(rank=0, world_size=1), served=object() if weights == "ema" else None,
                              model=object())
    engine = VersionEngine()
    return Evaluation(cfg, setup, engine, trainer), engine


@pytest.mark.parametrize("eval_model,weights,logged,served,syncs", [
    # GRPO/A3PO serve the policy: evaluated after the sync of step 2 (before: step 1's weights, 0.0)
    ("policy", "online", 1.0, None, ["step2"]),
    # eval.model served on an EMA run: the served EMA of step 2
    ("served", "ema", 1.0, None, ["step2"]),
    # eval.model policy on an EMA run: the policy synced in first, then the served EMA after the sync
    ("policy", "ema", 0.0, 1.0, ["step2-policy", "step2"]),
])
def test_heldout_accuracy_at_step_n_is_of_step_n_weights(eval_model, weights, logged, served, syncs, monkeypatch):
    ev, engine = _evaluation(eval_model, weights, monkeypatch)
    engine.sync(None, "step1")                    # what the servers held during step 2's rollouts
    engine.syncs.clear()
    evaluated = ev.after_batch(1, 2)              # the loop, after step 2's update ...
    engine.sync(None, "step2")                    # ... its weight sync ...
    m = ev.metrics(evaluated, 2)                  # ... then the record of step 2
    assert engine.syncs == syncs
    assert m["heldout_accuracy"] == logged        # gold "step2": 1.0 iff step 2's served weights answered
    assert m.get("heldout_accuracy_served") == served
