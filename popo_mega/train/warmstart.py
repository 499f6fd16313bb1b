"""A supervised warm start for the CPU quickstart: a tiny Qwen2 over the shipped character tokenizer,
trained on the synthetic task's train split until its held-out greedy accuracy first enters
[low, high] (default 25-55%), so RL starts from a base that gets some positives (POPO learns only
from positives) but leaves the gain to RL (issue 5: at most 60% at the start of RL).

Plain transformers + torch AdamW on one process: this is data preparation, not the product path.
"""

from __future__ import annotations

import random
import time

import torch


def build_tiny_qwen2(tokenizer, hidden: int = 128, layers: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _batch(tokenizer, pairs):
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    seqs, plen = [], []
    for p, a in pairs:
        q = enc(p)
        seqs.append(q + enc(a) + [tokenizer.eos_token_id])
        plen.append(len(q))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, plen[i]:len(s)] = torch.tensor(s[plen[i]:])
    return ids, labels


@torch.no_grad()
def greedy_accuracy(model, tokenizer, examples, max_new_tokens: int = 5) -> float:
    from popo_mega.rewards.synthetic import score

    enc = [tokenizer(e.question, add_special_tokens=False)["input_ids"] for e in examples]
    width = max(map(len, enc))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(q)) + q for q in enc])
    model.eval()
    out = model.generate(ids, attention_mask=(ids != tokenizer.pad_token_id).long(), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train()
    texts = [tokenizer.decode(o[width:], skip_special_tokens=True) for o in out]
    return sum(score(t, e.answer) for t, e in zip(texts, examples)) / len(examples)


def warm_start(task, out_dir: str, *, low: float = 0.25, high: float = 0.55, hidden: int = 128, layers: int = 2,
               lr: float = 3e-3, batch_size: int = 64, eval_every: int = 25, max_steps: int = 4000,
               eval_problems: int = 200, seed: int = 0, log=print) -> float:
    """Train until held-out accuracy reaches ``low``; save the best checkpoint whose accuracy is at
    most ``high`` (a jump past ``high`` between two checks falls back to the previous snapshot);
    return its accuracy."""
    from popo_mega.rewards.synthetic import load_tokenizer

    tok = load_tokenizer()
    model = build_tiny_qwen2(tok, hidden, layers, seed)
    pairs = task.sft_pairs("train")
    probe = task.examples("heldout")[:eval_problems]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    t0 = time.time()
    best_acc, best_state = -1.0, None   # the best snapshot at or below ``high``
    for step in range(1, max_steps + 1):
        ids, labels = _batch(tok, rng.sample(pairs, min(batch_size, len(pairs))))
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0:
            acc = greedy_accuracy(model, tok, probe)
            log(f"[warm-start] step {step} loss {loss.item():.3f} held-out accuracy {100 * acc:.1f}% "
                f"({time.time() - t0:.0f} s)")
            if best_acc < acc <= high:
                best_acc, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
            if acc >= low:  # in the window, or past it (then the best snapshot below the cap is used)
                break
    if best_state is None:
        raise RuntimeError(f"warm start: no held-out check at or below {100 * high:.0f}% (eval_every={eval_every})")
    model.load_state_dict(best_state)
    acc = best_acc
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return acc
