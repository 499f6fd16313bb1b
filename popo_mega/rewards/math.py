"""Math answer grading with math-verify, in a process pool with a per-item deadline.

Public API
    score(response, gold) -> float                    one item, 1.0 or 0.0
    score_batch(responses, golds, ...) -> list[float] many items through a pool of worker processes
    score_batch_with_stats(...) -> (scores, ScoreStats)
    MathVerifier(num_workers, deadline_s)             a reusable pool (the trainer keeps one per run)

How one item is graded (``grade``): both texts get their unicode digits made ASCII
(``extract.normalize_unicode``); the gold is normalised (GSM8K ``####`` answer, unboxed, thousands
separators removed) and parsed as ``\\boxed{gold}``; the response's final answer is found by
``rewards/extract.py`` (a response ending inside an unclosed ``\\boxed{`` has none; else the last
``\\boxed{}``, ``####``, a short bare answer), else by math-verify on the whole text, else the last
number; then ``math_verify.verify(gold, prediction)``. Both sides are always parsed:
``verify("3", "3.0")`` on raw strings is False (environment.md).

A bad gold (counted in ``ScoreStats.bad_gold``, the item scores 0) is empty, has unbalanced braces,
or math-verify parses nothing from it. Braces are checked before parsing because math-verify's
``parse`` returns the raw string as a fallback even for ``\\boxed{\\frac{}``, and ``verify`` then
compares strings: ``"\\boxed{\\frac{}"`` scored 1.0 against the gold ``"\\frac{"`` (issue 15). A
balanced gold that parses only to that string fallback stays gradable by exact string: 8 of the 7,474
MATH-train golds (``30^\\circ.``, ``7\\text{ hours}.``, ``\\dfrac{1}{29,\\!322,\\!216}``) are such;
every MATH-500, AIME, AMC23 and GSM8K gold parses to an expression.

Deadline: ``grade`` keeps its own clock from its first line. Extraction is linear in the response's
length; before each math-verify phase (parse gold, parse the response, verify) the remaining time
bounds that phase's alarm, and an exhausted budget ends the item as a timeout. Alarms count whole
seconds, so in-process grading (``score`` on the main thread) ends within the deadline + 1 s; in the
pool the parent's kill at the deadline stays the hard limit.

Logs: on a timeout math-verify logs ``"Timeout during parsing: <the whole input>"`` as a warning
(2 MB of stderr from two hostile items); ``_math_verify`` installs a filter on its loggers that cuts
each message to ``LOG_MESSAGE_CHARS`` characters.

Why processes and not threads: math-verify's timeouts use ``signal.alarm``, which only works in a
process's main thread, and an alarm cannot interrupt one long C-level computation (a big-integer
power inside sympy). So each worker grades on its own main thread with math-verify's timeouts set
inside the item's deadline, and the parent kills and replaces a worker whose item passes the deadline
(``9^{9^{9^9}}`` and malformed LaTeX score 0 and are counted; nothing hangs the batch).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from multiprocessing.connection import wait as wait_connections
from typing import Callable, Sequence

from popo_mega.rewards.extract import braces_balanced, extract_answer, last_number, normalize_gold, normalize_unicode

DEFAULT_DEADLINE_S = 10.0
LOG_MESSAGE_CHARS = 300   # math-verify log messages are cut to this (they quote the whole input)
_MATH_VERIFY_LOGGERS = ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils",
                        "latex2sympy2_extended")

# statuses returned by grade(); "timeout" and "crash" are set by the pool
OK, NO_ANSWER, BAD_GOLD, ERROR, TIMEOUT, CRASH = "ok", "no_answer", "bad_gold", "error", "timeout", "crash"


@dataclass
class ScoreStats:
    """Counts over graded items. ``timeouts``: items past the deadline (killed by the pool, or out of
    time inside ``grade``); ``no_answer``: responses with no extractable answer (malformed, truncated,
    unclosed or empty box); ``bad_gold``: golds that are empty, have unbalanced braces or that
    math-verify cannot parse; ``errors``: exceptions inside the grader; ``crashes``: workers that died otherwise."""

    n: int = 0
    correct: int = 0
    timeouts: int = 0
    no_answer: int = 0
    bad_gold: int = 0
    errors: int = 0
    crashes: int = 0

    def count(self, score: float, status: str) -> None:
        self.n += 1
        self.correct += int(score > 0)
        key = {TIMEOUT: "timeouts", NO_ANSWER: "no_answer", BAD_GOLD: "bad_gold", ERROR: "errors", CRASH: "crashes"}.get(status)
        if key:
            setattr(self, key, getattr(self, key) + 1)

    def merge(self, other: "ScoreStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _CutLongMessages(logging.Filter):
    """Cuts a log record's message to LOG_MESSAGE_CHARS (math-verify quotes whole inputs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if len(msg) > LOG_MESSAGE_CHARS:
            record.msg = f"{msg[:LOG_MESSAGE_CHARS]}... [{len(msg)} characters, cut by popo_mega.rewards.math]"
            record.args = ()
        return True


