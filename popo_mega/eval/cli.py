"""``popo-eval``: pass@1, avg@n and unbiased pass@k of a model served behind SGLang's HTTP API.

    popo-eval --server-url http://127.0.0.1:30000 --tokenizer /models/Qwen2.5-Math-7B \\
              --benchmarks aime2025 math500 --n 16 --k 1 4 16 --out results.json

Any server speaking SGLang's API works: real SGLang servers, an sglang-router URL, or the embedded
``popo-rollout-server``; several URLs are spread over. Math answers are graded with math-verify in
a process pool (``--workers``, ``--deadline`` seconds per answer); the ``synthetic`` benchmark (the
quickstart's held-out split) is graded by exact match. Prints a table; ``--out`` writes JSON with the
metrics, the grader's counts and per-problem results.

The evaluation itself is ``popo_mega.eval.suite.evaluate_benchmarks``, which popo-train also runs every
``eval.interval`` steps (popo_mega/train/benchmark_eval.py): the numbers mean the same in both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from popo_mega.data.templates import TEMPLATES
from popo_mega.eval.runner import format_table, stop_token_ids
from popo_mega.eval.suite import benchmark_names

DEFAULT_BENCHMARKS = ("aime2025", "aime2024", "amc23", "math500", "gsm8k")
CHOICES = benchmark_names()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popo-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-url", nargs="+", required=True, metavar="URL",
                   help="base URL(s) of SGLang-API servers (SGLang, sglang-router or popo-rollout-server)")
    p.add_argument("--api-key", default=None, help="API key of the servers, if they use one")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer directory of the served model")
    p.add_argument("--benchmarks", nargs="+", default=list(DEFAULT_BENCHMARKS), choices=CHOICES, metavar="NAME",
                   help=f"benchmarks to run ({', '.join(CHOICES)}); default: {' '.join(DEFAULT_BENCHMARKS)}")
    p.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="k values of pass@k, each <= --n (default 1)")
    p.add_argument("--template", default=None, choices=TEMPLATES,
                   help="prompt template (default: qwen-math; plain for the synthetic benchmark)")
    p.add_argument("--system-prompt", default=None, help="system prompt for --template chat")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each benchmark")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy; default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=3072, help="response length limit (default 3072)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (default 64)")
    p.add_argument("--data-dir", default=None, help="math data directory (default <repo root>/../shared/data/math)")
    p.add_argument("--workers", type=int, default=2, help="math-verify grading processes (default 2)")
    p.add_argument("--deadline", type=float, default=10.0, help="seconds allowed to grade one answer (default 10)")
    p.add_argument("--keep-responses", type=int, default=1, help="decoded responses kept per problem in --out")
    p.add_argument("--out", default=None, metavar="FILE", help="write results as JSON here")
    return p


def _make_engine(args):
    """The HTTP engine over ``--server-url`` (imported here: popo-eval --help needs no HTTP stack)."""
    from popo_mega.rollout.http_engine import HttpEngine

    return HttpEngine(urls=list(args.server_url), api_key=args.api_key)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise SystemExit(f"popo-eval: --tokenizer {path}: not a directory")
    return AutoTokenizer.from_pretrained(path)


def _benchmarks(args):
    """The benchmarks to run, loaded before any sampling (a missing file stops us early)."""
    from popo_mega.eval.suite import load_benchmark

    out = []
    for name in args.benchmarks:
        b = load_benchmark(name, limit=args.limit, data_dir=args.data_dir)
        if b.n_skipped:
            print(f"popo-eval: {name}: skipped {b.n_skipped} bad records (first: {b.first_skipped})", file=sys.stderr)
        out.append(b)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"popo-eval: --n must be >= 1, got {args.n}")
    bad_k = [k for k in args.k if not 1 <= k <= args.n]
    if bad_k:
        raise SystemExit(f"popo-eval: --k {bad_k}: each k must be between 1 and --n ({args.n})")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"popo-eval: --limit must be >= 1, got {args.limit}")
    from popo_mega.eval.suite import evaluate_benchmarks
    from popo_mega.rewards.math import MathVerifier
    from popo_mega.rollout.engine import SamplingParams

    tokenizer = _load_tokenizer(args.tokenizer)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              stop_token_ids=stop_token_ids(tokenizer))
    benchmarks = _benchmarks(args)
    engine = _make_engine(args)
    try:
        with MathVerifier(num_workers=args.workers, deadline_s=args.deadline) as verifier:
            results = evaluate_benchmarks(engine, tokenizer, benchmarks, n=args.n, ks=args.k, sampling=sampling,
                                          verifier=verifier, template=args.template, system_prompt=args.system_prompt,
                                          batch_size=args.batch_size, keep_responses=args.keep_responses,
                                          log=lambda line: print(f"popo-eval: {line}", file=sys.stderr, flush=True))
    finally:
        engine.close()
    print(format_table(results))
    if args.out:
        out = {"args": {k: v for k, v in vars(args).items() if k != "api_key"},
               "results": {r.name: r.as_dict() for r in results}}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
