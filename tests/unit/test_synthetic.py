"""popo_mega.rewards.synthetic and the shipped character tokenizer. CPU; ~2 s."""

import os
import random

import pytest

from popo_mega.assets import build_synthetic_tokenizer as build
from popo_mega.rewards import synthetic
from popo_mega.rewards.synthetic import Problem, SyntheticTask


def test_problem_text_and_gold():
    assert Problem(23, "+", 45).prompt == "23+45=" and Problem(23, "+", 45).gold == "68"
    assert Problem(23, "-", 45).gold == "-22"
    assert Problem(7, "*", 8).gold == "56"
    # fixed width: operands to `width` digits, answers to the widest answer of the op
    assert (Problem(7, "+", 45, 2).prompt, Problem(7, "+", 45, 2).gold) == ("07+45=", "052")
    assert Problem(99, "+", 99, 2).gold == "198"
    assert (Problem(3, "-", 45, 2).gold, Problem(45, "-", 3, 2).gold) == ("-42", "42")
    assert (Problem(7, "*", 8, 2).gold, Problem(3, "-", 3, 2).gold) == ("0056", "00")


def test_default_task_is_fixed_width_addition():
    task = SyntheticTask()
    train, held = task.splits()
    assert len(train) + len(held) == 100 * 100 and len(held) == 500
    for p in held[:50] + train[:50]:
        assert len(p.prompt) == 6 and p.prompt[2] == "+" and p.prompt.endswith("=") and len(p.gold) == 3
        assert int(p.gold) == int(p.prompt[:2]) + int(p.prompt[3:5])


def test_splits_are_deterministic_disjoint_and_complete():
    task = SyntheticTask(seed=3, ops=("+", "-"), fixed_width=False)
    train, held = task.splits()
    assert len(held) == 500 and len(train) == 2 * 100 * 100 - 500
    assert not set(train) & set(held)
    assert set(train) | set(held) == {Problem(a, op, b) for op in "+-" for a in range(100) for b in range(100)}
    assert task.splits() == SyntheticTask(seed=3, ops=("+", "-"), fixed_width=False).splits()
    assert SyntheticTask(seed=4, ops=("+", "-"), fixed_width=False).splits()[1] != held
    # every gold checked against Python arithmetic on a sample
    for p in random.Random(0).sample(held, 50):
        assert int(p.gold) == (p.a + p.b if p.op == "+" else p.a - p.b)


def test_examples_and_sft_pairs():
    task = SyntheticTask(max_operand=9, ops=("+",), n_heldout=10, seed=0)
    held = task.examples("heldout")
    assert len(held) == 10 and all(int(e.answer) == int(e.question[0]) + int(e.question[2]) for e in held)
    pairs = task.sft_pairs("train")
    assert len(pairs) == 90 and all(q.endswith("=") and len(a) == 2 and int(a) == int(q[0]) + int(q[2]) for q, a in pairs)
    assert {q for q, _ in pairs}.isdisjoint(e.question for e in held)
    with pytest.raises(ValueError, match="split must be"):
        task.examples("test")


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="ops must be"):
        SyntheticTask(ops=("/",))
    with pytest.raises(ValueError, match="n_heldout must be in 1..99"):
        SyntheticTask(max_operand=9, ops=("+",), n_heldout=100)


@pytest.mark.parametrize("response,gold,expected", [
    ("68", "68", 1.0), (" 68\n", "68", 1.0), ("68<eos>junk", "68", 1.0), ("-22", "-22", 1.0), ("052", "052", 1.0),
    ("22", "-22", 0.0), ("68 ", "69", 0.0), ("6 8", "68", 0.0), ("", "68", 0.0), ("68\n12", "68", 0.0),
    ("68.0", "68", 0.0), ("x68", "68", 0.0), ("12\n68", "68", 0.0), ("52", "052", 0.0), ("0052", "052", 0.0),
    ("053", "052", 0.0), ("-00", "00", 0.0),
])
def test_score_is_exact_match(response, gold, expected):
    assert synthetic.score(response, gold) == expected


def test_score_batch_and_bad_gold():
    assert synthetic.score_batch(["1", "2", "x"], ["1", "3", "4"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="gold must be an integer"):
        synthetic.score("1", "one")
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        synthetic.score_batch(["1", "2"], ["1"])


def test_shipped_tokenizer_is_character_level_and_round_trips():
    tok = synthetic.load_tokenizer()
    assert len(tok) == 100 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for p in SyntheticTask().splits()[1][:20]:
        ids = tok.encode(p.prompt + p.gold, add_special_tokens=False)
        assert len(ids) == len(p.prompt + p.gold)
        assert tok.decode(ids) == p.prompt + p.gold
        # a generated answer followed by EOS decodes to the answer
        assert synthetic.score(tok.decode(tok.encode(p.gold, add_special_tokens=False) + [2], skip_special_tokens=True), p.gold) == 1.0
    assert tok.decode(tok.encode("é", add_special_tokens=False)) == "<unk>"


def test_regenerating_the_tokenizer_gives_the_shipped_files(tmp_path):
    out = build.build(str(tmp_path / "tok"))
    import json
    for name in ("tokenizer.json", "tokenizer_config.json"):
        a = json.load(open(os.path.join(out, name)))
        b = json.load(open(os.path.join(synthetic.TOKENIZER_DIR, name)))
        assert a == b, name
