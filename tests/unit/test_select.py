"""Selection of rollouts for the policy step: POPO positives and weights, GRPO advantages, dynamic sampling."""

import math

import pytest
import torch

from popo_mega.config import config_from_dict
from popo_mega.rollout.engine import Completion
from popo_mega.train.prompts import Prompt, PromptStream
from popo_mega.train.objectives import make_objective


def _c(ids, lps):
    return Completion(output_ids=list(ids), output_logprobs=list(lps), finish_reason="stop")


def _algo(**kw):
    return config_from_dict({"algorithm": kw}).algorithm


def select(prompts, completions, rewards, algo, group_size, uid_offset=0):
    return make_objective(algo).select(prompts, completions, rewards, group_size, uid_offset)


def test_popo_keeps_only_positives_with_p1_weights():
    prompts = [[1, 2], [3]]
    comps = [[_c([5, 6], [-1.0, -1.0]), _c([7], [-3.0]), _c([8, 9, 10], [-0.5, -0.5, -0.5])],
             [_c([4], [-2.0]), _c([4], [-2.0]), _c([4], [-2.0])]]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    sel = select(prompts, comps, rewards, _algo(name="popo"), group_size=3, uid_offset=100)
    assert [s.tokens.tolist() for s in sel.samples] == [[1, 2, 5, 6], [1, 2, 8, 9, 10]]
    assert [s.prompt_len for s in sel.samples] == [2, 2] and all(s.positive for s in sel.samples)
    assert [s.uid for s in sel.samples] == [100, 102]
    # P1 by hand: lbar = -1.0 and -0.5 -> softmax = (e^-1, e^-0.5) / (e^-1 + e^-0.5)
    z = math.exp(-1.0) + math.exp(-0.5)
    assert math.isclose(sel.samples[0].weight, math.exp(-1.0) / z, rel_tol=1e-6)
    assert math.isclose(sel.samples[1].weight, math.exp(-0.5) / z, rel_tol=1e-6)
    assert sel.samples[1].old_logp.tolist() == [-0.5, -0.5, -0.5]
    assert sel.stats["positive_rate"] == pytest.approx(2 / 6) and sel.stats["prompts_with_positive"] == 0.5
    assert sel.stats["prompts_skipped"] == 1.0 and sel.stats["reward"] == pytest.approx(2 / 6)
    assert math.isclose(sel.stats["response_length"], (2 + 1 + 3 + 1 + 1 + 1) / 6)


def test_popo_entropy_on_all_keeps_every_rollout_with_zero_weight_on_negatives():
    comps = [[_c([5], [-1.0]), _c([6], [-2.0])], [_c([7], [-1.0]), _c([8], [-1.0])]]
    sel = select([[1], [2]], comps, torch.tensor([1.0, 0.0, 0.0, 0.0]),
                 _algo(name="popo", popo={"entropy_on": "all"}), group_size=2)
    assert len(sel.samples) == 4
    assert [s.weight for s in sel.samples] == [1.0, 0.0, 0.0, 0.0]
    assert [s.positive for s in sel.samples] == [True, False, False, False]


def test_grpo_advantages_and_dynamic_sampling():
    comps = [[_c([5], [-1.0]), _c([6], [-1.0])], [_c([7], [-1.0]), _c([8], [-1.0])]]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    sel = select([[1], [2]], comps, rewards, _algo(name="grpo"), group_size=2)
    # Group 1: mean 0.5, unbiased std sqrt(0.5) -> A = +-0.5/sqrt(0.5); group 2: all equal -> 0.
    a = 0.5 / math.sqrt(0.5)
    assert [round(s.advantage, 5) for s in sel.samples] == [round(a, 5), round(-a, 5), 0.0, 0.0]
    sel = select([[1], [2]], comps, rewards, _algo(name="grpo", grpo={"dynamic_sampling": True}), group_size=2)
    assert len(sel.samples) == 2 and sel.stats["prompts_skipped"] == 1.0


def test_select_rejects_ragged_groups():
    with pytest.raises(ValueError, match="expected 1 x 2 rollouts"):
        select([[1]], [[_c([5], [-1.0])]], torch.tensor([1.0]), _algo(name="popo"), group_size=2)


