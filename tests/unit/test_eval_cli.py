"""popo-eval (popo_mega.eval.cli.main) end to end with a fake engine in place of the HTTP client:
real benchmark files, real templates, the real math-verify pool, JSON and table output. CPU; ~5 s."""

import json

import pytest

from popo_mega.data.benchmarks import load_math_set
from popo_mega.data.templates import encode_prompts
from popo_mega.eval import cli
from popo_mega.rewards.synthetic import TOKENIZER_DIR, SyntheticTask, load_tokenizer
from popo_mega.rollout.engine import Completion


class AnswerKeyEngine:
    """Knows each prompt's gold; answers sample j of problem i correctly iff plan(i, j)."""

    def __init__(self, keyed_golds, plan):
        self.tok = load_tokenizer()
        self.golds = keyed_golds  # {tuple(prompt ids): (problem index, gold)}
        self.plan = plan
        self.closed = False
        self.seen_sampling = []

    def generate(self, prompts, sampling, n=1):
        self.seen_sampling.append(sampling)
        out = []
        for ids in prompts:
            i, gold = self.golds[tuple(ids)]
            group = []
            for j in range(n):
                text = ("The answer is \\boxed{" + gold + "}.") if self.plan(i, j) else "I tried.\nI do not know the answer here."
                ids_out = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
                group.append(Completion(ids_out, [0.0] * len(ids_out), "stop"))
            out.append(group)
        return out

    def close(self):
        self.closed = True


def _keyed(names, template, limit):
    tok = load_tokenizer()
    keyed = {}
    for name in names:
        exs = load_math_set(name, limit=limit).examples
        for i, (ids, ex) in enumerate(zip(encode_prompts([e.question for e in exs], template, tok), exs)):
            keyed[tuple(ids)] = (i, ex.answer)
    return keyed


def test_cli_math_benchmarks_json_and_table(tmp_path, monkeypatch, capsys):
    plan = lambda i, j: (i + j) % 2 == 0 and i != 3  # noqa: E731  per problem: 1,1,1,0 correct of 2
    engine = AnswerKeyEngine(_keyed(["aime2025", "gsm8k"], "qwen-math", 4), plan)
    monkeypatch.setattr(cli, "_make_engine", lambda args: engine)
    out = tmp_path / "r" / "results.json"
    rc = cli.main(["--server-url", "http://127.0.0.1:1", "--tokenizer", TOKENIZER_DIR, "--benchmarks", "aime2025",
                   "gsm8k", "--n", "2", "--k", "1", "2", "--limit", "4", "--workers", "1", "--out", str(out)])
    assert rc == 0 and engine.closed
    res = json.loads(out.read_text())["results"]
    for name in ("aime2025", "gsm8k"):
        m = res[name]["metrics"]
        assert res[name]["n_problems"] == 4 and res[name]["n_samples"] == 2
        assert m["pass@1"] == pytest.approx(3 / 8) and m["avg@2"] == pytest.approx(3 / 8)
        assert m["pass@2"] == pytest.approx(3 / 4)  # 3 of 4 problems have a correct sample
        assert res[name]["grading"]["n"] == 8 and res[name]["grading"]["no_answer"] == 5
    assert res["aime2025"]["problems"][0]["gold"] == "70"
    stdout = capsys.readouterr().out
    rows = [line.split() for line in stdout.splitlines()]
    assert rows[0][:6] == ["benchmark", "problems", "n", "pass@1", "avg@2", "pass@2"]
    assert rows[2][:6] == ["aime2025", "4", "2", "37.5", "37.5", "75.0"]
    s = engine.seen_sampling[0]
    assert (s.temperature, s.top_p, s.max_new_tokens, s.stop_token_ids) == (0.6, 0.95, 3072, (2,))


def test_cli_synthetic_benchmark_uses_plain_prompts(monkeypatch, capsys):
    tok = load_tokenizer()
    held = SyntheticTask().examples("heldout")[:6]
    keyed = {tuple(tok.encode(e.question, add_special_tokens=False)): (i, e.answer) for i, e in enumerate(held)}

    class Exact(AnswerKeyEngine):
        def generate(self, prompts, sampling, n=1):
            out = []
            for ids in prompts:
                i, gold = self.golds[tuple(ids)]
                text = gold if i < 3 else str(int(gold) + 1)
                out.append([Completion(self.tok.encode(text, add_special_tokens=False) + [2], [0.0], "stop")] * n)
            return out

    monkeypatch.setattr(cli, "_make_engine", lambda args: Exact(keyed, None))
    assert cli.main(["--server-url", "u", "--tokenizer", TOKENIZER_DIR, "--benchmarks", "synthetic", "--limit", "6"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:5] == ["synthetic", "6", "1", "50.0", "50.0"]


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "--server-url" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--k \[4\]: each k must be between 1 and --n \(2\)"):
        cli.main(["--server-url", "u", "--tokenizer", TOKENIZER_DIR, "--n", "2", "--k", "4"])
    with pytest.raises(SystemExit) as e:
        cli.main(["--server-url", "u", "--tokenizer", TOKENIZER_DIR, "--benchmarks", "aime2030"])
    assert e.value.code == 2 and "aime2030" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a directory"):
        cli.main(["--server-url", "u", "--tokenizer", "/nonexistent/tok"])


def test_make_engine_is_the_http_client():
    http_engine = pytest.importorskip("popo_mega.rollout.http_engine")
    args = cli.build_parser().parse_args(["--server-url", "http://127.0.0.1:1", "http://127.0.0.1:2/",
                                          "--tokenizer", "t"])
    engine = cli._make_engine(args)
    try:
        assert isinstance(engine, http_engine.HttpEngine)
        assert engine.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    finally:
        engine.close()


def test_console_script_entry_dispatches_here(capsys):
    from popo_mega.cli import eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(["--help"])
    assert e.value.code == 0 and "popo-eval" in capsys.readouterr().out
