"""Packing of rollouts into THD micro-batches: every expected tensor below is written out by hand
from the rules in popo_mega/train/batch.py's docstring (labels = next token, mask on positions
P-1..L-2, feature mask on P..L-1, positions restart per rollout)."""

import pytest
import torch

from popo_mega.train.batch import RolloutSample, pack_micro_batches, shard_for_data_parallel, token_multiple


def _samples():
    t = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    a = RolloutSample(t(11, 12, 13, 14, 15), 2, old_logp=torch.tensor([-.1, -.2, -.3]), weight=.6, positive=True)
    b = RolloutSample(t(21, 22, 23), 1, old_logp=torch.tensor([-.4, -.5]), advantage=-1.0)
    c = RolloutSample(t(31, 32, 33, 34, 35, 36, 37), 4, old_logp=torch.tensor([-.6, -.7, -.8]), weight=.4,
                      positive=True, token_advantages=torch.tensor([1., 2., 3.]))
    return [a, b, c]


def test_pack_by_hand():
    mbs = pack_micro_batches(_samples(), micro_batch_tokens=8)
    assert len(mbs) == 2  # A(5) + B(3) = 8 fits; C(7) starts a new micro-batch
    m0, m1 = mbs
    assert m0.tokens.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23]]
    assert m0.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert m0.labels.tolist() == [12, 13, 14, 15, 0, 22, 23, 0]
    assert m0.mask.tolist() == [0, 1, 1, 1, 0, 1, 1, 0]
    assert m0.feature_mask.tolist() == [0, 0, 1, 1, 1, 0, 1, 1]
    assert torch.allclose(m0.old_logp, torch.tensor([0, -.1, -.2, -.3, 0, -.4, -.5, 0]))
    assert m0.token_advantages.tolist() == [0, 0, 0, 0, 0, -1, -1, 0]
    assert m0.seq_index.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert m0.cu_seqlens.tolist() == [0, 5, 8]
    assert m0.packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 8]
    assert m0.packed_seq_params.cu_seqlens_q.dtype == torch.int32
    assert m0.packed_seq_params.qkv_format == "thd"
    assert m0.weights.tolist() == pytest.approx([.6, 0.])
    assert m0.positive.tolist() == [True, False]
    assert m0.sample_index.tolist() == [0, 1] and m0.uids.tolist() == [0, 1]
    assert m0.num_tokens == 8 and m1.num_tokens == 7
    assert m1.labels.tolist() == [32, 33, 34, 35, 36, 37, 0]
    assert m1.mask.tolist() == [0, 0, 0, 1, 1, 1, 0]
    assert m1.feature_mask.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert m1.token_advantages.tolist() == [0, 0, 0, 1, 2, 3, 0]
    assert m1.sample_index.tolist() == [2]


def test_common_length_padding_is_its_own_segment():
    m0, m1 = pack_micro_batches(_samples(), micro_batch_tokens=8, common_length=True)
    assert m0.padded_tokens == m1.padded_tokens == 8
    assert m1.tokens.tolist() == [[31, 32, 33, 34, 35, 36, 37, 0]]
    assert m1.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0]]
    assert m1.cu_seqlens.tolist() == [0, 7]                      # loss tensors cover real tokens only
    assert m1.packed_seq_params.cu_seqlens_q.tolist() == [0, 7, 8]  # padding attends only to itself
    assert m1.mask.shape == (7,)
    # pad_multiple rounds the common length up
    m0, m1 = pack_micro_batches(_samples(), micro_batch_tokens=8, common_length=True, pad_multiple=3)
    assert m0.padded_tokens == m1.padded_tokens == 9
    assert m0.packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 8, 9]