def test_prompt_stream_is_deterministic_and_resumable():
    prompts = [Prompt(ids=[i], gold=str(i), question=str(i)) for i in range(5)]
    a = PromptStream(prompts, seed=3)
    first = [p.ids[0] for p in a.next_batch(7)]
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]  # one full epoch before any repeat
    state = a.state_dict()
    rest = [p.ids[0] for p in a.next_batch(6)]
    b = PromptStream(prompts, seed=3)
    b.load_state_dict(state)
    assert [p.ids[0] for p in b.next_batch(6)] == rest
    with pytest.raises(ValueError, match="checkpoint cursor is for 5 prompts / seed 3"):
        PromptStream(prompts, seed=9).load_state_dict(state)


# --- DAPO dynamic sampling refill (popo_mega/train/refill.py) -------------------------------------

def _round(prompt_names, rewards, G=2):
    from popo_mega.train.refill import Rollouts

    comps = [[_c([9] * (1 + i % 2), [-1.0] * (1 + i % 2)) for i in range(G)] for _ in prompt_names]
    return Rollouts(list(prompt_names), comps, list(rewards), {"verifier_timeouts": 1.0})


def test_refill_tops_up_to_target_informative_groups():
    from popo_mega.train.refill import refill

    # G=2, target 3. First round: groups (1,0) (1,1) (0,0) -> 1 informative. Rate 1/3, 2 missing:
    # ask ceil(2 / (1/3)) = 6 prompts, capped at a full batch (3).
    first = _round(["p0", "p1", "p2"], [1, 0, 1, 1, 0, 0])
    calls = []

    def more(rnd, k):
        calls.append((rnd, k))
        return _round(["q0", "q1", "q2"][:k], [0, 1, 0, 0, 1, 0][:2 * k])

    kept, st = refill(first, more, target=3, group_size=2, max_rounds=4)
    assert calls == [(1, 3)]
    assert kept.prompts == ["p0", "q0", "q2"] and kept.rewards == [1, 0, 0, 1, 1, 0]
    assert kept.counts == {"verifier_timeouts": 2.0}
    assert st["refill_rounds"] == 1.0 and st["refill_prompts"] == 3.0 and st["informative_shortfall"] == 0.0
    assert st["informative_unused"] == 0.0
    assert st["prompts_skipped"] == 3.0 and st["rollouts"] == 12.0
    assert st["reward"] == pytest.approx(5 / 12) and st["positive_rate"] == pytest.approx(5 / 12)
    assert st["prompts_with_positive"] == pytest.approx(4 / 6)  # p0 p1 q0 q2
    assert st["response_length"] == pytest.approx(1.5)  # lengths 1, 2 in every group
    # A first round with more informative groups than the target: the extra ones are counted.
    kept, st = refill(_round(["a", "b", "c"], [1, 0, 0, 1, 1, 0]), more, target=2, group_size=2, max_rounds=4)
    assert kept.prompts == ["a", "b"] and st["informative_unused"] == 1.0 and st["refill_rounds"] == 0.0


def test_refill_stops_at_the_bound_and_counts_rounds():
    from popo_mega.train.refill import refill

    calls = []

    def more(rnd, k):  # never informative: every rollout correct
        calls.append((rnd, k))
        return _round([f"r{rnd}.{i}" for i in range(k)], [1] * (2 * k))

    kept, st = refill(_round(["a", "b"], [1, 1, 0, 0]), more, target=2, group_size=2, max_rounds=3)
    assert calls == [(1, 2), (2, 2), (3, 2)]  # informative rate 0: a full batch per round
    assert kept.prompts == [] and st["refill_rounds"] == 3.0 and st["refill_prompts"] == 6.0
    assert st["informative_shortfall"] == 2.0 and st["prompts_skipped"] == 8.0 and st["rollouts"] == 16.0
    kept, st = refill(_round(["a", "b"], [1, 1, 0, 0]), more, target=2, group_size=2, max_rounds=0)
    assert st["refill_rounds"] == 0.0 and len(calls) == 3  # max_refill_rounds 0: no refill at all


