"""``popo-rollout-server``: an SGLang-API-compatible rollout server on a ``transformers`` model.

    popo-rollout-server --model-path DIR [--host 127.0.0.1] [--port 30000] [--device cpu|cuda]
                        [--dtype auto|float32|bfloat16|float16] [--random-seed N] [--api-key KEY]
                        [--config FILE.yaml] [--max-running-requests N] [--weight-version V]
                        [--num-threads N] [--strict-sglang] [--tp-size N] [--enable-deterministic-inference]
                        [--max-sequences-per-request N] [--max-body-bytes N] [--stall-timeout-s S]
                        [--weight-group-timeout-s S]

Flag names are ``sglang.launch_server``'s where they overlap. It serves the native SGLang endpoints
the rollout client and the weight sync use, with SGLang's request and response bodies:
``/health``, ``/health_generate``, ``/ready``, ``/generate``, ``/model_info`` (``/get_model_info``;
carries ``weight_version``), ``/flush_cache``, ``/pause_generation``, ``/continue_generation``,
``/update_weights_from_disk``, ``/init_weights_update_group``, ``/begin_weight_update``,
``/update_weights_from_distributed`` (per-tensor broadcasts, or ``load_format: "flattened_bucket"``),
``/update_weights_from_tensor`` (same-host handles, ``tensor_ipc``; only inside a window, either mode),
``/end_weight_update``, ``/destroy_weights_update_group``, ``/update_weight_version``,
``/get_weights_by_name``, ``/release_memory_occupation``, ``/resume_memory_occupation``,
``/server_info`` (``/get_server_info``). The HTTP side (FastAPI + uvicorn, as SGLang's own
``http_server``) is ``server_app``; the ``/generate`` body is checked by ``server_schema``.

``--strict-sglang`` answers as SGLang 0.5.23 does where a lenient stand-in would hide a GPU-run
failure (the launcher starts embedded servers with it):
- ``/update_weights_from_distributed`` outside a ``/begin_weight_update`` .. ``/end_weight_update``
  window is answered 400 without joining the broadcast
  (``SchedulerWeightUpdaterManager.update_weights_from_distributed``: ``self._session is None``);
  a second begin, or an end without a begin, is 400 (``begin_weight_update``/``end_weight_update``).
- ``/get_weights_by_name`` is 400 ``Get parameter by name failed`` unless the architecture is one
  whose SGLang model class has ``get_weights_by_name`` (``WeightExporter.get_weights_by_name``
  returns None on the AttributeError; ``http_server.get_weights_by_name`` answers 400): not Qwen2.
- ``sampling_seed`` is ignored unless ``--enable-deterministic-inference``; with it an unseeded
  request samples with seed 42 (``SamplingBatchInfo.from_schedule_batch``).
``--tp-size N`` (either mode) joins the weight-update group with N ranks ``rank_offset + tp_rank``,
each receiving every broadcast (``server_tp_ranks``); ``/server_info`` reports ``tp_size``,
``enable_deterministic_inference`` and, under ``popo_weight_updates``, the tensors each TP rank
received, in all and per closed window. Each closed window is also logged.

Limits (issue 15: one request used to lock the server up): a request's prompt + max_new_tokens must
fit the model's context length (SGLang's check), prompts x n is capped (``--max-sequences-per-request``),
bodies above ``--max-body-bytes`` are 413, a client that disconnects takes its sequences out of the
batch within one decode step, and ``/health`` answers 503 once a running batch made no progress for
``--stall-timeout-s``. The API key (``--api-key``, the ``api-key`` of a ``--config`` YAML file as
SGLang reads it, or the ``POPO_ROLLOUT_API_KEY`` environment variable, which the launcher uses so
that the key is not on the command line) is compared in constant time; ``/health*`` and ``/ready``
need no key, as in SGLang (``decide_request_auth``).

Simplifications against SGLang: one scheduler thread with batches of up to ``--max-running-requests``
sequences (newcomers join a running batch between decode steps), no radix cache (so ``/flush_cache``
only checks that nothing is pending), no streaming, no text (token ids only: ``text`` is always "").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from popo_mega.rollout.generation import SequenceRequest, generate_batch
from popo_mega.rollout.server_schema import (GeneratePlan, RequestError, context_length, json_number,
                                             parse_generate)
from popo_mega.rollout.server_tp_ranks import TpRankGroup
from popo_mega.rollout.sglang_api import finish_reason

__all__ = ["RequestError", "RolloutServer", "ServerArgs", "main", "parse_args", "serve"]

API_KEY_ENV = "POPO_ROLLOUT_API_KEY"  # the launcher passes the key here: argv is visible to every user (ps)


@dataclass(frozen=True)
class ServerArgs:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    device: str = "auto"
    dtype: str = "auto"
    random_seed: int = 0
    api_key: str | None = None
    max_running_requests: int = 64
    weight_version: str = "default"
    num_threads: int = 1
    parent_pid: int | None = None
    strict_sglang: bool = False
    tp_size: int = 1
    enable_deterministic_inference: bool = False
    max_sequences_per_request: int = 1024
    max_body_bytes: int = 64 * 2 ** 20
    stall_timeout_s: float = 300.0
    weight_group_timeout_s: float = 120.0


def _config_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--config FILE.yaml`` as SGLang reads it (``ConfigArgumentMerger``): each key is a flag
    (``api-key`` or ``api_key``), a true boolean a bare flag; the file's flags go first, so the
    command line wins. An unknown key is an error naming it and the file."""
    if "--config" not in argv:
        return argv
    import yaml

    at = argv.index("--config")
    if at == len(argv) - 1:
        parser.error("--config needs a YAML file")
    path = argv[at + 1]
    if not path.endswith((".yaml", ".yml")) or not os.path.isfile(path):
        parser.error(f"--config {path}: not a .yaml/.yml file")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        parser.error(f"--config {path}: must hold a mapping of flag names to values")
    flags = {s: a for a in parser._actions for s in a.option_strings}
    out = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in flags or flag == "--config":
            parser.error(f"--config {path}: unknown key {key!r}")
        if isinstance(flags[flag], argparse._StoreTrueAction):
            out += [flag] if value else []
        else:
            out += [flag, str(value)]
    return out + argv[:at] + argv[at + 2:]


