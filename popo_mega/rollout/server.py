"""``popo-rollout-server``: an SGLang-API-compatible rollout server on a ``transformers`` model.

    popo-rollout-server --model-path DIR [--host 127.0.0.1] [--port 30000] [--device cpu|cuda]
                        [--dtype auto|float32|bfloat16|float16] [--random-seed N] [--api-key KEY]
                        [--config FILE.yaml] [--max-running-requests N] [--weight-version V]
                        [--num-threads N] [--strict-sglang] [--tp-size N] [--enable-deterministic-inference]
                        [--max-sequences-per-request N] [--max-body-bytes N] [--stall-timeout-s S]
                        [--weight-group-timeout-s S] [--enable-memory-saver] [--enable-weights-cpu-backup]

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

Pausing, as SGLang 0.5.23 does it (``/pause_generation`` body ``{"mode": "abort"|"retract"|"in_place"}``,
default "abort": ``PauseGenerationReqInput``, ``srt/managers/io_struct.py:1927``). In every mode requests
that arrive while paused wait (SGLang holds them in ``TokenizerManager.generate_request`` on
``is_pause_cond``, ``tokenizer_manager.py:938``), and a weight update runs at once instead of waiting
for the running requests (without a pause it takes ``model_update_lock.writer_lock``, which waits for
every in-flight ``/generate``: ``tokenizer_control_mixin.py:516-524``; here ``_exclusive`` waits for the
running rows).
- ``in_place``: the running batch stops between decode steps (``Scheduler.pause_generation`` only sets
  ``_engine_paused``, ``scheduler.py:5817-5831``; the event loop skips batches, ``scheduler.py:2034``).
  Its rows keep their tokens and K/V cache; after ``/continue_generation`` they go on with the old
  K/V cache (io_struct's docstring) and the weights loaded meanwhile: the first forward after the
  pause feeds their last token to the new weights, so every token after the pause is sampled from
  the new weights. ``/flush_cache`` fails while such rows are held (``flush_cache`` needs
  ``running_batch`` empty, ``scheduler.py:5518``), and so does a weight update whose body has
  ``flush_cache: true`` (SGLang's default): the weights are loaded, the answer is 400 "Weights were
  updated, but the cache was not flushed ..." (``SchedulerWeightUpdaterManager.flush_cache_after_weight_update``,
  ``scheduler_components/weight_updater.py:120``).
- ``retract``: the running rows go back to the waiting queue with their tokens, their K/V cache freed
  (``retract_all`` / ``Req.reset_for_retract``, ``schedule_batch.py:2049,2398``); after
  ``/continue_generation`` each is prefilled again over prompt + tokens so far, i.e. recomputed on the
  new weights (SGLang's radix cache could still hold the old prefix unless flushed; this server has no
  radix cache, so it always recomputes). A flush while paused ignores the waiting queue
  (``is_fully_idle(ignore_waiting=self._engine_paused)``), so it succeeds.
- ``abort``: every request is aborted (``TokenizerManager.pause_generation`` repeats
  ``abort_request(abort_all=True)`` until no ``/generate`` is in flight, ``tokenizer_manager.py:2267``):
  a queued one answers at once with finish_reason ``{"type": "abort", "message": "Abort in waiting
  queue"}`` (``_handle_abort_req``, ``tokenizer_manager.py:3577``), a running one after one more token
  (``req.to_finish = FINISH_ABORT()``: "the request will still run one decode forward pass",
  ``scheduler.py:5802``) with ``{"type": "abort", "message": "Aborted", "status_code": null, "err_type":
  null}`` (``FINISH_ABORT.to_json``, ``schedule_batch.py:332``); HTTP 200 with the tokens made (only an
  abort with a status code >= 400 becomes an HTTP error, ``_handle_abort_finish_reason``). The pause
  answers once nothing is running.
``/ready`` is 503 while paused (``TokenizerManager.is_ready``, ``tokenizer_manager.py:732``); ``/health``
is not.
Weight versions: every finished sequence's meta_info carries SGLang's ``weight_versions``, spans
``{"version", "start", "end"}`` over its output tokens, and ``weight_version``, the last span's version
(``srt/utils/weight_versions.py``: a version change records ``(old_version, len(output_ids))`` on every
live request that has tokens, ``record_weight_version_events`` :39 via ``Scheduler.record_weight_version_change``,
``scheduler.py:5636``; ``compute_weight_version_spans`` :66; ``add_weight_versions_to_meta_info`` :90,
called for every finished request, ``tokenizer_manager.py:2560``), and ``num_retractions``
(``tokenizer_manager.py:2512``). A
version change outside a pause (``/update_weight_version``) applies once the running rows finish.
``abort_all_requests`` of the weight-update bodies (SGLang's default False; True for
``/update_weight_version``) aborts every request first, as SGLang does.

Memory release (``/release_memory_occupation`` / ``/resume_memory_occupation``, body ``{"tags": [...]}``,
tags ``kv_cache``, ``weights``, ``cuda_graph``, none = all: ``SchedulerWeightUpdaterManager``,
``weight_updater.py:337-425``). SGLang frees memory only with ``--enable-memory-saver``
(``torch_memory_saver``; without it the adapter is a no-op: ``scheduler.py:1489``,
``utils/torch_memory_saver_adapter.py``),
and the weights' content is lost unless ``--enable-weights-cpu-backup`` (``load_model_utils.py:307``:
``region(GPU_MEMORY_TYPE_WEIGHTS, enable_cpu_backup=...)``); buffers are stashed and restored either way
(``_export_static_state``). Here, with ``--enable-memory-saver``, releasing ``weights`` frees every
parameter's storage (resized to 0 bytes, then ``malloc_trim``; the parameters are copied into
process-owned memory at start, since the safetensors load maps them from the file), and resume
re-allocates them zero-filled: ``/generate`` and ``/get_weights_by_name`` answer 400 until every tensor
has been loaded again by an ``/update_weights_from_*``, and the message says how many are missing.
With ``--enable-weights-cpu-backup`` too, the weights are kept (on the CPU the backup is the weights
themselves: nothing is freed; on CUDA they move to the CPU). Without ``--enable-memory-saver`` nothing is
freed (CUDA: the model moves to the CPU and back, as before). Stricter than SGLang, where each of
these crashes the scheduler or computes on unmapped memory: a release while rows are running or held
in place is 400 (SGLang asserts ``is_fully_idle``), resuming a tag that is not released is 400 (SGLang's
``offload_tags.remove`` raises KeyError), and while any tag is released ``/generate``, weight updates
and ``/get_weights_by_name`` are 400 and ``/health`` is 503. ``kv_cache`` frees nothing more on this
server: it keeps no K/V cache between batches.

Simplifications against SGLang: one scheduler thread with batches of up to ``--max-running-requests``
sequences (newcomers join a running batch between decode steps), no radix cache (so ``/flush_cache``
only checks that nothing is pending), no streaming, no text (token ids only: ``text`` is always "").
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import os
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
    enable_memory_saver: bool = False
    enable_weights_cpu_backup: bool = False


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
    p.add_argument("--enable-memory-saver", action="store_true",
                   help="/release_memory_occupation frees the tagged memory (SGLang's flag): the weights' "
                        "content is lost and must be sent again after resume, unless --enable-weights-cpu-backup")
    p.add_argument("--enable-weights-cpu-backup", action="store_true",
                   help="keep the weights over a release (SGLang's flag; on the CPU this frees nothing for them)")
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
                      stall_timeout_s=a.stall_timeout_s, weight_group_timeout_s=a.weight_group_timeout_s,
                      enable_memory_saver=a.enable_memory_saver, enable_weights_cpu_backup=a.enable_weights_cpu_backup)


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


def own_parameter_storage(model) -> None:
    """Copy every parameter into memory this process owns. The safetensors load maps parameters
    from the file, and such a storage cannot be resized: ``free_parameter_storage`` needs its own.
    Tied parameters are one ``Parameter`` object, so they stay tied."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


