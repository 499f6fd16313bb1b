"""Sampling and batched KV-cache generation of the embedded server, against independent formulas."""

import math

import pytest
import torch

from popo_mega.rollout.generation import SequenceRequest, generate_batch, sample_next


def _logsoftmax64(row, temperature):
    """log softmax by hand in float64: z/T - log(sum(exp(z/T)))."""
    z = [float(v) / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def test_greedy_and_temperature_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(3, 11) * 3
    temperature = torch.tensor([0.0, 1.0, 0.5])
    gen = torch.Generator().manual_seed(1)
    tokens, logps = sample_next(logits, temperature, torch.ones(3), gen)
    assert tokens[0] == logits[0].argmax()
    for i, t in enumerate([1.0, 1.0, 0.5]):  # greedy rows report log_softmax(logits) (T=1), as SGLang
        assert logps[i].item() == pytest.approx(_logsoftmax64(logits[i].tolist(), t)[tokens[i]], abs=1e-5)


def test_top_p_keeps_the_nucleus_and_reports_untruncated_logprob():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(4000, 1)
    gen = torch.Generator().manual_seed(2)
    tokens, logps = sample_next(logits, torch.ones(4000), torch.full((4000,), 0.6), gen)
    counts = torch.bincount(tokens, minlength=4).double() / 4000
    assert counts[2] == 0 and counts[3] == 0  # outside the 0.6 nucleus {0, 1}
    assert counts[0].item() == pytest.approx(0.5 / 0.8, abs=0.03)
    # the returned log-prob is the full-vocabulary one (before truncation)
    assert torch.allclose(logps, probs.log()[tokens], atol=1e-6)


def _tiny_model(tmp_path, **kw):
    from transformers import AutoModelForCausalLM

    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    path = save_tiny_qwen2(str(tmp_path), **kw)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_batched_generation_matches_teacher_forcing(tmp_path):
    model = _tiny_model(tmp_path)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [10, 11, 12]]
    seqs = [SequenceRequest(prompt=p, temperature=t, max_new_tokens=m, logprob_start_len=0)
            for p, t, m in zip(prompts, [1.0, 0.8, 0.0], [9, 4, 6])]
    generate_batch(model, seqs, pad_token_id=0, eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(0),
                   device=torch.device("cpu"))
    for s in seqs:
        assert len(s.output_ids) == s.max_new_tokens and s.finish == ("length", s.max_new_tokens)
        ids = torch.tensor([s.prompt + s.output_ids])
        with torch.no_grad():  # one unpadded forward of prompt + response, no cache
            logits = model(ids).logits[0].double()
        scale = s.temperature if s.temperature > 0 else 1.0
        lp = torch.log_softmax(logits / scale, dim=-1)
        p = len(s.prompt)
        ref = lp[p - 1:-1].gather(-1, ids[0, p:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.output_logprobs, dtype=torch.float64), ref, atol=2e-5)
        if s.temperature == 0:
            assert s.output_ids == logits[p - 1:-1].argmax(-1).tolist()
        ref_in = torch.log_softmax(logits, -1)[: p - 1].gather(-1, ids[0, 1:p, None]).squeeze(-1)
        assert s.input_logprobs[0] is None
        assert torch.allclose(torch.tensor(s.input_logprobs[1:], dtype=torch.float64), ref_in, atol=2e-5)


def test_stop_tokens_end_a_sequence_and_are_kept(tmp_path):
    model = _tiny_model(tmp_path)
    probe = SequenceRequest(prompt=[1, 2, 3], temperature=0.0, max_new_tokens=5)
    generate_batch(model, [probe], pad_token_id=0, eos_token_ids=frozenset(), generator=None, device=torch.device("cpu"))
    stop = probe.output_ids[2]  # greedy is deterministic: the third token will come again
    first = probe.output_ids.index(stop)
    again = SequenceRequest(prompt=[1, 2, 3], temperature=0.0, max_new_tokens=5, stop_token_ids=frozenset([stop]))
    eos = SequenceRequest(prompt=[1, 2, 3], temperature=0.0, max_new_tokens=5)
    generate_batch(model, [again], pad_token_id=0, eos_token_ids=frozenset(), generator=None, device=torch.device("cpu"))
    generate_batch(model, [eos], pad_token_id=0, eos_token_ids=frozenset([stop]), generator=None, device=torch.device("cpu"))
    for s in (again, eos):
        assert s.output_ids == probe.output_ids[: first + 1] and s.finish == ("stop", stop)


def test_inverse_cdf_picks_by_hand():
    """Row b takes the first token (by descending probability) whose cumulative kept mass exceeds
    u_b times the kept total. probs 0.5/0.3/0.15/0.05 -> cumulative 0.5/0.8/0.95/1.0."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted order: token 1, 3, 0, 2
    logits = probs.log()[None].repeat(6, 1)
    u = torch.tensor([0.1, 0.49, 0.51, 0.9, 0.99, 0.7], dtype=torch.float64)
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.6])  # the last row keeps {1, 3} (mass 0.8)
    tokens, _ = sample_next(logits, torch.ones(6), top_p, None, u)
    # row 5: 0.7 * 0.8 = 0.56 lies past 0.5, inside token 3's share of the nucleus
    assert tokens.tolist() == [1, 1, 3, 0, 2, 3]


def test_seeded_rows_do_not_depend_on_the_batch(tmp_path):
    """A request with a sampling seed samples the same tokens alone, in a batch with other prompts
    (other padding), and after the server's generator has moved on; another seed samples otherwise."""
    model = _tiny_model(tmp_path)
    cpu = torch.device("cpu")

    def sample(seed, company=(), gen_seed=0):
        target = SequenceRequest(prompt=[4, 5, 6], temperature=1.0, max_new_tokens=12, seed=seed)
        others = [SequenceRequest(prompt=p, temperature=1.0, max_new_tokens=7) for p in company]
        generate_batch(model, [*others, target], pad_token_id=0, eos_token_ids=frozenset(),
                       generator=torch.Generator().manual_seed(gen_seed), device=cpu)
        return target.output_ids, target.output_logprobs

    alone, lp_alone = sample(11)
    crowded, lp_crowded = sample(11, company=([1, 2, 3, 4, 5, 6, 7, 8, 9], [9]), gen_seed=5)
    assert crowded == alone
    assert torch.allclose(torch.tensor(lp_crowded), torch.tensor(lp_alone), atol=1e-5)
    assert sample(12)[0] != alone  # 12 tokens over 64 ids from a random model: equal by chance ~never
