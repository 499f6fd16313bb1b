"""One object per training objective: what the RL loop and the policy step need to know about POPO,
GRPO (with its k3 KL to a frozen reference) and A3PO, so that neither compares algorithm names.

    objective = make_objective(cfg.algorithm, kernels=cfg.train.kernels)
    selection = objective.select(prompts, completions, rewards, group_size)   # rank 0, after grading
    samples = objective.trainable(selection.samples)   # what the policy step runs on (one place)
    ... objective.prepare / normalisers / loss inside PolicyTrainer.train_step

Each objective answers:

* ``select``: scored rollouts -> RolloutSamples and selection stats (``train/select.py``).
* ``trainable``: the samples that enter some term of the loss. POPO with ``entropy_on: positive``
  trains on positives only (negatives enter no term, so they are never run through the model);
  every other case trains on all it selected. The loop decides "nothing to train on in this batch"
  from it, on the broadcast batch, the same on every rank.
* ``needs_old_logp``: whether the loss reads the sampler's log-probs (GRPO/A3PO always; POPO with
  token-level importance correction).
* ``keeps_ema`` / ``keeps_predictor`` / ``keeps_reference``: which extra models the trainer builds
  (POPO: the fp32 EMA target, and the predictor h_phi when alpha != 0; GRPO/A3PO: the frozen initial
  policy when beta_kl != 0).
* ``prepare``: per-step sample preparation (A3PO: token-level shaped advantages).
* ``normalisers``: one micro-batch's share of the global loss normalisers, float64 [3].
* ``loss``: one micro-batch's share of the full-batch loss and its named parts.
* ``stat_keys``: the summable parts the step reports.
* ``refills``: DAPO dynamic sampling (the loop tops a step up to data.prompts_per_step informative groups).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from popo_mega.algorithms.a3po import shape_advantages
from popo_mega.algorithms.grpo import policy_loss
from popo_mega.algorithms.popo import popo_loss, popo_normalisers
from popo_mega.config import AlgorithmConfig
from popo_mega.train.batch import MicroBatch, RolloutSample
from popo_mega.train.select import Selection, select_groups, select_positives

__all__ = ["Objective", "POPO", "GRPO", "A3PO", "make_objective", "POPO_STATS", "PG_STATS"]

POPO_STATS = ("loss", "pg", "sim", "ent", "positive_token_count", "clip_low_count", "clip_high_count", "rho_sum",
              "weighted_cos_sum", "entropy_sum")
PG_STATS = ("loss", "pg", "kl", "clip_low_count", "clip_high_count", "rho_sum", "token_count")

# (pred, target): the predictor's output and the noisy EMA target features, [B, H] fp32 each, for one
# micro-batch; (None, None) without a predictor. Supplied by the trainer, which owns both models.
Head = Callable[[MicroBatch], tuple[Tensor | None, Tensor | None]]


class Objective:
    """The interface; see the module docstring. ``algo``: the algorithm section of the config."""

    stat_keys: tuple[str, ...] = ()
    keeps_ema = False

    def __init__(self, algo: AlgorithmConfig, kernels: str = "auto"):
        self.algo = algo
        self.kernels = kernels

    @property
    def name(self) -> str:
        return self.algo.name

    @property
    def keeps_predictor(self) -> bool:
        return False

    @property
    def keeps_reference(self) -> bool:
        return False

    @property
    def refills(self) -> bool:
        return False

    @property
    def needs_old_logp(self) -> bool:
        return True

    def select(self, prompts: list[list[int]], completions, rewards: Tensor, group_size: int,
               uid_offset: int = 0) -> Selection:
        raise NotImplementedError

    def trainable(self, samples: list[RolloutSample]) -> list[RolloutSample]:
        return list(samples)

    def check_inputs(self, samples: list[RolloutSample]) -> None:
        """A rollout without the sampler's log-probs is an error where the loss reads them."""
        if not self.needs_old_logp:
            return
        for i, s in enumerate(samples):
            if s.old_logp is None:
                raise ValueError(f"train_step: rollout {i} has no old_logp; {self.describe_old_logp_need()} "
                                 "needs the sampling policy's log-probs")

    def describe_old_logp_need(self) -> str:
        return f"algorithm {self.name!r}"

    @property
    def prepare_depends_on_step(self) -> bool:
        """Whether ``prepare`` gives other samples at another step (a later update on the same
        rollouts must re-prepare and re-pack them)."""
        return False

    def prepare(self, samples: list[RolloutSample], step: int) -> list[RolloutSample]:
        return samples

    def normalisers(self, mb: MicroBatch) -> Tensor:
        raise NotImplementedError

    def loss(self, mb: MicroBatch, logp: Tensor, entropy: Tensor, norm: Tensor, head: Head
             ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class POPO(Objective):
    """Positive-only: self-normalised weights over positives (P1), clipped IS (P2), the predictor's
    bounded similarity to the EMA target (P3), entropy (P4); docs/algorithms.md."""

    stat_keys = POPO_STATS
    keeps_ema = True

    @property
    def keeps_predictor(self) -> bool:
        return self.algo.popo.alpha != 0

    @property
    def needs_old_logp(self) -> bool:
        return self.algo.popo.is_correction == "token"

    def describe_old_logp_need(self) -> str:
        return "algorithm 'popo' with is_correction: token"

    def select(self, prompts, completions, rewards, group_size, uid_offset=0):
        return select_positives(prompts, completions, rewards, self.algo.popo, group_size, uid_offset)

    def trainable(self, samples):
        if self.algo.popo.entropy_on == "positive":  # negatives enter no term: never run them
            return [s for s in samples if s.positive]
        return list(samples)

    def normalisers(self, mb):
        """(N+ positive tokens, sum of positive weights, entropy token count) of this micro-batch."""
        n = popo_normalisers(mb.mask, mb.cu_seqlens, mb.weights, mb.positive, self.algo.popo.entropy_on)
        return torch.stack([n["num_positive_tokens"], n["weight_sum"], n["entropy_token_count"]]).double()

    def loss(self, mb, logp, entropy, norm, head):
        a = self.algo
        p = a.popo
        pred, target = head(mb)
        return popo_loss(
            logp, mb.mask, mb.cu_seqlens, mb.weights, mb.positive, num_positive_tokens=norm[0].item(),
            old_logp=mb.old_logp if p.is_correction == "token" else None, is_correction=p.is_correction,
            eps_low=a.eps_low, eps_high=a.eps_high, pred=pred, target=target, weight_sum=norm[1].item(),
            alpha=p.alpha, entropy=entropy if p.beta != 0 else None, entropy_token_count=norm[2].item(),
            entropy_on=p.entropy_on, beta=p.beta, impl=self.kernels)


class GRPO(Objective):
    """Group-relative advantages, clipped surrogate, optional k3 KL to the frozen initial policy
    (``ref_logp`` from the trainer's reference pass); docs/algorithms.md section 2."""

    stat_keys = PG_STATS

    @property
    def keeps_reference(self) -> bool:
        return self.algo.grpo.beta_kl != 0

    @property
    def refills(self) -> bool:
        return self.algo.grpo.dynamic_sampling

    def select(self, prompts, completions, rewards, group_size, uid_offset=0):
        return select_groups(prompts, completions, rewards, self.algo.grpo, group_size, uid_offset)

    def normalisers(self, mb):
        """(response tokens, rollouts, 0) of this micro-batch."""
        tokens = mb.mask.sum().double()
        return torch.stack([tokens, tokens.new_tensor(float(mb.num_sequences)), tokens.new_zeros(())])

    def loss(self, mb, logp, entropy, norm, head):
        a = self.algo
        g = a.grpo
        agg_norm = norm[0].item() if g.aggregation == "token_mean" else norm[1].item()
        return policy_loss(logp, mb.old_logp, mb.token_advantages, mb.mask, normaliser=agg_norm, agg=g.aggregation,
                           cu_seqlens=mb.cu_seqlens, eps_low=a.eps_low, eps_high=a.eps_high, impl=self.kernels,
                           beta_kl=g.beta_kl, ref_logp=mb.extras.get("ref_logp"))


class A3PO(GRPO):
    """GRPO with token-level shaped advantages (docs/algorithms.md section 4)."""

    @property
    def prepare_depends_on_step(self) -> bool:
        return True   # the shaped advantages decay with the step

    def prepare(self, samples, step):
        return a3po_token_advantages(samples, step, self.algo)


def a3po_token_advantages(samples: list[RolloutSample], step: int, algo: AlgorithmConfig) -> list[RolloutSample]:
    """Samples with ``token_advantages`` = A3PO's shaped advantages (section 4 of docs/algorithms.md):
    the rollouts are padded to [B, R_max] and passed to ``a3po.shape_advantages`` (needs old_logp)."""
    if not samples:
        return []
    a = algo.a3po
    R = max(s.tokens.numel() - s.prompt_len for s in samples)
    old = torch.zeros(len(samples), R)
    mask = torch.zeros(len(samples), R)
    for b, s in enumerate(samples):
        if s.old_logp is None:
            raise ValueError(f"a3po_token_advantages: rollout {b} has no old_logp (A3PO ranks tokens by it)")
        r = s.tokens.numel() - s.prompt_len
        old[b, :r] = s.old_logp.float()
        mask[b, :r] = 1
    adv = torch.tensor([float(s.advantage) for s in samples])
    shaped = shape_advantages(adv, old, mask, step, a.ratio, a.rho, a.alpha)
    return [RolloutSample(**{**s.__dict__, "token_advantages": shaped[b, :s.tokens.numel() - s.prompt_len].clone()})
            for b, s in enumerate(samples)]


_OBJECTIVES: dict[str, type[Objective]] = {"popo": POPO, "grpo": GRPO, "a3po": A3PO}


def make_objective(algo: AlgorithmConfig, kernels: str = "auto") -> Objective:
    """The objective ``algorithm.name`` names (the config's Literal admits only these)."""
    return _OBJECTIVES[algo.name](algo, kernels)
