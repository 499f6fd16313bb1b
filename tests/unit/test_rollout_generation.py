"""Sampling and batched KV-cache generation of the embedded server, against independent formulas."""

import math

import pytest
import torch

from popo_mega.rollout.generation import SequenceRequest, generate_batch, sample_ids, sample_next


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
    """At block 1 (one id per block), row b takes the first token, in vocabulary order, whose
    cumulative kept mass exceeds u_b times the kept total. probs 0.15/0.5/0.05/0.3 -> cumulative 0.15/0.65/0.70/1.0; at top_p 0.6 the
    nucleus is {1, 3} (descending order 0.5, 0.3: the mass before 3 is 0.5 <= 0.6), cumulative 0.5/0.8."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None].repeat(7, 1)
    u = torch.tensor([0.1, 0.6, 0.68, 0.71, 0.99, 0.7, 0.3], dtype=torch.float64)
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.6, 0.6])
    tokens, _ = sample_next(logits, torch.ones(7), top_p, None, u, torch.zeros(7, dtype=torch.long), block=1)
    # row 5: 0.7 * 0.8 = 0.56 lies past 0.5, inside token 3's share; row 6: 0.3 * 0.8 = 0.24 < 0.5
    assert tokens.tolist() == [0, 1, 2, 3, 3, 3, 1]


def test_two_level_sampler_picks_the_block_by_hand_and_ids_by_their_weight():
    """Blocks of 4 over 11 ids (a partial last block), zero weights included: the block is the first
    whose float64 cumulative mass exceeds u times the total (searched by hand), the id is never of
    zero weight, and over many keys the ids inside one block come out in proportion to their weights."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(200, 11, generator=gen) * (torch.rand(200, 11, generator=gen) > 0.3)
    weights[:, 0] += 1e-3  # a positive total in every row
    u = torch.rand(200, generator=gen, dtype=torch.float64)
    u[:3] = torch.tensor([0.0, 1 - 1e-12, 0.5], dtype=torch.float64)
    got = sample_ids(weights, u, torch.arange(200), block=4)
    for b in range(200):
        row = weights[b].tolist()
        cum = [sum(row[:4]), sum(row[:8]), sum(row)]  # cumulative mass after each block
        target = u[b].item() * cum[-1]
        expect_block = next(i for i, c in enumerate(cum) if c > target)
        assert got[b].item() // 4 == expect_block and weights[b, got[b]] > 0
    # frequencies inside one block: weights 1, 2, 0, 5 (total 8) over ids 4..7, block 1 always chosen
    w = torch.tensor([[0.0, 0, 0, 0, 1, 2, 0, 5, 0, 0, 0]]).repeat(8000, 1)
    ids = sample_ids(w, torch.full((8000,), 0.5, dtype=torch.float64), torch.arange(8000), block=4)
    freq = torch.bincount(ids, minlength=11).double() / 8000
    assert freq[6] == 0 and freq[[0, 1, 2, 3, 8, 9, 10]].sum() == 0
    for i, p in ((4, 1 / 8), (5, 2 / 8), (7, 5 / 8)):  # 3 standard errors at n = 8000 are < 0.017
        assert freq[i].item() == pytest.approx(p, abs=0.02)


def test_nucleus_wider_than_the_first_partial_sort():
    """A flat-ish distribution over 1,000 ids needs a nucleus of hundreds of ids (the partial sort
    must widen past its first k); the mask equals the smallest sorted prefix reaching top_p."""
    from popo_mega.rollout.generation import NUCLEUS_FIRST_K, nucleus_mask

    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(3, 1000, generator=gen) * 0.1, dim=-1)
    top_p = torch.tensor([0.3, 0.9, 0.999])
    mask = nucleus_mask(probs, top_p)
    for b in range(3):
        order = sorted(range(1000), key=lambda i: -probs[b, i].item())
        mass, keep = 0.0, set()
        for i in order:
            if mass > top_p[b].item():
                break
            keep.add(i)
            mass += probs[b, i].item()
        assert set(mask[b].nonzero().squeeze(-1).tolist()) == keep
    assert mask[0].sum() > NUCLEUS_FIRST_K


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


