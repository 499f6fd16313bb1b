"""popo_mega.rewards.math / extract: answer extraction, math-verify grading, the pool's deadline.

CPU only; about 10-15 s on 2 cores (a deterministic sample of MATH-500 plus all of AIME 2025)."""

import json
import os
import threading
import time

import pytest

from popo_mega.data.paths import shared_math_dir
from popo_mega.rewards import extract
from popo_mega.rewards.math import MathVerifier, ScoreStats, score, score_batch, score_batch_with_stats


# ------------------------------------------------------------------ extraction (pure strings)

def test_last_boxed_nested_and_last():
    assert extract.last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract.last_boxed(r"\boxed{\left(3, \frac{\pi}{2}\right)}") == r"\left(3, \frac{\pi}{2}\right)"
    assert extract.last_boxed(r"\fbox{7}") == "7"
    # an unclosed last box (truncated response) is no answer: no fall back to the earlier closed one (issue 15)
    assert extract.last_boxed(r"\boxed{5} and \boxed{\frac{1}{") is None
    assert extract.last_boxed("no box here") is None
    assert extract.last_boxed(r"\boxed{}") == ""


def test_gsm8k_and_last_number():
    assert extract.gsm8k_answer("so 3*4 = 12\n#### 1,450,000") == "1450000"
    assert extract.gsm8k_answer("no marker") is None
    assert extract.last_number("I had 3 apples, then 1,234.5 pears, so -7.") == "-7"
    assert extract.last_number("total 1,234.5") == "1234.5"
    assert extract.last_number("none") is None
    assert extract.strip_thousands("1,2") == "1,2"  # a tuple, not a thousands separator


def test_extract_answer_order():
    assert extract.extract_answer(r"#### 4 but \boxed{5}") == ("5", "boxed")
    assert extract.extract_answer("work\n#### 4") == ("4", "gsm8k")
    assert extract.extract_answer("3.0") == ("3.0", "short")
    assert extract.extract_answer("line one\n" * 3 + "the end")[1] == "none"
    assert extract.extract_answer(r"\boxed{}") == (None, "boxed")


