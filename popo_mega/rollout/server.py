"""``popo-rollout-server``: an SGLang-API-compatible rollout server on a ``transformers`` model.

    popo-rollout-server --model-path DIR [--host 127.0.0.1] [--port 30000] [--device cpu|cuda]
                        [--dtype auto|float32|bfloat16|float16] [--random-seed N] [--api-key KEY]
                        [--max-running-requests N] [--weight-version V] [--num-threads N]
                        [--strict-sglang] [--tp-size N] [--enable-deterministic-inference]

Flag names are ``sglang.launch_server``'s where they overlap. It serves the native SGLang endpoints
the rollout client and the weight sync use, with SGLang's request and response bodies:
``/health``, ``/health_generate``, ``/ready``, ``/generate``, ``/model_info`` (``/get_model_info``;
carries ``weight_version``), ``/flush_cache``, ``/pause_generation``, ``/continue_generation``,
``/update_weights_from_disk``, ``/init_weights_update_group``, ``/begin_weight_update``,
``/update_weights_from_distributed`` (per-tensor broadcasts, or ``load_format: "flattened_bucket"``),
``/update_weights_from_tensor`` (same-host handles, ``tensor_ipc``; only inside a window, either mode),
``/end_weight_update``, ``/destroy_weights_update_group``, ``/update_weight_version``,
``/get_weights_by_name``, ``/release_memory_occupation``, ``/resume_memory_occupation``,
``/server_info`` (``/get_server_info``).

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

Simplifications against SGLang: stdlib ``http.server`` (a thread per connection), one scheduler
thread with static batches of up to ``--max-running-requests`` sequences, no radix cache (so
``/flush_cache`` only checks that nothing is pending), no streaming, no text (token ids only:
``text`` is always "").
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from popo_mega.rollout.generation import SequenceRequest, generate_batch
from popo_mega.rollout.server_tp_ranks import TpRankGroup
from popo_mega.rollout.sglang_api import finish_reason


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


def parse_args(argv) -> ServerArgs:
    p = argparse.ArgumentParser(prog="popo-rollout-server", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
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
    a = p.parse_args(argv)
    if a.tp_size < 1:
        p.error(f"--tp-size must be >= 1, got {a.tp_size}")
    return ServerArgs(model_path=a.model_path, host=a.host, port=a.port, device=a.device, dtype=a.dtype,
                      random_seed=a.random_seed, api_key=a.api_key,
                      max_running_requests=a.max_running_requests, weight_version=a.weight_version,
                      num_threads=a.num_threads, parent_pid=a.parent_pid, strict_sglang=a.strict_sglang,
                      tp_size=a.tp_size, enable_deterministic_inference=a.enable_deterministic_inference)


# SGLang 0.5.23 model classes that define get_weights_by_name (grep "def get_weights_by_name"
# sglang/srt/models/): llama.py (and its subclasses' registered names), granite.py, exaone4.py,
# opt.py. Everything else, Qwen2ForCausalLM included, answers /get_weights_by_name with 400.
SGLANG_WEIGHT_READERS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "GraniteForCausalLM",
                                   "Exaone4ForCausalLM", "OPTForCausalLM"})
DETERMINISTIC_DEFAULT_SEED = 42  # SamplingBatchInfo.from_schedule_batch: a row without sampling_seed


class RequestError(Exception):
    """A bad request body: answered with HTTP 400 and the message."""


def _torch_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise RequestError(f"{where}: unknown dtype {name!r}")
    return dtype


ADMIT_STEPS = 64  # requests join a running batch during its first 64 decode steps (RolloutServer._continuous_batching)


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
        eos = self.config.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else ([eos] if isinstance(eos, int) else eos))
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self.generator = torch.Generator(device=self.device).manual_seed(args.random_seed)
        self.weight_version = args.weight_version
        self.model_lock = threading.Lock()         # held by a running batch and by weight loads
        self.queue: queue.Queue = queue.Queue()
        self.running = threading.Event()            # cleared by /pause_generation
        self.running.set()
        self.busy = False
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
    def _schedule(self) -> None:
        while not self.stopping.is_set():
            if not self.running.wait(timeout=0.1):
                continue
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.busy = True  # from here on, a request is held by the scheduler (flush_cache must refuse)
            while not self.running.wait(timeout=0.1):  # paused after we started waiting: hold it
                if self.stopping.is_set():
                    return
            batch = [first]
            while len(batch) < self.args.max_running_requests:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            slots = {id(s): slot for s, slot in batch}
            try:
                with self.model_lock:
                    if self.released:
                        raise RuntimeError("memory released (call /resume_memory_occupation first)")
                    generate_batch(self.model, [s for s, _ in batch], pad_token_id=self.pad_token_id,
                                   eos_token_ids=self.eos_token_ids, generator=self.generator, device=self.device,
                                   **self._continuous_batching(slots))
            except Exception as exc:  # noqa: BLE001 - reported to every waiting request
                for slot in slots.values():
                    if not slot["done"].is_set():
                        slot["error"] = f"{type(exc).__name__}: {exc}"
                        slot["done"].set()
            finally:
                self.busy = False

    # ---- continuous batching (generate_batch's admit / on_finish; owned by the rollout-generation work) ----
    def _continuous_batching(self, slots: dict) -> dict:
        """``generate_batch``'s callbacks for one batch, run with the model lock held: a finished
        sequence is answered at once; requests queued while the batch runs join it between decode
        steps (up to --max-running-requests rows), so the prompts of one rollout step that reach the
        server one by one share their decode steps (before, the first of 32 concurrent requests
        often ran alone and the other 31 after it). Joining stops while generation is paused and
        after ADMIT_STEPS steps, so a steady stream of requests cannot hold the model lock against
        weight updates."""
        running = [len(slots)]

        def admit(step: int) -> list:
            joining = []
            while (step <= ADMIT_STEPS and self.running.is_set()
                   and running[0] + len(joining) < self.args.max_running_requests):
                try:
                    seq, slot = self.queue.get_nowait()
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
            slot["done"].set()

        return {"admit": admit, "on_finish": on_finish}

    def generate(self, body: dict) -> object:
        prompts = body.get("input_ids")
        if prompts is None:
            raise RequestError("/generate: this server needs input_ids (it has no tokenizer; text is not accepted)")
        single = bool(prompts) and isinstance(prompts[0], int)
        prompts = [prompts] if single else prompts
        if not prompts or any(not p or not all(isinstance(t, int) for t in p) for p in prompts):
            raise RequestError("/generate: input_ids must be a non-empty list of token ids (or a list of such lists)")
        vocab = self.config.vocab_size
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"/generate: token id {bad[0]} outside the vocabulary [0, {vocab})")
        sp_all = body.get("sampling_params") or {}
        sp_list = sp_all if isinstance(sp_all, list) else [sp_all] * len(prompts)
        if len(sp_list) != len(prompts):
            raise RequestError(f"/generate: {len(sp_list)} sampling_params for {len(prompts)} prompts")
        return_logprob = body.get("return_logprob") or False
        start_len = body.get("logprob_start_len")
        start_len = -1 if start_len is None else start_len
        rid = body.get("rid") or uuid.uuid4().hex
        t0 = time.time()
        jobs = []
        for i, (p, sp) in enumerate(zip(prompts, sp_list)):
            n = int(sp.get("n", 1) or 1)
            stop = sp.get("stop_token_ids") or []
            if sp.get("stop"):
                raise RequestError("/generate: string 'stop' needs a tokenizer; use stop_token_ids")
            seed = self._sampling_seed(sp.get("sampling_seed"))
            for j in range(n):
                seq = SequenceRequest(prompt=list(p), temperature=float(sp.get("temperature", 1.0)),
                                      top_p=float(sp.get("top_p", 1.0)),
                                      max_new_tokens=int(sp.get("max_new_tokens", 128)),
                                      stop_token_ids=frozenset(int(t) for t in stop),
                                      logprob_start_len=start_len if return_logprob else -1, seed=seed)
                if sp.get("sampling_seed") is not None and seq.seed is not None and n > 1:
                    # SGLang would give all n the same sample
                    raise RequestError("/generate: sampling_seed with n > 1 gives n identical samples; "
                                       "send n prompts with one seed each")
                if seq.top_p <= 0 or seq.top_p > 1:
                    raise RequestError(f"/generate: top_p must be in (0, 1], got {seq.top_p}")
                if seq.temperature < 0:
                    raise RequestError(f"/generate: temperature must be >= 0, got {seq.temperature}")
                jobs.append((seq, {"done": threading.Event()}))
        for job in jobs:
            self.queue.put(job)
        outs = []
        for k, (seq, slot) in enumerate(jobs):
            slot["done"].wait()
            if "error" in slot:
                raise RuntimeError(slot["error"])
            kind, val = seq.finish
            meta = {"id": f"{rid}-{k}", "prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.output_ids),
                    "cached_tokens": 0,
                    "finish_reason": finish_reason(kind, matched=val) if kind == "stop" else finish_reason(kind, length=val),
                    "weight_version": slot["version"], "e2e_latency": time.time() - t0}
            if return_logprob:
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(seq.output_logprobs, seq.output_ids)]
                if seq.logprob_start_len >= 0:
                    meta["input_token_logprobs"] = [[lp, t, None] for lp, t in
                                                    zip(seq.input_logprobs, seq.prompt[seq.logprob_start_len:])]
            outs.append({"text": "", "output_ids": list(seq.output_ids), "meta_info": meta})
        return outs[0] if len(outs) == 1 else outs

    def _sampling_seed(self, value) -> int | None:
        """The seed a row samples with: SGLang builds per-row seeds only under
        --enable-deterministic-inference, 42 for a row without one (strict mode); the lenient
        mode honours every given seed."""
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not -(2 ** 63) <= value <= 2 ** 63 - 1):
            raise RequestError(f"/generate: sampling_seed must be an integer in [-2**63, 2**63 - 1], got {value!r}")
        if not self.args.strict_sglang:
            return value
        if not self.args.enable_deterministic_inference:
            return None
        return DETERMINISTIC_DEFAULT_SEED if value is None else value

    # ---- weights ----
    def load_named_tensors(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model (names and shapes checked before any copy)."""
        params = dict(self.model.named_parameters())
        params.update({k: v for k, v in self.model.named_buffers() if k not in params})
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        targets = []
        for name, tensor in named:
            key = "model.embed_tokens.weight" if (name == "lm_head.weight" and tied and name not in params) else name
            if key not in params:
                raise RequestError(f"unknown parameter name {name!r} (not in the served model)")
            if tuple(params[key].shape) != tuple(tensor.shape):
                raise RequestError(f"parameter {name!r}: shape {tuple(tensor.shape)} != served {tuple(params[key].shape)}")
            targets.append((params[key], tensor))
        with torch.no_grad():
            for param, tensor in targets:
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    def update_from_disk(self, body: dict) -> dict:
        from safetensors.torch import load_file

        path = body.get("model_path")
        if not path or not os.path.isdir(path):
            raise RequestError(f"/update_weights_from_disk: model_path {path!r} is not a directory")
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise RequestError(f"/update_weights_from_disk: no *.safetensors in {path}")
        named = [kv for f in files for kv in load_file(f).items()]
        with self.model_lock:
            self.load_named_tensors(named)
            self.model_path = path
            if body.get("weight_version") is not None:
                self.weight_version = str(body["weight_version"])
        return {"success": True, "message": f"Succeeded to update model weights from {len(files)} file(s).",
                "num_paused_requests": 0}

    def init_group(self, body: dict) -> dict:
        """Join the group with ``--tp-size`` ranks ``rank_offset + tp_rank`` (SGLang's ranks)."""
        try:
            name = body.get("group_name", "weight_update_group")
            if name in self.groups:
                raise RequestError(f"group {name!r} already exists")
            group = TpRankGroup(master_address=body["master_address"], master_port=int(body["master_port"]),
                                rank_offset=int(body["rank_offset"]), world_size=int(body["world_size"]),
                                group_name=name, backend=body.get("backend", "nccl"), tp_size=self.args.tp_size)
        except KeyError as exc:
            raise RequestError(f"/init_weights_update_group: missing field {exc}") from None
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
        with self.model_lock:
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
        with self.model_lock:
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
        with self.model_lock:
            return params[name].detach()[:size].float().cpu().tolist()  # == tolist()[:size], without the full copy

    def set_released(self, released: bool) -> None:
        with self.model_lock:
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