def test_seeded_rows_do_not_depend_on_the_batch_at_a_real_vocabulary(real_qwen25_checkpoint):
    """At Qwen2.5's 151,936 ids the tail holds thousands of near-equal probabilities: a sampler whose
    CDF runs in sorted order picked other tokens for the same seed once padding changed the logits'
    last bits. Tokens must be equal alone and in company; log-probs to fp32 rounding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_qwen25_checkpoint.path, dtype=torch.float32).eval()
    prompt = [151644, 872, 198, 3838, 374, 220, 21, 353, 220, 22, 30, 151645, 198, 151644, 77091, 198]
    company = [[151644, 872, 198, 9707] * 6, [1879], list(range(100, 140))]

    def sample(seed, others=(), gen_seed=0):
        target = SequenceRequest(prompt=prompt, temperature=1.0, max_new_tokens=24, seed=seed)
        rest = [SequenceRequest(prompt=p, temperature=1.0, max_new_tokens=5) for p in others]
        generate_batch(model, [rest[0], target, *rest[1:]] if rest else [target], pad_token_id=151643,
                       eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(gen_seed),
                       device=torch.device("cpu"))
        return target.output_ids, target.output_logprobs

    for seed in (0, 1, 2, 3):  # the sorted-order sampler diverged for seeds 0, 2 and 3
        alone, lp_alone = sample(seed)
        crowded, lp_crowded = sample(seed, company, gen_seed=9)
        assert crowded == alone, seed
        assert torch.allclose(torch.tensor(lp_crowded), torch.tensor(lp_alone), atol=1e-4)


class _LogitsSpy:
    """Calls the model and records how many positions each forward returned logits for."""

    def __init__(self, model):
        self.model, self.positions = model, []

    def __call__(self, **kw):
        out = self.model(**kw)
        self.positions.append(out.logits.shape[1])
        return out


def test_prompt_logits_only_where_log_probs_were_asked(tmp_path):
    """Without prompt log-probs every forward returns logits at one position; with them, the values
    from ``logprob_start_len`` on equal a teacher-forcing pass (rows of different starts and lengths)."""
    model = _tiny_model(tmp_path)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [10, 11, 12], [13, 14]]
    spy = _LogitsSpy(model)
    generate_batch(spy, [SequenceRequest(prompt=p, max_new_tokens=3) for p in prompts], pad_token_id=0,
                   eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert spy.positions == [1, 1, 1]
    starts = [3, 0, -1, 5]  # the last one starts past its 2-token prompt: no prompt log-probs
    seqs = [SequenceRequest(prompt=p, max_new_tokens=2, logprob_start_len=s) for p, s in zip(prompts, starts)]
    spy = _LogitsSpy(model)
    generate_batch(spy, seqs, pad_token_id=0, eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(0),
                   device=torch.device("cpu"))
    assert spy.positions[0] < 9 and spy.positions[1:] == [1]
    for s, start in zip(seqs, starts):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([s.prompt])).logits[0].double(), dim=-1)
        every = [None] + logp[:-1].gather(-1, torch.tensor(s.prompt[1:])[:, None]).squeeze(-1).tolist()
        expect = every[start:] if start >= 0 else []
        assert len(s.input_logprobs) == len(expect)
        for got, ref in zip(s.input_logprobs, expect):
            assert (got is None and ref is None) or got == pytest.approx(ref, abs=2e-5)


def test_rows_join_and_leave_a_running_batch(tmp_path):
    """Sequences admitted after 2 and 5 decode steps, and rows that stop early on EOS, leave every
    other row as it would be alone: log-probs equal a teacher-forcing pass, seeded rows sample the
    same tokens as alone, and on_finish sees each sequence once, as it finishes."""
    model = _tiny_model(tmp_path, eos_token_id=None)
    cpu = torch.device("cpu")

    def seq(prompt, seed, n=8, stop=()):
        return SequenceRequest(prompt=prompt, temperature=1.0, max_new_tokens=n, seed=seed,
                               stop_token_ids=frozenset(stop))

    first = [seq([1, 2, 3], 1), seq([4, 5, 6, 7, 8, 9, 10, 11], 2, n=3), seq([12], 3, stop=range(0, 64, 3))]
    later = {2: [seq([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], 4), seq([31, 32], 5, n=0)],
             5: [seq([40, 41], 6, n=4)]}
    asked, done = [], []

    def admit(step):
        asked.append(step)
        return later.get(step, [])

    generate_batch(model, first, pad_token_id=0, eos_token_ids=frozenset(), generator=None, device=cpu,
                   admit=admit, on_finish=done.append)
    everyone = first + later[2] + later[5]
    assert sorted(map(id, done)) == sorted(map(id, everyone)) and len(done) == len(everyone)
    assert asked[:5] == [1, 2, 3, 4, 5]
    assert later[2][1].output_ids == [] and later[2][1].finish == ("length", 0)
    for s in everyone:
        if s.max_new_tokens == 0:
            continue
        ids = torch.tensor([s.prompt + s.output_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        p = len(s.prompt)
        ref = lp[p - 1:-1].gather(-1, ids[0, p:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.output_logprobs, dtype=torch.float64), ref, atol=2e-5)
        alone = seq(s.prompt, s.seed, s.max_new_tokens, s.stop_token_ids)
        generate_batch(model, [alone], pad_token_id=0, eos_token_ids=frozenset(), generator=None, device=cpu)
        assert alone.output_ids == s.output_ids
    assert len(first[2].output_ids) < 8 and first[2].finish[0] == "stop"  # left early (a third of ids stop it)