def free_parameter_storage(model) -> list[tuple[torch.Tensor, int]]:
    """Free the storage of every parameter of ``model`` (resized to 0 bytes: shapes stay, content is
    lost); returns (parameter, bytes) for ``restore_parameter_storage``, one per storage."""
    freed, seen = [], set()
    for param in model.parameters():
        storage = param.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        freed.append((param, storage.nbytes()))
    for param, _ in freed:
        param.untyped_storage().resize_(0)
    return freed


def restore_parameter_storage(freed: list[tuple[torch.Tensor, int]]) -> None:
    """Allocate the storages ``free_parameter_storage`` freed again, zero-filled (their content is gone)."""
    with torch.no_grad():
        for param, nbytes in freed:
            param.untyped_storage().resize_(nbytes)
            param.zero_()


def trim_process_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``): tensors below the allocator's mmap
    threshold are freed into the heap, where the process would keep them; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class Cancelled(Exception):
    """The request's sequences were cancelled (its client left) before they finished."""


PAUSE_MODES = ("abort", "retract", "in_place")        # PauseGenerationReqInput.mode
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")   # srt/constants.py GPU_MEMORY_ALL_TYPES
ABORT_RUNNING = "Aborted"                             # FINISH_ABORT() without a message
ABORT_QUEUED = "Abort in waiting queue"               # TokenizerManager._handle_abort_req's default
FLUSH_REFUSED = ("Weights were updated, but the cache was not flushed because requests are still running or "
                 "queued. Retract or finish them, then call /flush_cache.")  # flush_cache_after_weight_update