def parse_args(argv) -> ServerArgs:
    p = argparse.ArgumentParser(prog="popo-rollout-server", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--api-key", default=None,
                   help=f"the key every route but /health* and /ready needs (or set {API_KEY_ENV}, or put "
                        "api-key in a --config file: a key on the command line is visible in ps)")
    p.add_argument("--config", default=None, help="a YAML file of flags (as sglang.launch_server's --config)")
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--num-threads", type=int, default=1,
                   help="torch CPU threads (default 1: several processes share the cores; "
                        "2 threads next to a busy trainer ran 10x slower than 1 on 2 cores)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process is no longer our parent (the launching trainer died, "
                        "even by kill -9): no orphaned servers")
    p.add_argument("--strict-sglang", action="store_true",
                   help="answer as SGLang 0.5.23 where it is stricter: weight updates only inside "
                        "begin/end_weight_update windows, no /get_weights_by_name for Qwen2, "
                        "sampling_seed only with --enable-deterministic-inference")
    p.add_argument("--tp-size", type=int, default=1,
                   help="ranks this server joins the weight-update group with (rank_offset + tp_rank), "
                        "as a TP-N SGLang server does; generation itself is not sharded")
    p.add_argument("--enable-deterministic-inference", action="store_true",
                   help="honour sampling_seed under --strict-sglang (SGLang ignores it without this flag)")
    p.add_argument("--max-sequences-per-request", type=int, default=1024,
                   help="prompts x n of one /generate (400 above it)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 2 ** 20, help="request bodies above this are 413")
    p.add_argument("--stall-timeout-s", type=float, default=300.0,
                   help="/health answers 503 once a running batch made no progress for this long "
                        "(SGLang's --watchdog-timeout default)")
    p.add_argument("--weight-group-timeout-s", type=float, default=120.0,
                   help="/init_weights_update_group answers 400 when the group has not formed by then")
    argv = list(argv)
    a = p.parse_args(_config_argv(argv, p))
    for flag, value, low in (("--tp-size", a.tp_size, 1), ("--max-running-requests", a.max_running_requests, 1),
                             ("--max-sequences-per-request", a.max_sequences_per_request, 1),
                             ("--max-body-bytes", a.max_body_bytes, 1024)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--stall-timeout-s", a.stall_timeout_s), ("--weight-group-timeout-s", a.weight_group_timeout_s)):
        if not value > 0:
            p.error(f"{flag} must be > 0, got {value}")
    api_key = a.api_key if a.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    return ServerArgs(model_path=a.model_path, host=a.host, port=a.port, device=a.device, dtype=a.dtype,
                      random_seed=a.random_seed, api_key=api_key,
                      max_running_requests=a.max_running_requests, weight_version=a.weight_version,
                      num_threads=a.num_threads, parent_pid=a.parent_pid, strict_sglang=a.strict_sglang,
                      tp_size=a.tp_size, enable_deterministic_inference=a.enable_deterministic_inference,
                      max_sequences_per_request=a.max_sequences_per_request, max_body_bytes=a.max_body_bytes,
                      stall_timeout_s=a.stall_timeout_s, weight_group_timeout_s=a.weight_group_timeout_s)


# SGLang 0.5.23 model classes that define get_weights_by_name (grep "def get_weights_by_name"
# sglang/srt/models/): llama.py (and its subclasses' registered names), granite.py, exaone4.py,
# opt.py. Everything else, Qwen2ForCausalLM included, answers /get_weights_by_name with 400.
SGLANG_WEIGHT_READERS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "GraniteForCausalLM",
                                   "Exaone4ForCausalLM", "OPTForCausalLM"})