_CUT_FILTER = _CutLongMessages()


def _math_verify():
    try:
        import math_verify
    except ImportError as e:  # pragma: no cover - declared in setup.py
        raise ImportError("popo_mega.rewards.math needs math-verify: pip install math-verify") from e
    # a logger's filters see only records logged on it (not its children's): add to each one
    names = set(_MATH_VERIFY_LOGGERS) | {n for n in logging.Logger.manager.loggerDict
                                         if n.startswith(("math_verify.", "latex2sympy2_extended."))}
    for name in names:
        logger = logging.getLogger(name)
        if _CUT_FILTER not in logger.filters:
            logger.addFilter(_CUT_FILTER)
    return math_verify


def _inner_timeout(deadline_s: float) -> int:
    """math-verify's own (integer, signal.alarm) timeout for each phase (parse gold, parse the response,
    verify). Half the item's deadline: one slow phase ends by itself; when several are slow the pool's
    kill at the deadline is the backstop. (A fifth of it, 1 s at a 6 s deadline, failed legitimate
    answers on a loaded 2-core machine.)"""
    return max(1, int(deadline_s // 2))


class _OutOfTime(Exception):
    """grade's own deadline passed between two math-verify phases."""


def grade(response: str, gold: str, deadline_s: float = DEFAULT_DEADLINE_S, _gold_cache: dict | None = None) -> tuple[float, str]:
    """(score, status) for one item, in the calling process, within about ``deadline_s`` (+1 s: alarms
    count whole seconds). Must run on a main thread (signal.alarm)."""
    end = time.monotonic() + deadline_s
    mv = _math_verify()
    t = _inner_timeout(deadline_s)

    def alarm_s() -> int:   # the next math-verify phase's timeout: half the deadline, at most what is left
        left = end - time.monotonic()
        if left <= 0:
            raise _OutOfTime
        return max(1, min(t, math.ceil(left)))

    try:
        gold_text = normalize_gold(normalize_unicode(str(gold)))
        gold_parsed = None if _gold_cache is None else _gold_cache.get(gold_text)
        if gold_parsed is None:
            ok = bool(gold_text) and braces_balanced(gold_text)
            gold_parsed = mv.parse("\\boxed{" + gold_text + "}", parsing_timeout=alarm_s()) if ok else []
            if _gold_cache is not None:
                if len(_gold_cache) > 4096:
                    _gold_cache.clear()
                _gold_cache[gold_text] = gold_parsed
        if not gold_parsed:
            return 0.0, BAD_GOLD
        response = normalize_unicode(str(response))
        answer, how = extract_answer(response)
        if how in ("boxed", "unclosed") and answer is None:  # an empty \boxed{}, or cut off inside one
            return 0.0, NO_ANSWER
        candidates = []  # parsed predictions, tried in order; the first that verifies wins
        if answer is not None:
            candidates.append(mv.parse("\\boxed{" + answer + "}", parsing_timeout=alarm_s()))
        if how in ("none", "short"):  # a short line may be prose ("the answer is 4"): let math-verify read it too
            free = mv.parse(response, parsing_timeout=alarm_s())
            if not free and how == "none":
                num = last_number(response)
                free = mv.parse("\\boxed{" + num + "}", parsing_timeout=alarm_s()) if num else []
            candidates.append(free)
        candidates = [c for c in candidates if c]
        if not candidates:
            return 0.0, NO_ANSWER
        for pred in candidates:
            if mv.verify(gold_parsed, pred, timeout_seconds=alarm_s()):
                return 1.0, OK
        return 0.0, OK
    except _OutOfTime:
        return 0.0, TIMEOUT


def score(response: str, gold: str, *, deadline_s: float = DEFAULT_DEADLINE_S) -> float:
    """1.0 when the response's final answer equals ``gold`` by math-verify, else 0.0.

    On the main thread it grades in this process (math-verify's alarms bound parse and verify);
    from any other thread it uses a one-worker ``MathVerifier`` (slow: prefer ``score_batch`` there).
    """
    if threading.current_thread() is threading.main_thread():
        try:
            return grade(response, gold, deadline_s)[0]
        except Exception:
            return 0.0
    with MathVerifier(num_workers=1, deadline_s=deadline_s) as v:
        return v.score_batch([response], [gold])[0]


# --------------------------------------------------------------------------------------------
# the pool


def _worker_main(conn, grade_fn: Callable, deadline_s: float) -> None:
    """Worker loop: announce readiness, then answer (idx, response, gold) with (idx, score, status)."""
    # a forked worker inherits the parent's handlers (a trainer's "checkpoint on SIGTERM"): drop them;
    # Ctrl-C is the parent's business, which then closes or kills its workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cache: dict = {}
    if grade_fn is grade:  # warm sympy/latex2sympy up before the first item's clock starts
        try:
            grade("\\boxed{\\frac{1}{2}}", "0.5", deadline_s, None)
        except Exception:
            pass
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, response, gold = msg
        try:
            if grade_fn is grade:
                s, status = grade(response, gold, deadline_s, cache)
            else:
                s, status = grade_fn(response, gold, deadline_s)
        except Exception:
            s, status = 0.0, ERROR
        conn.send((idx, float(s), status))


class _Worker:
    def __init__(self, ctx, grade_fn, deadline_s):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, grade_fn, deadline_s), daemon=True,
                                name="popo-math-verify")
        self.proc.start()
        child.close()
        self.ready = False
        self.job: int | None = None
        self.started = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
        finally:
            self.proc.join(timeout=5)
            self.conn.close()