def _handler(server: RolloutServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args):  # keep test logs quiet
            pass

        def _send(self, status: int, payload, text: bool = False):
            data = (payload if text else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if not length:
                return {}
            try:
                body = json.loads(self.rfile.read(length))
            except json.JSONDecodeError as exc:
                raise RequestError(f"request body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise RequestError("request body must be a JSON object")
            return body

        def _route(self, method: str):
            path = self.path.split("?")[0]
            if server.args.api_key and self.headers.get("Authorization") != f"Bearer {server.args.api_key}":
                return self._send(HTTPStatus.UNAUTHORIZED, {"error": "Unauthorized"})
            try:
                body = self._body() if method == "POST" else {}
                if path in ("/health", "/health_generate", "/ready"):
                    return self._send(200 if not server.released else 503, "", text=True)
                if path in ("/model_info", "/get_model_info"):
                    return self._send(200, server.model_info())
                if path == "/generate":
                    return self._send(200, server.generate(body))
                if path == "/flush_cache":
                    if server.busy or not server.queue.empty():
                        return self._send(400, "Flush cache failed: requests are pending.\n", text=True)
                    return self._send(200, "Cache flushed.\n", text=True)
                if path == "/pause_generation":
                    server.running.clear()
                    return self._send(200, {"message": "Generation paused successfully.", "status": "ok"})
                if path == "/continue_generation":
                    server.running.set()
                    return self._send(200, {"message": "Generation continued successfully.", "status": "ok"})
                if path == "/update_weights_from_disk":
                    return self._send(200, server.update_from_disk(body))
                if path == "/init_weights_update_group":
                    return self._send(200, server.init_group(body))
                if path in ("/server_info", "/get_server_info"):
                    return self._send(200, server.server_info())
                if path == "/begin_weight_update":
                    return self._send(200, server.begin_update())
                if path == "/end_weight_update":
                    return self._send(200, server.end_update())
                if path == "/update_weights_from_distributed":
                    return self._send(200, server.update_from_distributed(body))
                if path == "/update_weights_from_tensor":
                    return self._send(200, server.update_from_tensor(body))
                if path == "/destroy_weights_update_group":
                    out = server.destroy_group(body)
                    return self._send(200 if out["success"] else 400, out)
                if path == "/update_weight_version":
                    if "new_version" not in body:
                        raise RequestError("/update_weight_version: missing new_version")
                    server.weight_version = str(body["new_version"])
                    return self._send(200, {"success": True, "message": f"Weight version updated to {server.weight_version}",
                                            "new_version": server.weight_version})
                if path == "/get_weights_by_name":
                    return self._send(200, server.get_weights_by_name(body))
                if path in ("/release_memory_occupation", "/resume_memory_occupation"):
                    server.set_released(path == "/release_memory_occupation")
                    return self._send(200, "", text=True)
                return self._send(404, {"error": {"message": f"no route {method} {path}"}})
            except RequestError as exc:
                return self._send(400, {"success": False, "message": str(exc), "error": {"message": str(exc)}})
            except Exception as exc:  # noqa: BLE001 - a server error is answered, never crashes the server
                return self._send(500, {"success": False, "message": f"{type(exc).__name__}: {exc}",
                                        "error": {"message": f"{type(exc).__name__}: {exc}"}})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        do_PUT = do_POST

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: the default 5 reset bursts of 32 concurrent clients


def _exit_with_parent(parent_pid: int, httpd, interval_s: float = 0.5) -> None:
    """Shut the server down once ``parent_pid`` is no longer our parent (it exited or was killed:
    the kernel re-parents us at once, even while the dead parent is an unreaped zombie)."""
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    print(f"popo-rollout-server: parent process {parent_pid} is gone; shutting down", flush=True)
    httpd.shutdown()


def serve(args: ServerArgs, ready: threading.Event | None = None) -> None:
    """Load the model and serve until interrupted."""
    server = RolloutServer(args)
    httpd = _HTTPServer((args.host, args.port), _handler(server))
    if args.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid, httpd), name="parent-watch",
                         daemon=True).start()
    if ready is not None:
        ready.set()
    print(f"popo-rollout-server: serving {args.model_path} on http://{args.host}:{httpd.server_address[1]} "
          f"({server.device}, weight_version={server.weight_version})", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.1)
    finally:
        server.stopping.set()
        httpd.server_close()


def main(argv=None) -> int:
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.random_seed)
    try:
        serve(args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
