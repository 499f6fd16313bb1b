"""Rank 0's part of a step: rollout -> reward -> select (docs/architecture.md, the loop).

    worker = RolloutWorker(cfg, setup, trainer.objective, engine)   # every rank; start() on rank 0
    batch = engine.on_rank0(lambda: worker.collect(step), "rollout")   # a RolloutBatch on every rank

``collect`` samples ``rollout.group_size`` responses to the step's ``data.prompts_per_step`` prompts
from the served weights, grades them (exact match on the synthetic task, math-verify in a process
pool otherwise), tops the step up with DAPO dynamic sampling where the objective refills, and selects
the training samples with the objective's own rule (POPO: positives and their weights). The batch
carries the weight version it was sampled with, so that a consumer running behind the producer
(asynchronous rollouts, issue 12 item 2) can tell how stale it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from popo_mega.config import Config
from popo_mega.rollout.engine import SamplingParams, sample_seed, versions_of
from popo_mega.train.refill import Rollouts, refill, stream_rollouts

__all__ = ["RolloutBatch", "RolloutWorker", "greedy_accuracy"]


@dataclass
class RolloutBatch:
    """One step's selected samples, as rank 0 broadcasts them.

    samples:        the objective's selection (RolloutSamples; every rank takes its DP share)
    metrics:        the batch's metrics (reward, positive rate, lengths, selection counts, rollout_s)
    versions:       per rollout (all of them, not only the selected), the weight versions its tokens
                    were sampled with, in order (more than one: a sync came during its generation)
    interrupted:    SIGTERM/SIGINT arrived by the time the loop took it (RolloutPipeline.take): the
                    loop checkpoints and stops instead of training
    """

    samples: list
    metrics: dict = field(default_factory=dict)
    versions: list = field(default_factory=list)
    interrupted: bool = False


def greedy_accuracy(engine, prompts, score_fn, max_new_tokens: int, stop_ids: tuple[int, ...], tokenizer) -> float:
    """Fraction of ``prompts`` whose greedy response ``score_fn`` accepts (what ``engine`` serves)."""
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids)
    outs = engine.generate([p.ids for p in prompts], sampling, n=1)
    texts = [tokenizer.decode(o[0].output_ids, skip_special_tokens=True) for o in outs]
    return sum(score_fn(t, p.gold) for t, p in zip(texts, prompts)) / len(prompts)


class RolloutWorker:
    """The rollout, its rewards and the selection, on rank 0 (see the module docstring). ``engine``:
    the run's ``ResilientEngine`` (rank 0 samples through ``engine.http``)."""

    def __init__(self, cfg: Config, setup, objective, engine):
        self.cfg, self.setup, self.objective, self.engine = cfg, setup, objective, engine
        self.verifier = None  # math-verify in a process pool with per-item deadlines (not the synthetic task)

    def start(self) -> None:
        """Rank 0: the grader."""
        if not self.setup.synthetic:
            from popo_mega.rewards.math import MathVerifier

            # forkserver: workers and their replacements never fork the threaded trainer
            self.verifier = MathVerifier(num_workers=2, start_method="forkserver")

    def sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              stop_token_ids=self.setup.stop_ids,
                              seed=sample_seed(self.cfg.train.seed, step))  # same rollouts after a resume

    def collect(self, step: int) -> RolloutBatch:
        """Rank 0: the rollouts of step ``step`` + 1, graded and selected. On a server failure the
        prompt cursor goes back, so that a retry after a relaunch samples the same prompts and seeds."""
        t0 = time.time()
        stream, http = self.setup.stream, self.engine.http
        cursor = stream.state_dict()
        sampling = self.sampling(step)
        try:
            prompts = stream.next_batch(self.cfg.data.prompts_per_step)
            completions = http.generate([p.ids for p in prompts], sampling, n=self.cfg.rollout.group_size)
            graded = self.reward(prompts, completions)
            fill_stats = {}
            if self.objective.refills:  # DAPO dynamic sampling: top up to prompts_per_step informative groups
                more = stream_rollouts(stream, http, sampling, self.cfg.rollout.group_size)
                graded, fill_stats = refill(graded, lambda rnd, k: self.reward(*more(rnd, k)),
                                            target=self.cfg.data.prompts_per_step, group_size=self.cfg.rollout.group_size,
                                            max_rounds=self.cfg.algorithm.grpo.max_refill_rounds)
        except BaseException:
            stream.load_state_dict(cursor)
            raise
        samples, stats = self.select(graded, step)
        return RolloutBatch(samples, {**stats, **fill_stats, "rollout_s": time.time() - t0},
                            versions=[versions_of(c) for group in graded.completions for c in group])

    def reward(self, prompts, completions) -> Rollouts:
        """Grade every response against its prompt's gold answer (exact match on the synthetic task,
        math-verify otherwise, with the grader's timeout/no-answer/error counts)."""
        from popo_mega.rewards import synthetic

        texts = [self.setup.tokenizer.decode(c.output_ids, skip_special_tokens=True) for g in completions for c in g]
        golds = [p.gold for p in prompts for _ in range(self.cfg.rollout.group_size)]
        grade_stats = {}
        if self.verifier is None:
            scores = synthetic.score_batch(texts, golds)
        else:
            scores, st = self.verifier.score_batch_with_stats(texts, golds)
            grade_stats = {"verifier_timeouts": float(st.timeouts), "no_answer": float(st.no_answer),
                           "verifier_errors": float(st.errors + st.crashes)}
        return Rollouts(prompts, completions, list(scores), grade_stats)

    def select(self, graded: Rollouts, step: int) -> tuple[list, dict]:
        """The objective's training samples of the graded rollouts, and the selection's stats plus
        the grader's counts. uids are unique over the run (step x prompts x group)."""
        g = self.cfg.rollout.group_size
        sel = self.objective.select([p.ids for p in graded.prompts], graded.completions,
                                    torch.tensor(graded.rewards, dtype=torch.float32), g,
                                    uid_offset=step * self.cfg.data.prompts_per_step * g)
        return sel.samples, {**sel.stats, **graded.counts}

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