class MathVerifier:
    """A pool of grading processes; ``score_batch`` grades many (response, gold) pairs.

    num_workers:   worker processes (each grades on its own main thread)
    deadline_s:    wall-clock budget per item from when a worker takes it; past it the worker is
                   killed, replaced, and the item scores 0 and counts as a timeout
    start_method:  multiprocessing start method. "fork" (default, as torch's DataLoader workers):
                   cheap replacements and no re-import of the caller's ``__main__`` (scripts without a
                   main guard, stdin, notebooks work); "forkserver" / "spawn" keep workers apart from
                   the parent's threads but need an importable ``__main__`` behind a main guard.
                   "forkserver" preloads this module and math-verify in the server, so a worker (a
                   replacement too) forks from that single-threaded server, cheaply, never from the
                   caller: the trainer uses it, whose replacements are made from the rollout
                   producer's thread (rollout.max_staleness >= 1) while gloo and HTTP threads run
    grade_fn:      (response, gold, deadline_s) -> (score, status); a module-level function
                   (defaults to ``grade``; tests inject a hanging one)
    ``stats`` accumulates ScoreStats over the verifier's life. Use as a context manager or call close().
    """

    def __init__(self, num_workers: int = 2, deadline_s: float = DEFAULT_DEADLINE_S,
                 start_method: str = "fork", grade_fn: Callable = grade):
        if num_workers < 1:
            raise ValueError(f"MathVerifier: num_workers must be >= 1, got {num_workers}")
        if deadline_s <= 0:
            raise ValueError(f"MathVerifier: deadline_s must be > 0, got {deadline_s}")
        if start_method not in mp.get_all_start_methods():
            raise ValueError(f"MathVerifier: start_method {start_method!r} not available here "
                             f"(have {mp.get_all_start_methods()})")
        self._ctx = mp.get_context(start_method)
        if start_method == "fork" and grade_fn is grade:
            _math_verify()  # import once here: forked workers inherit it instead of each importing it
        if start_method == "forkserver":  # takes effect when the server starts (the first such pool)
            self._ctx.set_forkserver_preload([__name__, "math_verify"])
        self.deadline_s = float(deadline_s)
        self.grade_fn = grade_fn
        self.stats = ScoreStats()
        self.restarts = 0
        self._boot_failures = 0  # consecutive workers that died before becoming ready
        self._workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.grade_fn, self.deadline_s)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = self._spawn()
        self.restarts += 1

    def score_batch_with_stats(self, responses: Sequence[str], golds: Sequence[str]) -> tuple[list[float], ScoreStats]:
        """Scores [N] (1.0 / 0.0) and the counts for this batch; items are graded concurrently."""
        if len(responses) != len(golds):
            raise ValueError(f"score_batch: {len(responses)} responses but {len(golds)} golds")
        if self._workers is None:
            raise RuntimeError("MathVerifier is closed")
        n = len(responses)
        scores = [0.0] * n
        batch = ScoreStats()
        todo = deque(range(n))
        done = 0
        # a worker that never becomes ready (broken interpreter) must not hang us either
        boot_s = max(60.0, 3 * self.deadline_s)
        boot_deadline = time.monotonic() + boot_s
        while done < n:
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.ready and w.job is None and todo:
                    job = todo.popleft()
                    try:
                        w.conn.send((job, str(responses[job]), str(golds[job])))
                    except OSError:  # died while idle (killed from outside): replace, retry the item
                        todo.appendleft(job)
                        self._replace(i)
                        continue
                    w.job, w.started = job, now
            conns = {w.conn: i for i, w in enumerate(self._workers)}
            waits = [w.started + self.deadline_s - now for w in self._workers if w.job is not None]
            timeout = max(0.0, min(waits)) if waits else 1.0
            for conn in wait_connections(list(conns), timeout=timeout):
                i = conns[conn]
                w = self._workers[i]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died
                    if not w.ready:
                        self._boot_failures += 1
                        if self._boot_failures > 3 * len(self._workers):
                            self.close()
                            raise RuntimeError(
                                f"MathVerifier: {self._boot_failures} grading workers died while starting "
                                f"(start method {self._ctx.get_start_method()!r}); is math-verify importable, "
                                "and is the caller's __main__ importable (spawn/forkserver need a main guard)?")
                    if w.job is not None:
                        batch.count(0.0, CRASH)
                        done += 1
                    self._replace(i)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    self._boot_failures = 0
                    continue
                idx, s, status = msg
                scores[idx] = s
                batch.count(s, status)
                done += 1
                w.job = None
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.job is not None and now - w.started > self.deadline_s:
                    batch.count(0.0, TIMEOUT)
                    done += 1
                    self._replace(i)
            if not any(w.ready for w in self._workers) and now > boot_deadline:
                self.close()
                raise RuntimeError(f"MathVerifier: no grading worker became ready within {boot_s:.0f} s; "
                                   "is math-verify importable in a fresh process?")
        self.stats.merge(batch)
        return scores, batch

    def score_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
        return self.score_batch_with_stats(responses, golds)[0]

    def close(self) -> None:
        if self._workers is None:
            return
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
            else:
                w.conn.close()
        self._workers = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def score_batch_with_stats(responses: Sequence[str], golds: Sequence[str], *, verifier: MathVerifier | None = None,
                           num_workers: int = 2, deadline_s: float = DEFAULT_DEADLINE_S) -> tuple[list[float], ScoreStats]:
    """Scores [N] and ScoreStats; uses ``verifier`` when given, else a temporary pool."""
    if verifier is not None:
        return verifier.score_batch_with_stats(responses, golds)
    with MathVerifier(num_workers=num_workers, deadline_s=deadline_s) as v:
        return v.score_batch_with_stats(responses, golds)


def score_batch(responses: Sequence[str], golds: Sequence[str], *, verifier: MathVerifier | None = None,
                num_workers: int = 2, deadline_s: float = DEFAULT_DEADLINE_S) -> list[float]:
    """Scores [N] (1.0 / 0.0) of responses against golds, graded in a process pool (see MathVerifier)."""
    return score_batch_with_stats(responses, golds, verifier=verifier, num_workers=num_workers,
                                  deadline_s=deadline_s)[0]