def test_normalize_gold():
    assert extract.normalize_gold("Janet sells 9 eggs.\n#### 1,080") == "1080"
    assert extract.normalize_gold(r"\boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert extract.normalize_gold("$12$") == "12"
    assert extract.normalize_gold("27.0") == "27.0"


# ------------------------------------------------------------------ grading in this process

@pytest.mark.parametrize("response,gold,expected", [
    (r"The answer is $\boxed{3}$.", "3", 1.0),
    ("3.0", "3", 1.0),
    ("3", "3.0", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("She makes 9 * 2 = 18 dollars.\n#### 18", "#### 18", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("the answer is 4", "4", 1.0),
    (r"\boxed{4}", "3", 0.0),
    ("", "3", 0.0),
    (r"\boxed{}", "3", 0.0),
])
def test_score_examples(response, gold, expected):
    assert score(response, gold) == expected


def _math500_aime2025_golds():
    d = shared_math_dir()
    math500 = [json.loads(line)["answer"] for line in open(os.path.join(d, "math500.jsonl"))]
    aime = [json.loads(line)["answer"] for line in open(os.path.join(d, "aime2025.jsonl"))]
    assert len(math500) == 500 and len(aime) == 30
    return math500[::10] + aime  # every 10th MATH-500 answer (all subjects appear) and all of AIME 2025


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def test_golds_score_one_against_themselves_and_zero_when_wrong():
    golds = _math500_aime2025_golds()
    responses, refs, expected, labels = [], [], [], []

    def add(resp, gold, exp, label):
        responses.append(resp)
        refs.append(gold)
        expected.append(exp)
        labels.append(label)

    for g in golds:
        add("Working...\n\nSo the final answer is $\\boxed{" + g + "}$.", g, 1.0, "boxed")
        add("Therefore the answer is $" + g + "$.", g, 1.0, "dollar")
        add(g, g, 1.0, "plain")
        if _is_number(g):
            add(g + (".0" if "." not in g else "0"), g, 1.0, "float form")
            add("\\boxed{" + str(int(float(g)) + 1) + "}", g, 0.0, "off by one")
        else:
            add("\\boxed{" + g + " + 1}", g, 0.0, "gold + 1")
            add(r"\boxed{\frac{1}{7}+\sqrt{2}}", g, 0.0, "unrelated")
    with MathVerifier(num_workers=2, deadline_s=6) as v:
        scores, stats = v.score_batch_with_stats(responses, refs)
    wrong = [(lab, g, r, s) for lab, g, r, s, e in zip(labels, refs, responses, scores, expected) if s != e]
    assert not wrong, wrong[:10]
    assert stats.n == len(responses) and stats.timeouts == 0 and stats.bad_gold == 0
    assert stats.correct == sum(expected)


def test_pathological_and_malformed_return_within_deadline():
    deadline = 3.0
    bad = [r"\boxed{9^{9^{9^9}}}", r"\boxed{\frac{1}{", r"$$$\left(", r"\boxed{}", "", r"\boxed{10^{10^{10}}!}",
           "}" * 50 + "{" * 50]
    t0 = time.monotonic()
    with MathVerifier(num_workers=2, deadline_s=deadline) as v:
        scores, stats = v.score_batch_with_stats(bad + [r"\boxed{3}"], ["3"] * (len(bad) + 1))
    elapsed = time.monotonic() - t0
    assert scores == [0.0] * len(bad) + [1.0]
    assert stats.no_answer >= 3  # the empty box, the empty response, the unbalanced braces at least
    # 8 items on 2 workers: even if every bad item ran to its deadline, 4 rounds
    assert elapsed < 4 * deadline + 5, elapsed


# ------------------------------------------------------------------ the pool: kill, replace, count

def _grade_hang_or_die(response, gold, deadline_s):
    """Test grader (module level so workers can call it): "hang" never returns, "die" kills the worker."""
    if response == "hang":
        time.sleep(3600)
    if response == "die":
        os._exit(3)
    return (1.0 if response == gold else 0.0), "ok"


def test_stuck_worker_is_killed_and_replaced():
    v = MathVerifier(num_workers=2, deadline_s=1.0, grade_fn=_grade_hang_or_die)
    try:
        t0 = time.monotonic()
        scores, stats = v.score_batch_with_stats(["hang", "a", "hang", "b", "die", "c"], ["x", "a", "x", "z", "x", "c"])
        elapsed = time.monotonic() - t0
        assert scores == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        assert (stats.timeouts, stats.crashes, stats.correct, stats.n) == (2, 1, 2, 6)
        assert v.restarts == 3
        assert elapsed < 10, elapsed
        # the replaced workers keep working, and stats accumulate over batches
        assert v.score_batch(["q"], ["q"]) == [1.0]
        assert v.stats.n == 7 and v.stats.timeouts == 2
    finally:
        v.close()


def test_score_batch_temporary_pool_and_errors():
    scores, stats = score_batch_with_stats([r"\boxed{2}", "7"], ["2", "8"], num_workers=1, deadline_s=5)
    assert scores == [1.0, 0.0] and isinstance(stats, ScoreStats) and stats.n == 2
    assert score_batch([], [], num_workers=1) == []
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        score_batch(["1", "2"], ["1"], num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)


def test_score_from_a_thread_uses_a_process():
    out = []
    th = threading.Thread(target=lambda: out.append(score(r"\boxed{\frac{2}{4}}", "0.5", deadline_s=5)))
    th.start()
    th.join(60)
    assert out == [1.0]


def test_workers_do_not_run_the_parents_sigterm_handler(tmp_path):
    """A trainer's SIGTERM handler (e.g. "write a checkpoint") must not run inside grading workers."""
    import signal

    marker = tmp_path / "handler_ran"
    old = signal.signal(signal.SIGTERM, lambda *a: marker.write_text("x"))
    try:
        v = MathVerifier(num_workers=1, deadline_s=5)
        assert v.score_batch([r"\boxed{1}"], ["1"]) == [1.0]
        proc = v._workers[0].proc
        proc.terminate()
        proc.join(10)
        assert proc.exitcode == -signal.SIGTERM and not marker.exists()
        # the pool notices the dead worker, replaces it, and keeps grading
        assert v.score_batch([r"\boxed{2}"], ["2"]) == [1.0]
        v.close()
    finally:
        signal.signal(signal.SIGTERM, old)


def test_forkserver_pool_replaces_a_stuck_worker_from_a_thread_without_forking_the_caller():
    """The trainer's pool (start_method "forkserver"): workers, a replacement made from a non-main
    thread too, are children of the fork server, not of this (threaded) process, and grade."""
    v = MathVerifier(num_workers=1, deadline_s=1.0, start_method="forkserver", grade_fn=_grade_hang_or_die)
    out = {}
    try:
        first = v._workers[0].proc
        th = threading.Thread(target=lambda: out.update(r=v.score_batch_with_stats(["hang", "a"], ["x", "a"])))
        th.start()
        th.join(60)
        scores, stats = out["r"]
        assert scores == [0.0, 1.0] and stats.timeouts == 1 and v.restarts == 1
        replacement = v._workers[0].proc
        assert replacement.pid != first.pid
        with open(f"/proc/{replacement.pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
        assert parent != os.getpid()     # forked by the server, which this process started
        assert v.score_batch(["b"], ["b"]) == [1.0]
    finally:
        v.close()
    with MathVerifier(num_workers=1, deadline_s=10, start_method="forkserver") as real:  # math-verify itself
        assert real.score_batch([r"\boxed{\frac{2}{4}}", r"\boxed{3}"], ["0.5", "4"]) == [1.0, 0.0]