class ScriptedEngine:
    """generate() answers from a script: call i gives every prompt the i-th list of G response
    texts (the synthetic task's exact-match answers); records the prompts and seeds it was sent."""

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def generate(self, prompt_ids, sampling, n):
        texts = self.script.pop(0)
        assert len(texts) == n
        self.calls.append((len(prompt_ids), sampling.seed))
        return [[_c([ord(ch) for ch in t], [-1.0] * len(t)) for t in texts] for _ in prompt_ids]


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _worker(cfg, stream, engine):
    """The loop's rank-0 RolloutWorker on ``stream`` and a scripted engine (its objective: cfg's)."""
    from types import SimpleNamespace

    from popo_mega.train.objectives import make_objective
    from popo_mega.train.rollout_worker import RolloutWorker

    setup = SimpleNamespace(stream=stream, tokenizer=CharTokenizer(), stop_ids=(), synthetic=True)
    return RolloutWorker(cfg, setup, make_objective(cfg.algorithm), SimpleNamespace(http=engine))


def test_loop_refill_with_a_scripted_engine_stops_at_max_refill_rounds():
    cfg = config_from_dict({"algorithm": {"name": "grpo", "grpo": {"dynamic_sampling": True, "max_refill_rounds": 2}},
                            "rollout": {"group_size": 2}, "data": {"prompts_per_step": 3}})
    stream = PromptStream([Prompt(ids=[i], gold="7", question=str(i)) for i in range(50)], seed=0)
    engine = ScriptedEngine([["7", "7"]] * 4)  # all correct: never informative
    batch = _worker(cfg, stream, engine).collect(5)
    samples, st = batch.samples, batch.metrics
    assert not batch.interrupted
    assert samples == [] and st["refill_rounds"] == 2.0 and st["informative_shortfall"] == 3.0
    assert len(engine.calls) == 3 and len(engine.script) == 1  # the first round + 2 refill rounds
    assert [n for n, _ in engine.calls] == [3, 3, 3] and stream.position == 9
    assert len({seed for _, seed in engine.calls}) == 3  # each round samples with its own seed
    assert st["rollouts"] == 18.0 and st["prompts_skipped"] == 9.0 and st["reward"] == 1.0


def test_loop_refill_with_a_scripted_engine_fills_the_step():
    cfg = config_from_dict({"algorithm": {"name": "grpo", "grpo": {"dynamic_sampling": True}},
                            "rollout": {"group_size": 2}, "data": {"prompts_per_step": 3}})
    stream = PromptStream([Prompt(ids=[i], gold="7", question=str(i)) for i in range(50)], seed=0)
    # round 0: uninformative (7, 7); round 1: informative (7, 8) for all 3 prompts asked.
    engine = ScriptedEngine([["7", "7"], ["7", "8"]])
    batch = _worker(cfg, stream, engine).collect(0)
    samples, st = batch.samples, batch.metrics
    assert st["refill_rounds"] == 1.0 and st["informative_shortfall"] == 0.0 and st["prompts_skipped"] == 3.0
    assert len(samples) == 6 and [s.positive for s in samples] == [True, False] * 3
    # GRPO advantages of a (1, 0) group: +-0.5 / std(1, 0) = +-0.5 / sqrt(0.5)
    assert [round(s.advantage, 4) for s in samples[:2]] == [round(0.5 / math.sqrt(0.5), 4), round(-0.5 / math.sqrt(0.5), 4)]
    # the kept prompts are the refill round's: the stream's next 3 (a twin stream shows which)
    twin = PromptStream(stream.prompts, seed=0).next_batch(6)
    assert [s.tokens[0].item() for s in samples[::2]] == [p.ids[0] for p in twin[3:]]


def test_a_failed_rollout_puts_the_prompt_cursor_back():
    """A server failure mid-step leaves the stream where it was, so that the retry after a relaunch
    (ResilientEngine.on_rank0) samples the same prompts with the same seeds."""
    import pytest

    from popo_mega.rollout.http_engine import RolloutServerError

    class DyingEngine(ScriptedEngine):
        def generate(self, prompt_ids, sampling, n):
            raise RolloutServerError("http://127.0.0.1:1/generate failed")

    cfg = config_from_dict({"rollout": {"group_size": 2}, "data": {"prompts_per_step": 3}})
    stream = PromptStream([Prompt(ids=[i], gold="7", question=str(i)) for i in range(50)], seed=0)
    stream.next_batch(4)
    with pytest.raises(RolloutServerError):
        _worker(cfg, stream, DyingEngine([])).collect(0)
    assert stream.position == 4
    batch = _worker(cfg, stream, ScriptedEngine([["7", "8"]])).collect(0)
    assert stream.position == 7 and len(batch.samples) == 3   # POPO: the positives