def test_boundaries_and_errors():
    # 7 tokens per micro-batch: A alone (B would make 8), then B, then C
    assert [m.sample_index.tolist() for m in pack_micro_batches(_samples(), 7)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="rollout 2 has 7 tokens"):
        pack_micro_batches(_samples(), 6)
    bad = RolloutSample(torch.tensor([1, 2, 3]), 3)
    with pytest.raises(ValueError, match="prompt_len"):
        pack_micro_batches([bad], 8)
    bad = RolloutSample(torch.tensor([1, 2, 3]), 1, old_logp=torch.zeros(3))
    with pytest.raises(ValueError, match=r"old_logp must be \[R\]=2"):
        pack_micro_batches([bad], 8)
    assert pack_micro_batches([], 8) == []


def test_data_parallel_shards():
    s = _samples()  # lengths 5, 3, 7: C -> rank 0 (7 tokens), A -> rank 1, B -> rank 1 (5 < 7)
    r0 = shard_for_data_parallel(s, 2, 0)
    r1 = shard_for_data_parallel(s, 2, 1)
    assert [x.tokens[0].item() for x in r0] == [31]
    assert [x.tokens[0].item() for x in r1] == [11, 21]
    assert [x.uid for x in r0] == [2] and [x.uid for x in r1] == [0, 1]
    assert pack_micro_batches(r1, 8)[0].uids.tolist() == [0, 1]


def test_token_multiple_for_sequence_parallel_and_fp8():
    assert token_multiple(1, False) == 1
    assert token_multiple(4, False) == 1                       # plain TP: every rank sees all tokens
    assert token_multiple(2, True) == 2 and token_multiple(8, True) == 8
    assert token_multiple(1, False, "delayed") == 16 and token_multiple(4, False, "tensorwise") == 16
    assert token_multiple(1, False, "mxfp8") == 32
    assert token_multiple(2, True, "delayed") == 32            # each rank's slice of 16 tokens
    assert token_multiple(4, True, "mxfp8") == 128
    with pytest.raises(ValueError, match="tp must be >= 1"):
        token_multiple(0, True)


def test_pad_multiple_pads_each_micro_batch_with_a_segment_outside_every_mask():
    plain = pack_micro_batches(_samples(), micro_batch_tokens=8)            # 8 and 7 real tokens
    # multiple 2 (SP at TP=2): 8 stays 8, 7 becomes 8
    m0, m1 = pack_micro_batches(_samples(), micro_batch_tokens=8, pad_multiple=2)
    assert (m0.padded_tokens, m1.padded_tokens) == (8, 8)
    assert m0.packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 8]          # no padding segment
    assert m1.tokens.tolist() == [[31, 32, 33, 34, 35, 36, 37, 0]]
    assert m1.packed_seq_params.cu_seqlens_q.tolist() == [0, 7, 8]
    # multiple 16 (FP8): both become 16; padding ids 0, positions restart, one attention segment
    m0, m1 = pack_micro_batches(_samples(), micro_batch_tokens=8, pad_multiple=16)
    assert (m0.padded_tokens, m1.padded_tokens) == (16, 16)
    assert m0.tokens.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23] + [0] * 8]
    assert m0.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert m0.packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 8, 16]
    assert m0.packed_seq_params.max_seqlen_q == 8
    assert m1.packed_seq_params.cu_seqlens_q.tolist() == [0, 7, 16] and m1.packed_seq_params.max_seqlen_q == 9
    # the padding enters no loss tensor: they cover the real tokens only and equal the unpadded pack's
    for got, ref in zip((m0, m1), plain):
        assert got.num_tokens == ref.num_tokens and got.cu_seqlens.tolist() == ref.cu_seqlens.tolist()
        for name in ("labels", "mask", "feature_mask", "old_logp", "token_advantages", "seq_index"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
    # with a common length (PP > 1) the multiple applies to that length
    assert [m.padded_tokens for m in pack_micro_batches(_samples(), 8, common_length=True, pad_multiple=16)] == [16, 16]
    with pytest.raises(ValueError, match="pad_multiple must be >= 1"):
        pack_micro_batches(_samples(), 8, pad_multiple=0)