def weight_version_spans(events: list[tuple[str, int]], current: str, tokens: int) -> list[dict]:
    """SGLang's ``weight_versions`` of a finished request: [{"version", "start", "end"}] over its
    ``tokens`` output tokens, from the (old version, tokens made before the change) events and the
    version at its finish (``compute_weight_version_spans`` then ``add_weight_versions_to_meta_info``,
    ``srt/utils/weight_versions.py``): a version shows over [start, end) of the output tokens."""
    spans: list[dict] = []
    for version, end in [*events, (current, tokens)]:
        end = min(end, tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return [s for s in spans if s["start"] < tokens or s["start"] == 0]


class JobQueue:
    """The waiting (sequence, slot) jobs, first in first out; retracted rows go back to the front."""

    def __init__(self):
        self._jobs: collections.deque = collections.deque()
        self._cond = threading.Condition()

    def put(self, job) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def put_front(self, jobs: list) -> None:
        with self._cond:
            self._jobs.extendleft(reversed(jobs))
            self._cond.notify()

    def get(self, timeout: float | None = None):
        """The first job, waiting up to ``timeout`` seconds for one (0: no wait); None when empty."""
        with self._cond:
            if timeout:
                self._cond.wait_for(lambda: self._jobs, timeout)
            return self._jobs.popleft() if self._jobs else None

    def take(self, which=lambda job: True) -> list:
        """Remove and return the jobs ``which`` selects, in order."""
        with self._cond:
            out = [job for job in self._jobs if which(job)]
            if out:
                keep = [job for job in self._jobs if not which(job)]
                self._jobs.clear()
                self._jobs.extend(keep)
            return out

    def snapshot(self) -> list:
        with self._cond:
            return list(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)


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
        if args.enable_memory_saver:
            own_parameter_storage(self.model)
        self.model_path = args.model_path
        self.context_len = context_length(self.config)
        eos = self.config.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else ([eos] if isinstance(eos, int) else eos))
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self.generator = torch.Generator(device=self.device).manual_seed(args.random_seed)
        self.weight_version = args.weight_version
        self.model_lock = threading.Lock()         # held by a running batch (not while parked) and by weight loads
        self._lock_waiters = 0                      # weight operations waiting for model_lock (_exclusive)
        self._waiters_lock = threading.Lock()
        self.queue = JobQueue()
        self.running = threading.Event()            # cleared by /pause_generation
        self.running.set()
        self.pause_mode: str | None = None          # the mode of the pause in force (None: generating)
        self._cond = threading.Condition()          # pause state changes and the scheduler's answers to them
        self._held: list[SequenceRequest] = []      # rows parked between decode steps by an in_place pause
        self._abort_running = False                 # abort_all: the running rows end after their next token
        self._collected: list[tuple] = []           # the jobs of the scheduler's batch (admitted ones too)
        self.busy = False
        self.in_batch = False                       # generate_batch is running (progress_at is its heartbeat)
        self.progress_at = time.monotonic()
        self.released_tags: set[str] = set()        # memory tags released and not resumed
        self._freed: list[tuple[torch.Tensor, int]] = []  # (parameter, bytes) whose storage a release freed
        self.weights_missing: set[str] = set()      # tensors not loaded since their content was lost
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
            job = self.queue.get(0)
            if job is None or not job[0].cancelled:
                return job
            self._fail(job[1], "cancelled")

    @staticmethod
    def _fail(slot: dict, why: str) -> None:
        if not slot["done"].is_set():
            slot["error"] = why
            slot["done"].set()
            if slot.get("notify"):
                slot["notify"]()

    def _answer(self, seq: SequenceRequest, slot: dict) -> None:
        """The sequence has finished (or was aborted): its slot is done, at the current weight version."""
        if seq.cancelled:
            return self._fail(slot, "cancelled")
        if slot["done"].is_set():
            return None
        slot["version"] = self.weight_version
        slot["done"].set()
        if slot.get("notify"):
            slot["notify"]()
        return None

    def _schedule(self) -> None:
        while not self.stopping.is_set():
            if not self.running.wait(timeout=0.1):
                continue
            first = self.queue.get(timeout=0.1)
            if first is None:
                continue
            if first[0].cancelled:
                self._fail(first[1], "cancelled")
                continue
            self.busy = True  # from here on, a request is held by the scheduler (flush_cache must refuse)
            self._collected = [first]
            batch, slots = [first], {}
            try:
                if not self.running.is_set():  # paused after we took it: back to the queue
                    continue
                while len(batch) < self.args.max_running_requests:
                    job = self._take()
                    if job is None:
                        break
                    batch.append(job)
                slots = {id(s): slot for s, slot in batch}
                self._collected = list(batch)  # live rows for _set_version, pending and release
                while self._lock_waiters and not self.stopping.is_set():  # a weight operation goes first
                    time.sleep(0.005)
                with self.model_lock:
                    if not self.running.is_set():  # paused while we waited for the lock
                        continue
                    why = self.cannot_generate()
                    if why is not None:
                        raise RequestError(why)
                    self.progress_at, self.in_batch = time.monotonic(), True
                    left = generate_batch(self.model, [s for s, _ in batch], pad_token_id=self.pad_token_id,
                                          eos_token_ids=self.eos_token_ids, generator=self.generator,
                                          device=self.device, pause=self._between_steps,
                                          **self._continuous_batching(slots))
                    for seq in left:  # retracted: back to the front of the queue, tokens kept
                        seq.retractions += 1
                    self.queue.put_front([(seq, slots[id(seq)]) for seq in left])
                batch = []
            except Exception as exc:  # noqa: BLE001 - reported to every waiting request
                for slot in slots.values():
                    self._fail(slot, f"{type(exc).__name__}: {exc}")
                batch = []
            finally:
                if batch:  # not run (paused meanwhile): back to the queue, in order
                    self.queue.put_front(batch)
                with self._cond:
                    self.in_batch = False
                    self.busy = False
                    self._collected = []
                    self._abort_running = False
                    self._cond.notify_all()

    def _between_steps(self, rows: list[SequenceRequest]) -> bool:
        """``generate_batch``'s ``pause``: called with the model lock held between decode steps.
        in_place parks the rows here with the lock released (weight operations run meanwhile) until
        the pause ends or changes mode; retract returns True (the rows go back to the queue); abort
        marks the rows to end after their next token (module doc)."""
        self.progress_at = time.monotonic()
        if self._abort_running:
            self._abort_running = False
            for s in rows:
                s.abort_message = s.abort_message or ABORT_RUNNING
        mode = self.pause_mode
        if mode is None or mode == "abort":  # abort: the rows were marked by abort_all
            return False
        if mode == "retract":
            return True
        with self._cond:
            self._held = list(rows)
            self._cond.notify_all()
        self.model_lock.release()
        try:
            with self._cond:
                while self.pause_mode == "in_place" and not self.stopping.is_set():
                    self._cond.wait(0.5)  # stopping.set() does not notify: look again now and then
        finally:
            self.model_lock.acquire()
            with self._cond:
                self._held = []
                self.progress_at = time.monotonic()
        if self.stopping.is_set():
            raise RuntimeError("the server is shutting down")
        return self._between_steps(rows)  # continued, or paused again in another mode

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
                job = self._take()
                if job is None:
                    break
                seq, slot = job
                slots[id(seq)] = slot
                self._collected.append(job)
                joining.append(seq)
            running[0] += len(joining)
            return joining

        def on_finish(seq) -> None:
            running[0] -= 1
            self._answer(seq, slots[id(seq)])

        return {"admit": admit, "on_finish": on_finish}

    @contextlib.contextmanager
    def _exclusive(self):
        """The model lock for a weight operation; while it waits, running batches admit nobody, so
        the lock comes free once the rows already decoding have finished, or at once when they are
        paused (``_between_steps`` parks them without the lock)."""
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

    # ---- pause / continue ----
    def pause(self, body: dict) -> dict:
        """``/pause_generation``: see the module doc. Answers once the scheduler has stopped: rows
        parked (in_place), back in the queue (retract), or every running request answered (abort)."""
        mode = body.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise RequestError(f"/pause_generation: mode must be one of {'|'.join(PAUSE_MODES)}, got {mode!r:.60}")
        with self._cond:
            self.pause_mode = mode
            self.running.clear()
            self._cond.notify_all()
        if mode == "abort":
            self.abort_all()
        with self._cond:
            stopped = self._cond.wait_for(lambda: not self.busy or (mode == "in_place" and self._held),
                                          timeout=self.args.stall_timeout_s)
        if not stopped:
            raise RuntimeError(f"/pause_generation: the running batch did not reach a decode-step boundary within "
                               f"{self.args.stall_timeout_s:g}s (--stall-timeout-s)")
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self) -> dict:
        with self._cond:
            self.pause_mode = None
            self.running.set()
            self._cond.notify_all()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def abort_all(self) -> None:
        """Abort every request, as SGLang's ``abort_request(abort_all=True)``: queued ones are answered
        now (finish_reason "Abort in waiting queue"), running and parked rows after their next token."""
        for seq, slot in self.queue.take():
            seq.finish = ("abort_queued", ABORT_QUEUED)
            self._answer(seq, slot)
        with self._cond:
            for seq in self._held:
                seq.abort_message = seq.abort_message or ABORT_RUNNING
            self._abort_running = self.busy  # cleared when the batch ends: never aborts a later one

    def health(self) -> str | None:
        """Why ``/health`` must fail (None: healthy): memory released, the scheduler thread gone, or a
        batch that made no progress for ``--stall-timeout-s`` (SGLang's ``/health_generate`` fails when
        the scheduler sent nothing back for its HEALTH_CHECK_TIMEOUT); rows parked by an in_place
        pause are not a stall."""
        if self.released_tags:
            return f"memory released ({', '.join(sorted(self.released_tags))})"
        if not self.scheduler.is_alive():
            return "the scheduler thread is gone"
        idle = time.monotonic() - self.progress_at
        if self.in_batch and not self._held and idle > self.args.stall_timeout_s:
            return f"generation made no progress for {idle:.0f}s (--stall-timeout-s {self.args.stall_timeout_s:g})"
        return None

    def ready(self) -> str | None:
        """Why ``/ready`` must fail: as ``/health``, or generation paused (SGLang's ``is_ready``)."""
        return self.health() or ("generation paused" if self.pause_mode is not None else None)

    def cannot_generate(self) -> str | None:
        """Why no sequence can be sampled now (None: it can): memory released, or weights whose
        content a release lost and that have not all been loaded again."""
        if self.released_tags:
            return (f"memory is released ({', '.join(sorted(self.released_tags))}): call /resume_memory_occupation "
                    "first")
        missing = list(self.weights_missing)  # a copy: a weight load (model lock) may be shrinking the set
        if missing:
            return (f"the weights were released by /release_memory_occupation (--enable-memory-saver without "
                    f"--enable-weights-cpu-backup loses them) and {len(missing)} tensors have not been "
                    f"loaded since, e.g. {min(missing)!r}: send the weights (/update_weights_from_*) first")
        return None

    def plan(self, body) -> GeneratePlan:
        """The checked /generate request (400 naming the field otherwise; see ``server_schema``)."""
        why = self.cannot_generate()
        if why is not None:
            raise RequestError(f"/generate: {why}")
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

    def _unfinished(self) -> list[tuple]:
        """The scheduler's jobs not answered yet (running, or taken for the next batch). ``busy`` alone
        would count a batch that answered its last row and is winding down."""
        return [job for job in list(self._collected) if not job[1]["done"].is_set()]

    def pending(self) -> bool:
        """Whether ``/flush_cache`` must refuse: rows running or parked in place, or (not paused) a
        request queued; while paused the queue does not count, as SGLang's ``flush_cache`` passes
        ``ignore_waiting=self._engine_paused``. Queued requests whose client left are dropped first,
        so they never hold a flush."""
        for _, slot in self.queue.take(lambda job: job[0].cancelled):
            self._fail(slot, "cancelled")
        if self._held:
            return True
        if self.pause_mode is not None:
            return False
        return bool(self._unfinished()) or len(self.queue) > 0

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
            if kind == "abort_queued":  # TokenizerManager._handle_abort_req
                reason = {"type": "abort", "message": val}
            elif kind == "abort":
                reason = finish_reason("abort", message=val)
            else:
                reason = finish_reason(kind, matched=val) if kind == "stop" else finish_reason(kind, length=val)
            spans = weight_version_spans(seq.version_events, slot["version"], len(seq.output_ids))
            meta = {"id": f"{rid}-{k}", "prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.output_ids),
                    "cached_tokens": 0, "finish_reason": reason, "weight_version": spans[-1]["version"],
                    "weight_versions": spans, "num_retractions": seq.retractions, "e2e_latency": time.time() - t0}
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

        if "weights" in self.released_tags:  # SGLang would write into unmapped memory
            raise RequestError("the weights are released (/release_memory_occupation): call "
                               "/resume_memory_occupation first; nothing was loaded")
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
        if self.weights_missing:
            for name, _ in named:
                self.weights_missing.discard(name)
                if name == "lm_head.weight" and tied:
                    self.weights_missing.discard("model.embed_tokens.weight")

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
        self._abort_if_asked(body, False)
        with self._exclusive():
            self.load_named_tensors(named)
            self.model_path = path
            self._set_version(version)
            self._flush_after_update(body)
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
        self._abort_if_asked(body, False)
        with self._exclusive():
            self.load_named_tensors(named)
            self._set_version(body.get("weight_version"))
            self._flush_after_update(body)
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
        self._abort_if_asked(body, False)
        with self._exclusive():
            self.load_named_tensors(named)  # checks every name and shape before the first copy
            self.tensor_receipts += len(named)
            self._set_version(body.get("weight_version"))
            self._flush_after_update(body)
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
            why = self.cannot_generate()
            if why is not None:
                raise RequestError(f"/get_weights_by_name: {why}")
            return params[name].detach()[:size].float().cpu().tolist()  # == tolist()[:size], without the full copy

    # ---- weight versions, update options ----
    def _set_version(self, version) -> None:
        """Make ``version`` current (None or the current one: nothing), recording on every live row
        that has tokens where the old version ended (SGLang's ``record_weight_version_change``, which
        takes the running batch, the waiting queue and the chunked request). Called with the model
        lock held, so the live rows are the parked ones, the queued ones and those of a batch about to
        start (a retracted row taken from the queue keeps its tokens)."""
        if version is None or str(version) == self.weight_version:
            return
        old = self.weight_version
        live = {id(s): s for s in [*self._held, *(s for s, _ in self._unfinished()),
                                   *(s for s, _ in self.queue.snapshot())]}
        for seq in live.values():
            if seq.output_ids:
                seq.version_events.append((old, len(seq.output_ids)))
        self.weight_version = str(version)

    def update_weight_version(self, body: dict) -> dict:
        """``/update_weight_version`` (``UpdateWeightVersionReqInput``: ``abort_all_requests`` defaults
        to True). Waits for the running rows unless paused (module doc)."""
        if "new_version" not in body:
            raise RequestError("/update_weight_version: missing new_version")
        self._abort_if_asked(body, True)
        with self._exclusive():
            self._set_version(body["new_version"])
        return {"success": True, "message": f"Weight version updated to {self.weight_version}",
                "new_version": self.weight_version}

    def _abort_if_asked(self, body: dict, default: bool) -> None:
        flag = body.get("abort_all_requests", default)
        if not isinstance(flag, bool):
            raise RequestError(f"abort_all_requests must be a boolean, got {flag!r:.40}")
        if flag:
            self.abort_all()

    def _flush_after_update(self, body: dict) -> None:
        """A weight update's ``flush_cache`` (default True): refused while rows are parked in place,
        after the weights and version were updated (``flush_cache_after_weight_update``)."""
        flag = body.get("flush_cache", True)
        if not isinstance(flag, bool):
            raise RequestError(f"flush_cache must be a boolean, got {flag!r:.40}")
        if flag and self._held:
            raise RequestError(FLUSH_REFUSED)

    # ---- memory release (module doc) ----
    @staticmethod
    def _memory_tags(body: dict, where: str) -> set[str]:
        tags = body.get("tags")
        if tags is None or tags == []:
            return set(MEMORY_TAGS)
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RequestError(f"{where}: tags must be a list of strings, got {tags!r:.80}")
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise RequestError(f"{where}: unknown tag {unknown[0]!r} (SGLang's tags: {', '.join(MEMORY_TAGS)})")
        return set(tags)

    def release_memory(self, body: dict) -> None:
        """``/release_memory_occupation``: only when nothing runs (rows parked in place hold their K/V
        cache; while not paused, queued requests would run next); a tag already released is 400."""
        where = "/release_memory_occupation"
        tags = self._memory_tags(body, where)
        with self._exclusive():
            if self._held or (self.pause_mode is None and (self._unfinished() or len(self.queue))):
                why = (f"{len(self._held)} rows are paused in place with their K/V cache (continue them, or pause "
                       "with mode retract)" if self._held else "requests are running or queued (pause first)")
                raise RequestError(f"{where}: release_memory_occupation should be called only when server is "
                                   f"idle: {why}")
            again = sorted(tags & self.released_tags)
            if again:
                raise RequestError(f"{where}: {again[0]!r} is already released")
            if "weights" in tags:
                self._release_weights()
            self.released_tags |= tags
        trim_process_heap()
        # SGLang's route returns nothing on success: HTTP 200, body null (http_server.py:1575-1584)

    def resume_memory(self, body: dict) -> None:
        where = "/resume_memory_occupation"
        tags = self._memory_tags(body, where)
        with self._exclusive():
            absent = sorted(tags - self.released_tags)
            if absent:
                raise RequestError(f"{where}: {absent[0]!r} is not released (released: "
                                   f"{sorted(self.released_tags) or 'none'}); SGLang's scheduler fails on this "
                                   "(offload_tags.remove)")
            if "weights" in tags:
                self._resume_weights()
            self.released_tags -= tags

    def _release_weights(self) -> None:
        if not self.args.enable_memory_saver:  # SGLang: a no-op adapter; CUDA: moved aside as before
            if self.device.type == "cuda":
                self.model.to("cpu")
                torch.cuda.empty_cache()
            return
        if self.args.enable_weights_cpu_backup:  # the content survives
            if self.device.type == "cuda":
                self.model.to("cpu")
                torch.cuda.empty_cache()
            return
        state, optional = self.model_tensor_set()
        buffers = {name for name, _ in self.model.named_buffers()}  # kept, as SGLang stashes them
        self.weights_missing = {name for name in state if name not in optional and name not in buffers}
        del state
        self._freed = free_parameter_storage(self.model)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _resume_weights(self) -> None:
        if self._freed:
            restore_parameter_storage(self._freed)
            self._freed = []
        elif self.device.type == "cuda":
            self.model.to(self.device)

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
                "enable_memory_saver": a.enable_memory_saver, "enable_weights_cpu_backup": a.enable_weights_cpu_backup,
                "popo_weight_updates": {"received_per_tp_rank": self.received(), "closed_windows": windows,
                                        "window_open": self.window_open},
                "popo_state": {"pause_mode": self.pause_mode, "rows_paused_in_place": len(self._held),
                               "queued": len(self.queue), "released_tags": sorted(self.released_tags),
                               "weights_missing": len(self.weights_missing)}}

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
