"""Sampling metrics over problems with ``n`` graded samples each, ``c`` of them correct.

    pass@k (unbiased; Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):
        per problem  1 - C(n-c, k) / C(n, k)  = the probability that a random size-k subset of the
        n samples holds a correct one; averaged over problems. Needs n >= k.
    pass@1 is its k=1 case: the mean of c/n.
    avg@n: the mean accuracy over the n samples of each problem, averaged over problems. It equals
        the pass@1 estimate from the same samples; it is reported under its own name because papers
        quote it that way ("avg@32 on AIME").
"""

from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` samples.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which equals 1 - C(n-c,k)/C(n,k) without big binomials.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n (n={n} samples), got k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems; ``counts`` = [(n, c)] per problem."""
    if not counts:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def avg_at_n(counts: Sequence[tuple[int, int]]) -> float:
    """Mean accuracy over each problem's samples, averaged over problems (avg@n)."""
    if not counts:
        raise ValueError("avg_at_n: no problems")
    for n, c in counts:
        if n < 1 or not 0 <= c <= n:
            raise ValueError(f"avg_at_n: bad count (n={n}, c={c})")
    return sum(c / n for n, c in counts) / len(counts)


def summarize(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """{"pass@1", "avg@n", "pass@k" for each k in ks} for problems that all have the same n samples."""
    ns = {n for n, _ in counts}
    if len(ns) != 1:
        raise ValueError(f"summarize: problems have different sample counts {sorted(ns)}")
    n = ns.pop()
    out = {"pass@1": mean_pass_at_k(counts, 1), f"avg@{n}": avg_at_n(counts)}
    for k in sorted(set(ks)):
        out[f"pass@{k}"] = mean_pass_at_k(counts, k)
    return out
