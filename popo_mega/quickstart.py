"""The CPU quickstart (README's first command): one POPO step's data path, end to end, on real parts.

Until the RL trainer lands (issue 5), this is the most complete thing that exists, and every stage
is the real component the trainer will use:

  1. a tiny Qwen2 HF checkpoint with the shipped character tokenizer (built here: nothing downloaded)
  2. the embedded SGLang-API rollout server (``popo-rollout-server``) in its own process, reached
     through the same HTTP client as real SGLang servers: G rollouts per synthetic problem
  3. verifiable rewards (synthetic arithmetic), the positive set and the bounded weights (Eq. P1)
  4. the Megatron model (megatron-core GPTModel on CPU/gloo) loaded from the same checkpoint; its
     token log-probs of the sampled responses are checked against the server's sampling log-probs
  5. the POPO objective (Eq. P2-P5) on the positives, and its gradient through Megatron

    python -m popo_mega.quickstart [--out runs/quickstart] [--prompts 16] [--group-size 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _log(msg: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base_checkpoint(out_dir: str, seed: int) -> str:
    """A tiny random Qwen2 (2 layers, hidden 64, GQA, QKV bias) over the shipped character tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from popo_mega.rewards.synthetic import TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = os.path.join(out_dir, "base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert os.path.isdir(TOKENIZER_DIR)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m popo_mega.quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    from popo_mega.algorithms.popo import popo_loss, popo_normalisers, positive_weights
    from popo_mega.model.logprobs import vocab_parallel_logprob_entropy
    from popo_mega.rewards.synthetic import SyntheticTask, load_tokenizer, score_batch
    from popo_mega.rollout.engine import SamplingParams
    from popo_mega.rollout.http_engine import HttpEngine
    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers

    _log("1/5 building a tiny Qwen2 checkpoint with the shipped synthetic tokenizer")
    base = build_base_checkpoint(args.out, args.seed)
    tok = load_tokenizer()
    task = SyntheticTask(seed=args.seed)
    problems = task.examples("train")[: args.prompts]
    prompt_ids = [tok(e.question, add_special_tokens=False)["input_ids"] for e in problems]

    _log("2/5 starting the embedded rollout server and sampling "
         f"{args.prompts} prompts x {args.group_size} rollouts")
    servers = launch_servers("embedded", base, num_servers=1, log_dir=args.out)
    try:
        engine = HttpEngine([s.url for s in servers], servers=servers)
        sampling = SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(tok.eos_token_id,))
        completions = engine.generate(prompt_ids, sampling, n=args.group_size)
    finally:
        stop_servers(servers)
    rollouts = [(i, c) for i, group in enumerate(completions) for c in group]

    _log("3/5 rewards, positive set and bounded weights (Eq. P1)")
    responses = [tok.decode(c.output_ids, skip_special_tokens=True) for _, c in rollouts]
    rewards = torch.tensor(score_batch(responses, [problems[i].answer for i, _ in rollouts]))
    positive = rewards > 0
    seq_logp = torch.tensor([sum(c.output_logprobs) / max(1, len(c.output_logprobs)) for _, c in rollouts])
    weights = positive_weights(seq_logp, positive, args.group_size)
    prompts_with_pos = int(positive.view(-1, args.group_size).any(dim=1).sum())
    print(f"  rollouts: {len(rollouts)}  positive: {int(positive.sum())}  "
          f"prompts with >= 1 positive: {prompts_with_pos}/{args.prompts}")
    for (i, c), r, text in list(zip(rollouts, rewards, responses))[:4]:
        print(f"  {problems[i].question!r:>10} -> {text!r:<10} reward {float(r):.0f}  "
              f"sum logp {sum(c.output_logprobs):+.3f}")

    _log("4/5 Megatron GPT model (megatron-core on CPU/gloo) from the same checkpoint")
    from popo_mega.config import ModelConfig
    from popo_mega.model.loader import build_from_hf
    from popo_mega.runtime import initialize, shutdown

    rt = initialize(1, 1, seed=args.seed, device="cpu")
    try:
        loaded = build_from_hf(ModelConfig(hf_path=base, dtype="float32"), rt)
        model, vocab = loaded.model, loaded.arch.vocab_size
        seqs = [prompt_ids[i] + c.output_ids for i, c in rollouts]
        lens = torch.tensor([len(s) for s in seqs])
        width = int(lens.max())
        tokens = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        pos = torch.arange(width).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, pos, None)[..., :vocab]  # TP=1: the padded vocab columns are dropped
        # Response token t is predicted from position t-1.
        rows, targets, seq_index = [], [], []
        for b, (i, c) in enumerate(rollouts):
            start = len(prompt_ids[i])
            for t in range(len(c.output_ids)):
                rows.append(logits[b, start + t - 1])
                targets.append(c.output_ids[t])
                seq_index.append(b)
        flat = torch.stack(rows)
        logp, entropy = vocab_parallel_logprob_entropy(flat, torch.tensor(targets))
        server_logp = torch.tensor([lp for _, c in rollouts for lp in c.output_logprobs])
        err = (logp.detach() - server_logp).abs().max().item()
        print(f"  trainer vs server log-probs of {len(targets)} sampled tokens: max |diff| = {err:.2e}")

        _log("5/5 POPO objective on the positives (Eq. P2-P5) and its gradient through Megatron")
        counts = torch.tensor([len(c.output_ids) for _, c in rollouts])
        cu = torch.zeros(len(rollouts) + 1, dtype=torch.long)
        cu[1:] = counts.cumsum(0)
        mask = torch.ones(len(targets))
        norms = popo_normalisers(mask, cu, weights, positive, entropy_on="positive")
        loss, parts = popo_loss(logp, mask, cu, weights, positive, num_positive_tokens=norms["num_positive_tokens"],
                                old_logp=server_logp, is_correction="token", entropy=entropy,
                                entropy_token_count=norms["entropy_token_count"], entropy_on="positive")
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
        print("  " + "  ".join(f"{k} {float(v.detach()):+.4f}" for k, v in parts.items() if torch.is_tensor(v) and v.dim() == 0))
        print(f"  total loss {float(loss):+.4f}  policy grad norm {float(grad_norm):.4f}")
        if err > 1e-3:
            print(f"quickstart: trainer and server log-probs disagree by {err:.2e}", file=sys.stderr)
            return 1
    finally:
        shutdown()
    _log(f"done in {time.time() - t0:.1f} s (the RL loop itself is issue 5: `popo-train` is not built yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
