"""Training metrics: one JSON line per step, TensorBoard scalars and a console progress line.

    logger = MetricsLogger(run_dir, total_steps=cfg.train.steps, rank=rank, resume_step=start)
    for step in range(start, total + 1):
        ...
        logger.log(step, {"reward": r, "positive_rate": p, "loss": l}, rollouts=n, tokens=t)
    logger.close()
    records = read_metrics(run_dir)            # what popo-report plots

Canonical metric keys (the trainer logs these names, ``popo-report`` plots them; other keys are
accepted and stored too, so a new statistic needs no change here):

    reward                 mean verifier reward of the step's rollouts
    positive_rate          fraction of rollouts with a positive reward
    prompts_with_positive  fraction of prompts with at least one positive rollout (POPO skips
                           the others and the trainer counts them)
    entropy                mean token entropy of the policy on the tokens it was trained on
    similarity             POPO's siamese similarity term L_sim (Eq. P3 in docs/algorithms.md)
    response_length        mean response length in tokens
    loss                   the policy loss of the step (Eq. P5 for POPO; GRPO/A3PO surrogate)
    kl_ema                 KL between the policy and the EMA target model
    clip_fraction          fraction of tokens whose ratio was clipped (GRPO/A3PO)
    heldout_accuracy       accuracy on the held-out set (logged on eval steps only), of the model
                           ``eval.model`` names (the online policy by default)
    heldout_accuracy_served  the same for the served EMA, when the policy is evaluated and the
                           engine serves the EMA (``rollout.weights: ema``)

Other keys the loop logs include ``prompts_too_long`` (and ``prompts_too_long/<file>``) and
``bad_records_skipped`` (start-up metrics, in the first record), the selection's
``prompts_skipped`` and, with dynamic sampling, ``refill_rounds`` / ``refill_prompts`` /
``informative_unused`` / ``informative_shortfall`` (popo_mega/train/refill.py).

Conventions.
- ``step`` is 1-based: ``log(step, ...)`` is called after optimizer step ``step`` of
  ``total_steps`` has finished, so ``total_steps - step`` steps remain. Steps must increase.
- A record is ``{"step", "wall_time" (unix s), "elapsed_s", "step_time_s", "rollouts",
  "tokens", "rollouts_per_s", "tokens_per_s", <metrics>}``. ``elapsed_s`` is training time:
  after a resume it continues from the last kept record, so the time axis has no crash gap.
- Non-finite values are written as they are (Python's json writes ``NaN`` / ``Infinity``, which
  ``read_metrics`` and ``json.loads`` read back) and flagged on the console line; the run never
  hides a NaN behind a number.
- Resume: ``MetricsLogger(..., resume_step=k)`` keeps the lines of an existing metrics.jsonl with
  ``step < k`` (``k`` is the first step the resumed run logs, i.e. the checkpoint's completed
  steps + 1), so the file stays monotonic after a crash; TensorBoard events at ``step >= k`` are
  purged likewise (``SummaryWriter(purge_step=k)``). Without ``resume_step`` an existing
  non-empty metrics.jsonl is an error (a new run would otherwise mix with an old one).
- The JSONL line is flushed after every step, so a killed run loses at most the line it was
  writing; ``read_metrics`` skips such a truncated last line with a warning.
- ETA = (mean of the last ``eta_window`` step times) x (``total_steps - step``); a step's time is
  measured from the previous ``log`` call (the first from the logger's construction).
- Only ``rank == 0`` writes anything; other ranks' loggers are no-ops, so the trainer can call
  ``log`` on every rank after reducing its statistics.
- The console line is printed every ``console_interval`` steps (``train.log_interval``), at the
  last step, and at any step with a non-finite metric; metrics.jsonl and TensorBoard still get
  every step.
- ``startup_metrics`` (counts known before training, e.g. the prompts left out for being longer
  than ``data.max_prompt_tokens``) are added to the first record this logger writes: after a
  resume they are recorded again at the resumed run's first step.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, TextIO

CANONICAL_KEYS = (
    "reward",
    "positive_rate",
    "prompts_with_positive",
    "entropy",
    "similarity",
    "response_length",
    "loss",
    "kl_ema",
    "clip_fraction",
    "heldout_accuracy",
    "heldout_accuracy_served",
)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# Keys every record carries besides the metrics; a metric may not use these names, except
# "rollouts" / "tokens" when equal to log()'s arguments of the same name.
RESERVED_KEYS = ("step", "wall_time", "elapsed_s", "step_time_s", "rollouts", "tokens",
                 "rollouts_per_s", "tokens_per_s")

# The console line shows these metrics, in this order, under these short names.
_CONSOLE = (("reward", "reward"), ("positive_rate", "pos"), ("entropy", "entropy"),
            ("loss", "loss"))


def metrics_path(run_dir: str | os.PathLike) -> Path:
    """run_dir/metrics.jsonl; a path that is itself a .jsonl file is returned as is."""
    p = Path(run_dir)
    return p if p.suffix == ".jsonl" else p / METRICS_FILE


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded); ``?`` for a non-finite or negative duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)  # nan, inf, -inf
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.4g}"


def format_progress(step: int, total_steps: int, metrics: dict[str, float], *,
                    rollouts_per_s: float, tokens_per_s: float, eta_s: float) -> str:
    """The console progress line, e.g.

    ``step 3/10 | 2.50 rollouts/s | 1200.0 tokens/s | reward 0.5 | pos 0.25 | entropy 1.234 |
    loss -0.0123 | ETA 0:00:14``

    Rates print with 2 / 1 decimals; metrics with 4 significant digits (scientific notation
    below 1e-3 or from 1e5 in magnitude). Metrics absent from ``metrics`` are left out; any non-finite value among ``metrics`` appends
    ``| NON-FINITE: key1, key2``."""
    parts = [f"step {step}/{total_steps}", f"{rollouts_per_s:.2f} rollouts/s",
             f"{tokens_per_s:.1f} tokens/s"]
    parts += [f"{short} {_fmt(metrics[key])}" for key, short in _CONSOLE if key in metrics]
    parts.append(f"ETA {format_duration(eta_s)}")
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        parts.append("NON-FINITE: " + ", ".join(bad))
    return " | ".join(parts)


def _check_metrics(metrics: dict) -> dict[str, float]:
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"metric names must be non-empty strings, got {k!r}")
        if k in RESERVED_KEYS and k not in ("rollouts", "tokens"):
            raise ValueError(f"metric name {k!r} is reserved (record fields: {', '.join(RESERVED_KEYS)})")
        if isinstance(v, (str, bytes)) or isinstance(v, bool):
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__} {v!r}")
        try:
            out[k] = float(v)  # also a 1-element tensor / numpy scalar
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__}: {e}") from None
    return out


class MetricsLogger:
    """Per-step metrics to run_dir/metrics.jsonl, run_dir/tb (TensorBoard) and the console.

    See the module docstring for the record format, step convention, resume and ETA rules.

    Args:
        run_dir: the run directory (created if missing).
        total_steps: steps of the whole run (for ``step/total`` and the ETA).
        tensorboard: write TensorBoard scalars under run_dir/tb.
        rank: only rank 0 writes; other ranks get a no-op logger.
        resume_step: first step this (resumed) run will log; lines with ``step >= resume_step``
            are dropped from an existing metrics.jsonl.
        eta_window: number of recent step times averaged for the ETA.
        stream: where the console line goes (default stdout); ``None`` for no console output.
        console_interval: print the console line every this many steps (``train.log_interval``).
        startup_metrics: metrics added to the first record this logger writes.
        clock: monotonic clock for step times (injectable for tests).
        wall_clock: unix time for ``wall_time``.
    """

    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, tensorboard: bool = True,
                 rank: int = 0, resume_step: int | None = None, eta_window: int = 20,
                 stream: TextIO | None = sys.stdout, console_interval: int = 1,
                 startup_metrics: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if eta_window < 1:
            raise ValueError(f"eta_window must be >= 1, got {eta_window}")
        if isinstance(console_interval, bool) or not isinstance(console_interval, int) or console_interval < 1:
            raise ValueError(f"console_interval (train.log_interval) must be an int >= 1, got {console_interval!r}")
        if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 1):
            raise ValueError(f"resume_step must be an int >= 1 (first step to log), got {resume_step!r}")
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.rank = rank
        self.stream = stream
        self.console_interval = console_interval
        self._startup = _check_metrics(startup_metrics or {})
        self._clock = clock
        self._wall_clock = wall_clock
        self._step_times: collections.deque[float] = collections.deque(maxlen=eta_window)
        self._last_step = 0 if resume_step is None else resume_step - 1
        self._elapsed0 = 0.0
        self._file = None
        self._tb = None
        self.closed = False
        if rank != 0:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = metrics_path(self.run_dir)
        if resume_step is None:
            if path.exists() and path.stat().st_size > 0:
                raise FileExistsError(
                    f"{path} already holds metrics; pass resume_step=<completed steps + 1> to "
                    f"resume this run (resume_step=1 starts over and drops them all), or use a "
                    f"new run directory")
        elif path.exists():
            kept = [r for r in read_metrics(path) if r["step"] < resume_step]
            if kept:
                self._elapsed0 = float(kept[-1].get("elapsed_s", 0.0))
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, path)
        self._file = open(path, "a")

        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    f"TensorBoard logging needs the 'tensorboard' package ({e}); "
                    f"`pip install tensorboard`, or pass tensorboard=False") from None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=resume_step)
        self._t_prev = self._t_start = self._clock()

    def log(self, step: int, metrics: dict[str, float], *, rollouts: int, tokens: int) -> dict | None:
        """Record step ``step`` (1-based, after it finished): ``rollouts`` and ``tokens`` are the
        step's generated rollouts and trained tokens (summed over ranks). Returns the record
        written (None on ranks other than 0)."""
        if self.closed:
            raise RuntimeError("MetricsLogger.log after close()")
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step <= self._last_step:
            raise ValueError(f"step {step} logged after step {self._last_step}: steps must increase")
        for name, n in (("rollouts", rollouts), ("tokens", tokens)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        values = _check_metrics(metrics)
        if self._startup:
            values = {**self._startup, **values}
            self._startup = {}
        for name, n in (("rollouts", rollouts), ("tokens", tokens)):
            # A metric repeating a record field is fine when it agrees (e.g. the selection's
            # stats carry "rollouts"); it is stored once, as the record field.
            if name in values:
                if values[name] != n:
                    raise ValueError(f"metric {name!r} = {values[name]} disagrees with {name}={n}")
                del values[name]
        self._last_step = step
        if self.rank != 0:
            return None

        now = self._clock()
        dt = now - self._t_prev
        self._t_prev = now
        self._step_times.append(dt)
        eta = sum(self._step_times) / len(self._step_times) * max(self.total_steps - step, 0)
        per_s = (lambda n: n / dt) if dt > 0 else (lambda n: math.inf if n else 0.0)
        record = {"step": step, "wall_time": self._wall_clock(),
                  "elapsed_s": self._elapsed0 + (now - self._t_start), "step_time_s": dt,
                  "rollouts": rollouts, "tokens": tokens,
                  "rollouts_per_s": per_s(rollouts), "tokens_per_s": per_s(tokens), **values}

        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k in ("rollouts_per_s", "tokens_per_s", "step_time_s", *values):
                self._tb.add_scalar(k, record[k], global_step=step)
            self._tb.flush()
        show = step % self.console_interval == 0 or step == self.total_steps
        if self.stream is not None and (show or not all(math.isfinite(v) for v in values.values())):
            print(format_progress(step, self.total_steps, values,
                                  rollouts_per_s=record["rollouts_per_s"],
                                  tokens_per_s=record["tokens_per_s"], eta_s=eta),
                  file=self.stream, flush=True)
        return record

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of run_dir/metrics.jsonl (or of the given .jsonl file), in file order.

    A truncated last line (no trailing newline and not valid JSON: a run killed mid-write) is
    skipped with a warning. Any other bad line (invalid JSON, not an object, no integer ``step``,
    steps not increasing) raises ``ValueError`` naming the file and line number."""
    path = metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (is {run_dir} a run directory?)")
    text = path.read_text()
    lines = text.split("\n")
    # text ending in "\n" gives a last empty element; otherwise the last element is unterminated.
    unterminated = lines[-1] if lines[-1] else None
    lines = lines[:-1]
    records: list[dict] = []
    n = len(lines)

    def parse(line: str, lineno: int) -> dict:
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
        if not isinstance(r.get("step"), int) or isinstance(r.get("step"), bool):
            raise ValueError(f"{path}:{lineno}: record has no integer 'step': {line[:80]!r}")
        if records and r["step"] <= records[-1]["step"]:
            raise ValueError(f"{path}:{lineno}: step {r['step']} after step {records[-1]['step']} "
                             f"(steps must increase)")
        return r

    for i, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}:{i}: empty line")
        records.append(parse(line, i))
    if unterminated is not None:
        try:
            records.append(parse(unterminated, n + 1))
        except ValueError as e:
            if not str(e).startswith(f"{path}:{n + 1}: not valid JSON"):
                raise
            warnings.warn(f"{path}:{n + 1}: skipping truncated last line (run killed while "
                          f"writing?): {unterminated[:80]!r}", stacklevel=2)
    return records