DETERMINISTIC_DEFAULT_SEED = 42  # SamplingBatchInfo.from_schedule_batch: a row without sampling_seed
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def _torch_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise RequestError(f"{where}: unknown dtype {name!r}")
    return dtype


class Cancelled(Exception):
    """The request's sequences were cancelled (its client left) before they finished."""


class RolloutServer:
    """The model, its weight version, the scheduler thread and the weight-update groups."""

    def __init__(self, args: ServerArgs):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.args = args
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        if not os.path.isfile(os.path.join(args.model_path, "config.json")):
            raise FileNotFoundError(f"--model-path {args.model_path}: no config.json there")
        self.config = AutoConfig.from_pretrained(args.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(self.device).eval()
        self.model_path = args.model_path
        self.context_len = context_length(self.config)
        eos = self.config.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else ([eos] if isinstance(eos, int) else eos))
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self.generator = torch.Generator(device=self.device).manual_seed(args.random_seed)
        self.weight_version = args.weight_version
        self.model_lock = threading.Lock()         # held by a running batch and by weight loads
        self._lock_waiters = 0                      # weight operations waiting for model_lock (_exclusive)
        self._waiters_lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        self.running = threading.Event()            # cleared by /pause_generation
        self.running.set()
        self.busy = False
        self.in_batch = False                       # generate_batch is running (progress_at is its heartbeat)
        self.progress_at = time.monotonic()
        self.released = False
        self.groups: dict[str, TpRankGroup] = {}
        self.window_open = False                    # between /begin_weight_update and /end_weight_update
        self.window_lock = threading.Lock()
        self.windows: list[list[int]] = []          # tensors received per TP rank in each closed window
        self._window_start: list[int] = []
        self._retired = [0] * args.tp_size          # receipts of destroyed groups
        self.tensor_receipts = 0                    # tensors loaded by /update_weights_from_tensor (every rank)
        self._window_tensor_start = 0
        self.stopping = threading.Event()
        self.scheduler = threading.Thread(target=self._schedule, name="scheduler", daemon=True)
        self.scheduler.start()

    # ---- generation ----
    def _take(self) -> tuple | None:
        """The next queued job whose client is still there (a cancelled one is answered and dropped)."""
        while True:
            seq, slot = self.queue.get_nowait()
            if not seq.cancelled:
                return seq, slot
            self._fail(slot, "cancelled")

    @staticmethod
    def _fail(slot: dict, why: str) -> None:
        if not slot["done"].is_set():
            slot["error"] = why
            slot["done"].set()
            if slot.get("notify"):
                slot["notify"]()

    def _schedule(self) -> None:
        while not self.stopping.is_set():
            if not self.running.wait(timeout=0.1):
                continue
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if first[0].cancelled:
                self._fail(first[1], "cancelled")
                continue
            self.busy = True  # from here on, a request is held by the scheduler (flush_cache must refuse)
            while not self.running.wait(timeout=0.1):  # paused after we started waiting: hold it
                if self.stopping.is_set():
                    return
            batch = [first]
            while len(batch) < self.args.max_running_requests:
                try:
                    batch.append(self._take())
                except queue.Empty:
                    break
            slots = {id(s): slot for s, slot in batch}
            while self._lock_waiters and not self.stopping.is_set():  # a weight operation goes first
                time.sleep(0.005)
            try:
                with self.model_lock:
                    if self.released:
                        raise RuntimeError("memory released (call /resume_memory_occupation first)")
                    self.progress_at, self.in_batch = time.monotonic(), True
                    generate_batch(self.model, [s for s, _ in batch], pad_token_id=self.pad_token_id,
                                   eos_token_ids=self.eos_token_ids, generator=self.generator, device=self.device,
                                   **self._continuous_batching(slots))
            except Exception as exc:  # noqa: BLE001 - reported to every waiting request
                for slot in slots.values():
                    self._fail(slot, f"{type(exc).__name__}: {exc}")
            finally:
                self.in_batch = False
                self.busy = False

    # ---- continuous batching (generate_batch's admit / on_finish) ----
    def _continuous_batching(self, slots: dict) -> dict:
        """``generate_batch``'s callbacks for one batch, run with the model lock held: a finished
        sequence is answered at once; requests queued while the batch runs join it between decode
        steps (up to --max-running-requests rows), so the prompts of one rollout step that reach the
        server one by one share their decode steps (before, the first of 32 concurrent requests
        often ran alone and the other 31 after it). Joining stops while generation is paused and
        while a weight operation waits for the model lock (``_exclusive``), so a steady stream of
        requests cannot hold the lock against weight updates; before, joining stopped after 64
        steps whatever happened, and one long request kept every later one waiting (issue 15).
        Each call is the loop's heartbeat (``progress_at``, read by ``/health``)."""
        running = [len(slots)]

        def admit(step: int) -> list:
            self.progress_at = time.monotonic()
            joining = []
            while (self.running.is_set() and not self._lock_waiters
                   and running[0] + len(joining) < self.args.max_running_requests):
                try:
                    seq, slot = self._take()
                except queue.Empty:
                    break
                slots[id(seq)] = slot
                joining.append(seq)
            running[0] += len(joining)
            return joining

        def on_finish(seq) -> None:
            running[0] -= 1
            slot = slots[id(seq)]
            slot["version"] = self.weight_version
            if seq.finish[0] == "abort":
                return self._fail(slot, "cancelled")
            slot["done"].set()
            if slot.get("notify"):
                slot["notify"]()

        return {"admit": admit, "on_finish": on_finish}

    @contextlib.contextmanager
    def _exclusive(self):
        """The model lock for a weight operation; while it waits, running batches admit nobody, so
        the lock comes free once the rows already decoding have finished."""
        with self._waiters_lock:
            self._lock_waiters += 1
        try:
            self.model_lock.acquire()
        finally:
            with self._waiters_lock:
                self._lock_waiters -= 1
        try:
            yield
        finally:
            self.model_lock.release()

    def health(self) -> str | None:
        """Why ``/health`` must fail (None: healthy): memory released, the scheduler thread gone, or a
        batch that made no progress for ``--stall-timeout-s`` (SGLang's ``/health_generate`` fails when
        the scheduler sent nothing back for its HEALTH_CHECK_TIMEOUT)."""
        if self.released:
            return "memory released"
        if not self.scheduler.is_alive():
            return "the scheduler thread is gone"
        idle = time.monotonic() - self.progress_at
        if self.in_batch and idle > self.args.stall_timeout_s:
            return f"generation made no progress for {idle:.0f}s (--stall-timeout-s {self.args.stall_timeout_s:g})"
        return None

    def plan(self, body) -> GeneratePlan:
        """The checked /generate request (400 naming the field otherwise; see ``server_schema``)."""
        plan = parse_generate(body, vocab_size=self.config.vocab_size, context_len=self.context_len,
                              max_sequences=self.args.max_sequences_per_request)
        for i, p in enumerate(plan.prompts):
            if p.n > 1 and p.sampling_seed is not None and self._sampling_seed(p.sampling_seed) is not None:
                # SGLang would give all n the same sample
                raise RequestError(f"sampling_params{'' if len(plan.prompts) == 1 else f'.{i}'}.sampling_seed: "
                                   f"one seed for n = {p.n} samples gives {p.n} identical samples; "
                                   "send n prompts with one seed each")
        return plan

    def submit(self, plan: GeneratePlan, notify=None) -> list[tuple[SequenceRequest, dict]]:
        """Queue every sequence of ``plan``; ``notify()`` is called (from the scheduler thread) as each
        one finishes or fails. Returns the (sequence, slot) jobs in response order."""
        jobs = []
        for p in plan.prompts:
            seed = self._sampling_seed(p.sampling_seed)
            for _ in range(p.n):
                seq = SequenceRequest(prompt=list(p.prompt), temperature=p.temperature, top_p=p.top_p,
                                      max_new_tokens=p.max_new_tokens, stop_token_ids=p.stop_token_ids,
                                      logprob_start_len=p.logprob_start_len, seed=seed, ignore_eos=p.ignore_eos)
                jobs.append((seq, {"done": threading.Event(), "notify": notify}))
        for job in jobs:
            self.queue.put(job)
        return jobs

    def pending(self) -> bool:
        """Whether a request is queued or running (``/flush_cache`` refuses then); queued requests
        whose client left are dropped first, so they never hold a flush while generation is paused."""
        with self.queue.mutex:
            gone = [job for job in self.queue.queue if job[0].cancelled]
            if gone:
                live = [job for job in self.queue.queue if not job[0].cancelled]
                self.queue.queue.clear()
                self.queue.queue.extend(live)
        for _, slot in gone:
            self._fail(slot, "cancelled")
        return self.busy or not self.queue.empty()

    @staticmethod
    def cancel(jobs) -> None:
        """Take ``jobs`` out: queued ones are dropped, running ones leave the batch at the next step."""
        for seq, _ in jobs:
            seq.cancelled = True

    def response(self, plan: GeneratePlan, jobs, t0: float) -> object:
        """SGLang's /generate answer for finished ``jobs`` (one object for one sequence, else a list);
        raises RuntimeError when the batch failed. Log-probs are JSON-safe (``json_number``)."""
        rid = plan.rid or uuid.uuid4().hex
        returns = [p.return_logprob for p in plan.prompts for _ in range(p.n)]
        outs = []
        for k, ((seq, slot), ret) in enumerate(zip(jobs, returns)):
            if "error" in slot:
                if slot["error"] == "cancelled":
                    raise Cancelled("the request was cancelled")
                raise RuntimeError(slot["error"])
            kind, val = seq.finish
            meta = {"id": f"{rid}-{k}", "prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.output_ids),
                    "cached_tokens": 0,
                    "finish_reason": finish_reason(kind, matched=val) if kind == "stop" else finish_reason(kind, length=val),
                    "weight_version": slot["version"], "e2e_latency": time.time() - t0}
            if ret:
                meta["output_token_logprobs"] = [[json_number(lp), t, None]
                                                 for lp, t in zip(seq.output_logprobs, seq.output_ids)]
                if seq.logprob_start_len >= 0:
                    meta["input_token_logprobs"] = [[json_number(lp), t, None] for lp, t in
                                                    zip(seq.input_logprobs, seq.prompt[seq.logprob_start_len:])]
            outs.append({"text": "", "output_ids": list(seq.output_ids), "meta_info": meta})
        return outs[0] if len(outs) == 1 else outs

    def generate(self, body: dict) -> object:
        """/generate for an in-process caller: check, queue, wait, answer."""
        plan, t0 = self.plan(body), time.time()
        jobs = self.submit(plan)
        for _, slot in jobs:
            slot["done"].wait()
        return self.response(plan, jobs, t0)

    def _sampling_seed(self, value) -> int | None:
        """The seed a row samples with: SGLang builds per-row seeds only under
        --enable-deterministic-inference, 42 for a row without one (strict mode); the lenient
        mode honours every given seed. (Its type and range were checked by ``server_schema``.)"""
        if not self.args.strict_sglang:
            return value
        if not self.args.enable_deterministic_inference:
            return None
        return DETERMINISTIC_DEFAULT_SEED if value is None else value

    # ---- weights ----
    def load_named_tensors(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model (names and shapes checked before any copy). Names are
        checkpoint names: a Qwen3-MoE expert's tensor is a view into transformers' fused experts
        (``served_names.checkpoint_tensors``), written in place."""
        from popo_mega.model.served_names import checkpoint_tensors

        params = dict(self.model.named_parameters())
        params.update({k: v for k, v in self.model.named_buffers() if k not in params})
        params = checkpoint_tensors(params)
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        targets = []
        for name, tensor in named:
            key = "model.embed_tokens.weight" if (name == "lm_head.weight" and tied and name not in params) else name
            if key not in params:
                raise RequestError(f"unknown parameter name {name!r} (not in the served model)")
            if tuple(params[key].shape) != tuple(tensor.shape):
                raise RequestError(f"parameter {name!r}: shape {tuple(tensor.shape)} != served {tuple(params[key].shape)}")
            if params[key].is_floating_point() != tensor.is_floating_point():  # a cast would change the values
                raise RequestError(f"parameter {name!r}: dtype {tensor.dtype} cannot replace the served {params[key].dtype}")
            targets.append((params[key], tensor))
        with torch.no_grad():
            for param, tensor in targets:
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    def model_tensor_set(self) -> tuple[dict[str, torch.Tensor], set[str]]:
        """The tensors a checkpoint of the served model holds: name -> served tensor (parameters and
        persistent buffers, as ``save_pretrained`` writes them), and the names that may be left out
        (``lm_head.weight`` of a model with tied embeddings). Under checkpoint names, as
        ``load_named_tensors`` takes them."""
        from popo_mega.model.served_names import checkpoint_tensors

        state = checkpoint_tensors(self.model.state_dict())
        optional = set()
        if getattr(self.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
            optional.add("lm_head.weight")
        return state, optional

    def read_disk_checkpoint(self, path: str) -> list[tuple[str, torch.Tensor]]:
        """Exactly the served model's tensors from ``path``: the files ``model.safetensors.index.json``
        names (its ``weight_map``), or the directory's one ``*.safetensors`` without an index; every
        tensor checked (name, shape, floating or not) before the caller writes any. Before, every
        ``*.safetensors`` was loaded, so a stale extra file silently overrode tensors and a file
        with only some of them was a success (issue 15). Errors name the file and the tensor."""
        from safetensors import safe_open

        where = "/update_weights_from_disk"
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError("weight_map must map tensor names to file names")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RequestError(f"{where}: {index}: unreadable index ({type(exc).__name__}: {exc})") from None
            wanted: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                if os.path.basename(fname) != fname:
                    raise RequestError(f"{where}: {index}: tensor {name!r} points outside the directory ({fname!r})")
                wanted.setdefault(fname, []).append(name)
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(files) != 1:
                raise RequestError(f"{where}: {path}: {len(files)} *.safetensors files ({', '.join(files[:5])}) and "
                                   "no model.safetensors.index.json to say which hold the model" if files else
                                   f"{where}: no *.safetensors in {path}")
            wanted = {files[0]: None}
        state, optional = self.model_tensor_set()
        named, seen = [], {}
        for fname, names in sorted(wanted.items()):
            file = os.path.join(path, fname)
            try:
                with safe_open(file, framework="pt") as f:
                    keys = set(f.keys())
                    if names is None:
                        names = sorted(keys)
                    missing = [n for n in names if n not in keys]
                    if missing:
                        raise RequestError(f"{where}: {file} lacks tensor {missing[0]!r} that {index} puts there")
                    for name in names:
                        if name not in state:
                            raise RequestError(f"{where}: {file}: tensor {name!r} is not one of the served model's")
                        tensor = f.get_tensor(name)
                        served = state[name]
                        if tuple(tensor.shape) != tuple(served.shape):
                            raise RequestError(f"{where}: {file}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                               f"served model's is {tuple(served.shape)}")
                        if tensor.is_floating_point() != served.is_floating_point():
                            raise RequestError(f"{where}: {file}: tensor {name!r} has dtype {tensor.dtype}, the served "
                                               f"model's is {served.dtype}")
                        if name in seen:
                            raise RequestError(f"{where}: tensor {name!r} is in both {seen[name]} and {file}")
                        seen[name] = file
                        named.append((name, tensor))
            except RequestError:
                raise
            except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file: name it
                raise RequestError(f"{where}: {file}: unreadable safetensors ({type(exc).__name__}: {exc})") from None
        absent = sorted(set(state) - set(seen) - optional)
        if absent:
            raise RequestError(f"{where}: {path} lacks {len(absent)} of the served model's tensors, e.g. {absent[0]!r} "
                               "(nothing was loaded)")
        return named

    def update_from_disk(self, body: dict) -> dict:
        path = body.get("model_path")
        if not isinstance(path, str) or not os.path.isdir(path):
            raise RequestError(f"/update_weights_from_disk: model_path {path!r} is not a directory")
        version = body.get("weight_version")
        named = self.read_disk_checkpoint(path)
        with self._exclusive():
            self.load_named_tensors(named)
            self.model_path = path
            if version is not None:
                self.weight_version = str(version)
        return {"success": True, "message": f"Succeeded to update model weights from {path} ({len(named)} tensors).",
                "num_paused_requests": 0}

    def init_group(self, body: dict) -> dict:
        """Join the group with ``--tp-size`` ranks ``rank_offset + tp_rank`` (SGLang's ranks).

        The trainer is rank 0 and hosts the group's store at ``master_address``; this server only
        connects to it. So world_size < 2 or rank_offset < 1 (which would make this server host an
        unauthenticated store, and then receive from nobody) and a wildcard master are 400, and the
        answer comes within ``--weight-group-timeout-s`` even when the master is unreachable (torch's
        store client retries past its own timeout: 248 s for a stated 120 s, issue 15)."""
        where = "/init_weights_update_group"
        fields = {"master_address": str, "master_port": int, "rank_offset": int, "world_size": int}
        for key, kind in fields.items():
            if key not in body:
                raise RequestError(f"{where}: missing field {key!r}")
            if not isinstance(body[key], kind) or isinstance(body[key], bool):
                raise RequestError(f"{where}: {key} must be {kind.__name__}, got {body[key]!r:.60}")
        name, backend = body.get("group_name", "weight_update_group"), body.get("backend", "nccl")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}: group_name must be a non-empty string, got {name!r:.60}")
        if name in self.groups:
            raise RequestError(f"group {name!r} already exists")
        if body["world_size"] < 2:
            raise RequestError(f"{where}: world_size must be >= 2 (the trainer at rank 0 and this server), "
                               f"got {body['world_size']}")
        if body["rank_offset"] < 1:
            raise RequestError(f"{where}: rank_offset must be >= 1 (rank 0 is the trainer's), got {body['rank_offset']}")
        if not 0 < body["master_port"] < 65536:
            raise RequestError(f"{where}: master_port must be in [1, 65535], got {body['master_port']}")
        if body["master_address"].strip() in WILDCARD_ADDRESSES:
            raise RequestError(f"{where}: master_address {body['master_address']!r} is a wildcard; give the "
                               "trainer's address")
        timeout = self.args.weight_group_timeout_s
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"join-{name}")
        future = pool.submit(TpRankGroup, master_address=body["master_address"], master_port=body["master_port"],
                             rank_offset=body["rank_offset"], world_size=body["world_size"], group_name=name,
                             backend=backend, tp_size=self.args.tp_size, timeout_s=timeout)
        pool.shutdown(wait=False)
        try:
            group = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(lambda f: f.exception() is None and f.result().close())  # joined too late
            raise RequestError(f"Failed to initialize custom process group: group {name!r} at "
                               f"{body['master_address']}:{body['master_port']} did not form within {timeout:g}s "
                               "(--weight-group-timeout-s).") from None
        except (ValueError, RuntimeError) as exc:  # SGLang: 400 "Failed to initialize custom process group"
            raise RequestError(f"Failed to initialize custom process group: {exc}.") from None
        self.groups[name] = group
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def received(self) -> list[int]:
        """Tensors received so far per TP rank (every group, destroyed ones included, and by tensor)."""
        total = [n + self.tensor_receipts for n in self._retired]
        for g in list(self.groups.values()):
            total = [a + b for a, b in zip(total, g.receipts)]
        return total

    def begin_update(self) -> dict:
        with self.window_lock:
            if self.window_open:
                raise RequestError("a weight-update session is already open; call end_weight_update() first")
            self.window_open = True
            self._window_start = self.received()
            self._window_tensor_start = self.tensor_receipts
        return {"success": True, "message": "Success"}

    def end_update(self) -> dict:
        with self.window_lock:
            if not self.window_open:
                raise RequestError("no weight-update session is open; call begin_weight_update() first")
            self.window_open = False
            counts = [a - b for a, b in zip(self.received(), self._window_start)]
            self.windows.append(counts)
        by_tensor = self.tensor_receipts - self._window_tensor_start
        print(f"popo-rollout-server: weight-update window {len(self.windows)} closed: tensors received per "
              f"TP rank {counts} ({by_tensor} by update_weights_from_tensor)", flush=True)
        return {"success": True, "message": "Success"}

    def update_from_distributed(self, body: dict) -> dict:
        if self.args.strict_sglang and not self.window_open:  # answered before joining the broadcast
            raise RequestError("update_weights_from_distributed must run between begin_weight_update() "
                               "and end_weight_update()")
        name = body.get("group_name", "weight_update_group")
        group = self.groups.get(name)
        if group is None:
            raise RequestError(f"group {name!r} not initialised; call /init_weights_update_group first")
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes)):
            raise RequestError("/update_weights_from_distributed: names, dtypes, shapes must be lists of one length")
        dts = [_torch_dtype(d, f"/update_weights_from_distributed ({n})") for n, d in zip(names, dtypes)]
        flattened = body.get("load_format") == "flattened_bucket"
        if flattened:
            offset = 0
            for n, d, s in zip(names, dts, shapes):
                if offset % d.itemsize:
                    raise RequestError(f"unaligned tensor {n} in flattened bucket (byte offset {offset}, {d})")
                offset += int(torch.Size(s).numel()) * d.itemsize
        named = list(zip(names, group.receive(list(zip(dts, shapes)), flattened)))
        with self._exclusive():
            self.load_named_tensors(named)
            if body.get("weight_version") is not None:
                self.weight_version = str(body["weight_version"])
        return {"success": True, "message": "Succeeded to update parameter online."}

    def update_from_tensor(self, body: dict) -> dict:
        """SGLang 0.5.23's ``/update_weights_from_tensor``: ``serialized_named_tensors`` holds one base64
        ``MultiprocessingSerializer`` payload per TP rank (``TpModelWorker.deserialize_own_rank``); each
        rank reads its own. Rejected outside a begin/end window as SGLang does
        (``SchedulerWeightUpdaterManager.update_weights_from_tensor``), in both modes: the tensor path
        is new and has no lenient callers. Every rank's payload is decoded and checked (names, shapes,
        floating dtypes) before any weight is written, so a bad request changes nothing."""
        from popo_mega.rollout.tensor_ipc import PayloadError, deserialize_named_tensors

        if not self.window_open:
            raise RequestError("update_weights_from_tensor must run between begin_weight_update() "
                               "and end_weight_update()")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or len(payloads) != self.args.tp_size:
            raise RequestError(f"/update_weights_from_tensor: serialized_named_tensors must be a list of one payload "
                               f"per TP rank ({self.args.tp_size}), got "
                               f"{len(payloads) if isinstance(payloads, list) else type(payloads).__name__}")
        if body.get("load_format") not in (None,):
            raise RequestError(f"/update_weights_from_tensor: load_format {body.get('load_format')!r} is not "
                               "supported by this server (only None: a list of (name, tensor))")
        try:
            per_rank = [deserialize_named_tensors(p) for p in payloads]
        except PayloadError as exc:
            raise RequestError(f"/update_weights_from_tensor: {exc}") from None
        named = per_rank[0]
        for rank, other in enumerate(per_rank[1:], start=1):  # the embedded server holds one full copy
            if [n for n, _ in other] != [n for n, _ in named]:
                raise RequestError(f"/update_weights_from_tensor: TP rank {rank}'s payload names other tensors "
                                   "than rank 0's")
        for name, tensor in named:
            if not tensor.is_floating_point():
                raise RequestError(f"/update_weights_from_tensor: parameter {name!r}: dtype {tensor.dtype} is "
                                   "not a floating-point type")
        with self._exclusive():
            self.load_named_tensors(named)  # checks every name and shape before the first copy
            self.tensor_receipts += len(named)
            if body.get("weight_version") is not None:
                self.weight_version = str(body["weight_version"])
        del per_rank, named  # drop the mappings of the sender's memory before answering
        return {"success": True, "message": "Success"}

    def destroy_group(self, body: dict) -> dict:
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return {"success": False, "message": "The group to be destroyed does not exist."}
        self._retired = [a + b for a, b in zip(self._retired, group.receipts)]
        group.close()
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def get_weights_by_name(self, body: dict) -> list:
        archs = list(getattr(self.config, "architectures", None) or [])
        if self.args.strict_sglang and not SGLANG_WEIGHT_READERS.intersection(archs):
            raise RequestError("Get parameter by name failed")  # SGLang's answer; its log: no get_weights_by_name
        name, size = body.get("name"), int(body.get("truncate_size", 100))
        params = dict(self.model.named_parameters())
        if name == "lm_head.weight" and name not in params and getattr(self.config, "tie_word_embeddings", False):
            name = "model.embed_tokens.weight"
        if name not in params:
            raise RequestError(f"/get_weights_by_name: unknown parameter {body.get('name')!r}")
        with self._exclusive():
            return params[name].detach()[:size].float().cpu().tolist()  # == tolist()[:size], without the full copy

    def set_released(self, released: bool) -> None:
        with self._exclusive():
            if self.device.type == "cuda":
                self.model.to("cpu" if released else self.device)
                torch.cuda.empty_cache()
            self.released = released

    def server_info(self) -> dict:
        """SGLang's ``/server_info`` keys this server has (its resolved ServerArgs), plus its
        weight-update receipts per TP rank under ``popo_weight_updates``."""
        a = self.args
        with self.window_lock:
            windows = [list(w) for w in self.windows]
        return {"model_path": a.model_path, "tp_size": a.tp_size, "dp_size": 1, "pp_size": 1,
                "random_seed": a.random_seed, "enable_deterministic_inference": a.enable_deterministic_inference
                if a.strict_sglang else True, "max_running_requests": a.max_running_requests,
                "device": self.device.type, "version": "popo-rollout-server", "strict_sglang": a.strict_sglang,
                "popo_weight_updates": {"received_per_tp_rank": self.received(), "closed_windows": windows,
                                        "window_open": self.window_open}}

    def model_info(self) -> dict:
        return {"model_path": self.model_path, "served_model_name": self.args.model_path,
                "tokenizer_path": self.args.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version, "load_format": None,
                "reasoning_parser": None, "tool_call_parser": None}


def serve(args: ServerArgs, ready: threading.Event | None = None) -> None:
    """Load the model and serve until interrupted (``server_app.run``)."""
    from popo_mega.rollout.server_app import run

    run(RolloutServer(args), ready)


def main(argv=None) -> int:
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.random_seed)
    try:
        serve(args)
    except KeyboardInterrupt:
        pass
    # uvicorn has stopped. A route still blocked in a worker thread (a group join, a broadcast: not
    # daemon threads) would hold the exit for up to its timeout; the stdlib server's handler threads
    # were daemons and never did. Nothing is left to clean up that the OS does not.
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
