"""GPU + Transformer Engine: the TE layer spec on PACKED sequences (THD, PackedSeqParams) equals HF
run on each sequence alone, at TP=1 in bf16. Skipped without CUDA or without TE.

Packing is how the trainer feeds rollouts (popo_mega.train.batch): tokens [1, T] of several
rollouts, position ids restarting at 0, cu_seqlens giving the attention segments. A segment that
attended across its boundary, or position ids that did not restart, would change its logits by
O(1). Tolerance as in test_model_parity_cuda.py: Megatron-bf16's distance from HF-fp32 is at most
2x HF-bf16's own distance plus one bf16 step of the logit scale.
"""

import pytest
import torch

from tests.multiprocess import run_world
from tests.tiny_models import qwen2_config, save_tiny


def _te_available() -> bool:
    try:
        from popo_mega.model.builder import transformer_engine_available
        return transformer_engine_available()
    except ImportError:
        return False


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(torch.cuda.is_available() and not _te_available(),
                                 reason="Transformer Engine (and megatron's TE extension) not importable")]

LENGTHS = [37, 64, 5, 22]   # uneven, one short rollout


def _te_packed_logits(rank, world_size, path, seqs):
    from megatron.core.packed_seq_params import PackedSeqParams

    from popo_mega.config import ModelConfig
    from popo_mega.model.forward import forward_only
    from popo_mega.model.loader import build_from_hf, gather_vocab
    from popo_mega.runtime import initialize

    rt = initialize(1, 1, seed=0, device="cuda")
    loaded = build_from_hf(ModelConfig(hf_path=path, dtype="bfloat16", transformer_impl="transformer_engine"), rt)
    assert "TE" in type(loaded.model.decoder.layers[0].self_attention.linear_qkv).__name__, \
        "the TE layer spec was not selected"
    tokens = torch.cat(seqs)[None].cuda()
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None].cuda()
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32).cuda()
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max(map(len, seqs)), max_seqlen_kv=max(map(len, seqs)))
    out = forward_only(loaded.model, [{"tokens": tokens, "position_ids": pos, "packed_seq_params": psp}],
                       lambda o, b: gather_vocab(o, loaded.arch.vocab_size).float().cpu())
    return out[0].reshape(-1, loaded.arch.vocab_size)


def test_te_spec_on_packed_sequences_equals_hf_per_sequence(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = qwen2_config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=1000)
    save_tiny(cfg, tmp_path / "m", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g) for n in LENGTHS]
    with torch.no_grad():
        fp32_m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).cuda()
        bf16_m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).cuda()
        fp32 = torch.cat([fp32_m(s[None].cuda()).logits[0].cpu() for s in seqs])
        bf16 = torch.cat([bf16_m(s[None].cuda()).logits[0].float().cpu() for s in seqs])
    mega = run_world(_te_packed_logits, 1, str(tmp_path / "m"), seqs)[0]
    assert mega.shape == fp32.shape
    hf_err = (bf16 - fp32).abs().max().item()
    step = fp32.abs().max().item() * 2.0 ** -8
    ends = torch.tensor(LENGTHS).cumsum(0)
    for i, (lo, hi) in enumerate(zip([0] + ends[:-1].tolist(), ends.tolist())):
        err = (mega[lo:hi] - fp32[lo:hi]).abs().max().item()
        assert err <= 2 * hf_err + step, f"sequence {i}: |TE packed - HF fp32| = {err:.4f} > 2 x {hf_err:.4f} + {step:.4f}"
