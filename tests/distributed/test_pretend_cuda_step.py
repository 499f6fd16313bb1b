"""A policy step and the weight-sync gather with the model on (pretend) CUDA, on the CPU wheel.

No GPU runs in CI, so a CPU tensor reaching the CUDA model or loss (or an NCCL collective) would
only show on the first GPU run. Here the whole step runs with real values on CPU tensors that
tests/pretend_cuda.py tracks as CUDA wherever the GPU run would put them (``rt.device`` is
``cuda:0``; megatron's ``torch.cuda.current_device()`` is 0; the model is built the way
``build_gpt_model`` builds it when CUDA is available: megatron's GPU initialisation, then
``model.cuda()``), and every op that mixes a CPU tensor with a CUDA one raises, as CUDA would.
Every collective of the default / TP / PP / DP groups is checked to get CUDA tensors only
(tests/collective_devices.py), as NCCL requires.

Covered, at TP=1 (1 process) and at TP=2, then DP=2, then PP=2, then TP=2 with sequence parallelism
(2 processes): packing and the move of every micro-batch to the device, the POPO target pass (EMA
swapped in, forward only), forward and backward through megatron's schedule (at PP=2 its p2p), the
POPO loss with the predictor and target noise, the normalisers and their DP all-reduce, the stats
all-reduces, the NaN/inf gradient check, megatron's optimizer step (the distributed optimizer's
reduce-scatter and all-gather, grad-norm clipping, Adam) and the EMA update; the all-masked
micro-batch of a DP rank without rollouts; one GRPO and one A3PO step (their normaliser branch,
A3PO's advantage shaping); ``sync_engine_weights`` with the EMA swapped in (``iter_hf_tensors``' TP
all-gathers, and at PP=2 the funnel's send/recv to rank 0). Then the failure cases: every
micro-batch field that the GPU path reads, left on the CPU alone, raises; and a CPU tensor handed
to the default group (what the loop's has-work all-reduce once did) raises in the collective check.

NOT covered (also in docs/architecture.md, "Pretend-CUDA dry run"): CUDA kernels themselves (CPU
kernels compute the values; popo_mega._C has no "cuda" kernel in this build, so the reference twins
run, as on a GPU build without the extension); Transformer Engine (not installable here: the local
spec with SDPA attention runs, plus a stand-in check that the packed cu_seqlens are CUDA int32 as
TE's attention needs); streams, events and communication overlap; NCCL itself; checkpoint save /
load; the rollout engine's own weight-update group (its ``broadcast_async`` checks the device
itself); the RL loop around the step (it decides whether a batch trains without a collective); and
tensors created in C++ from a CPU tensor without a Python call (they count as CUDA: a miss, never a
false alarm).
"""

import dataclasses

import pytest
import torch

from tests.multiprocess import run_world

# MicroBatch fields that a POPO step reads on the device: each left on the CPU must raise. The
# PackedSeqParams' cu_seqlens are checked by a stand-in for Transformer Engine's attention (TE's
# fused attention takes CUDA int32 cu_seqlens; our SDPA attention copies them over itself).
# The others are moved too but no GPU op reads them there: position_ids (RoPE positions come from
# the packed cu_seqlens), cu_seqlens (its readers copy it: masked_mean_pool, popo_normalisers),
# uids (read with .tolist() for the noise seeds), seq_index, sample_index, advantages and
# token_advantages (not read by a POPO step).
READ_ON_DEVICE = ("tokens", "labels", "mask", "feature_mask", "old_logp", "weights", "positive",
                  "packed_seq_params")


class _Engine:
    """Stands in for the rollout engine: records the device and shape of each tensor it is sent."""

    def __init__(self):
        self.received = {}

    def sync_weights(self, tensors, version):
        from tests.pretend_cuda import pretend_device

        for name, t in tensors:
            self.received[name] = (pretend_device(t).type, tuple(t.shape), bool(torch.isfinite(t).all()))


def _trainer(path, rt, over=None):
    from unittest import mock

    from popo_mega.model.loader import build_from_hf
    from popo_mega.train.step import PolicyTrainer
    from tests.distributed.test_train_step import make_cfg

    cfg = make_cfg(path, over, tensor=rt.tp, pipeline=rt.pp)
    with mock.patch("torch.cuda.is_available", return_value=True):   # build_gpt_model's GPU branch
        loaded = build_from_hf(cfg.model, rt, sequence_parallel=cfg.parallel.sequence_parallel)
    return PolicyTrainer(cfg, rt, loaded)


def _pretend_runtime(tp, pp=1):
    from popo_mega.runtime import initialize
    from tests.pretend_cuda import CUDA

    rt = initialize(tp, pp, seed=0, device="cpu")
    return dataclasses.replace(rt, device=CUDA)


def _left_on_cpu(field):
    """A MicroBatch.to that leaves ``field`` on the CPU (the defect this test must catch)."""
    from popo_mega.train.batch import MicroBatch

    original = MicroBatch.to

    def to(self, device):
        moved = original(self, device)
        if field == "packed_seq_params":
            moved.packed_seq_params = self.packed_seq_params
        else:
            setattr(moved, field, getattr(self, field))
        return moved

    return to


def _te_like_attention():
    """SDPAttention.forward, refusing packed cu_seqlens that are not CUDA int32 (as TE's fused
    attention refuses them), so that the dry run holds the packer to what the TE spec needs."""
    from popo_mega.model.attention import SDPAttention
    from tests.pretend_cuda import PretendDeviceMismatchError, pretend_device

    original = SDPAttention.forward

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            for name in ("cu_seqlens_q", "cu_seqlens_kv"):
                cu = getattr(packed_seq_params, name)
                if pretend_device(cu).type != "cuda" or cu.dtype != torch.int32:
                    raise PretendDeviceMismatchError(f"attention: packed_seq_params.{name} is {cu.dtype} on "
                                                     f"{pretend_device(cu)}; TE's attention takes CUDA int32")
        return original(self, query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)

    return forward


def _plain_step(rank, world_size, path):
    """One POPO step on the plain CPU runtime (no pretending), to compare the values with."""
    from popo_mega.runtime import initialize
    from tests.distributed.test_train_step import make_samples

    rt = initialize(1, 1, seed=0, device="cpu")
    from popo_mega.model.loader import build_from_hf
    from popo_mega.train.step import PolicyTrainer
    from tests.distributed.test_train_step import make_cfg

    cfg = make_cfg(path)
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
    return trainer.train_step([s for s in make_samples() if s.positive])


def _steps(rank, world_size, path, tp, then_dp2):
    from unittest import mock

    from popo_mega.runtime import cpu_compat

    cpu_compat.apply(pretend_cuda=True)   # before initialize(), which would apply the plain variant
    from popo_mega.model.attention import SDPAttention

    SDPAttention.forward = _te_like_attention()   # this spawned process only

    from megatron.core import parallel_state

    from popo_mega.train.batch import MicroBatch, shard_for_data_parallel
    from popo_mega.train.loop import sync_engine_weights
    from tests.collective_devices import CollectiveDeviceError, collective_devices_checked
    from tests.distributed.test_train_step import make_samples
    from tests.pretend_cuda import CUDA, PretendCuda, PretendDeviceMismatchError, pretend_device

    out = {}
    rt = _pretend_runtime(tp)
    mode = PretendCuda()
    with mode, collective_devices_checked(CUDA, device_of=pretend_device) as calls:
        trainer = _trainer(path, rt)
        out["param_devices"] = {pretend_device(p).type for p in trainer.model.parameters()}
        positives = [s for s in make_samples() if s.positive]
        out["popo"] = [trainer.train_step(positives)]
        engine = _Engine()
        sync_engine_weights(trainer, engine, use_ema=True, version="v1")
        out["received"] = engine.received
        if world_size == 1:
            for name in ("grpo", "a3po"):
                out[name] = _trainer(path, rt, {"algorithm.name": name}).train_step(make_samples())
        if then_dp2:   # same processes, re-initialised as TP=1 x DP=2
            parallel_state.destroy_model_parallel()
            rt = _pretend_runtime(1)
            assert rt.dp == 2
            dp_trainer = _trainer(path, rt)
            share = shard_for_data_parallel(positives, rt.dp, rt.dp_rank)
            out["dp2"] = dp_trainer.train_step(share)
            out["dp2_empty_rank"] = dp_trainer.train_step(positives if rank == 0 else [])
            parallel_state.destroy_model_parallel()   # and as PP=2: p2p of the schedule, the weight funnel
            rt = _pretend_runtime(1, 2)
            pp_trainer = _trainer(path, rt)
            out["pp2"] = pp_trainer.train_step(positives)
            engine = _Engine()
            sync_engine_weights(pp_trainer, engine, use_ema=True, version="v1")
            out["pp2_received"] = engine.received
            parallel_state.destroy_model_parallel()   # and TP=2 with sequence parallelism
            rt = _pretend_runtime(2)
            out["tp2_sp"] = _trainer(path, rt, {"parallel.sequence_parallel": True}).train_step(positives)
        out["calls"] = dict(calls)
        out["checked_ops"] = mode.checks

        # The defects this test exists for: each must raise (one process is enough for these).
        raised = {}
        for field in (READ_ON_DEVICE if world_size == 1 else ()):
            with mock.patch.object(MicroBatch, "to", _left_on_cpu(field)):
                try:
                    (dp_trainer if then_dp2 else trainer).train_step(positives)
                    raised[field] = None
                except PretendDeviceMismatchError as exc:
                    raised[field] = str(exc)
                except ValueError as exc:   # popo_mega's own device checks (e.g. logprobs' target vs logits)
                    if "cpu" not in str(exc) or "cuda" not in str(exc):
                        raise
                    raised[field] = str(exc)
        out["left_on_cpu"] = raised
        try:
            has_work = torch.tensor([1.0])   # the RL loop's has-work vote before the fix
            torch.distributed.all_reduce(has_work, op=torch.distributed.ReduceOp.MIN)
            out["cpu_collective"] = None
        except CollectiveDeviceError as exc:
            out["cpu_collective"] = str(exc)
    return out


@pytest.fixture(scope="module")
def one(hf_path):
    return run_world(_steps, 1, hf_path, 1, False)[0]


@pytest.fixture(scope="module")
def two(hf_path):
    return run_world(_steps, 2, hf_path, 2, True)


def _hf_names(path):
    from safetensors import safe_open
    import glob

    names = set()
    for f in glob.glob(f"{path}/*.safetensors"):
        with safe_open(f, "pt") as r:
            names |= set(r.keys())
    return names


def _check_run(out, hf_path, world):
    assert out["param_devices"] == {"cuda"}
    for stats in (*out["popo"], *[out[k] for k in ("grpo", "a3po") if k in out]):
        assert stats["skipped"] == 0.0 and stats["nonfinite_grad"] == 0.0
        assert all(v == v for v in stats.values()), stats   # no NaN
    # The positives' response tokens: 13 (see make_samples; counted by the packer test independently).
    assert out["popo"][0]["positive_token_count"] == 13.0
    # Weight sync: every HF tensor reached the engine, from CUDA (rank 0 only receives them).
    if "received" in out and out["received"]:
        assert set(out["received"]) == _hf_names(hf_path)
        assert {dev for dev, _, _ in out["received"].values()} == {"cuda"}
        assert all(finite for _, _, finite in out["received"].values())
    # Collectives were checked (not a vacuous pass): the stats and NaN votes on every layout.
    assert out["calls"].get("all_reduce", 0) > 0
    assert out["checked_ops"] > 1000
    assert "cpu" in out["cpu_collective"] and "default group" in out["cpu_collective"]


@pytest.mark.slow   # spawned megatron processes: ~35 s of CPU for the fixture and the plain-CPU comparison (95 s wall at load 20)
def test_pretend_cuda_step_one_process(one, hf_path):
    _check_run(one, hf_path, 1)
    # Pretending changes no value: the same step on the plain CPU runtime gives the same stats.
    plain = run_world(_plain_step, 1, hf_path)[0]
    for k, v in plain.items():
        assert one["popo"][0][k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), k


@pytest.mark.slow   # shares the one-process fixture
def test_a_micro_batch_tensor_left_on_the_cpu_is_caught(one):
    """The defect of issue 10: each field the GPU path reads, left on the CPU alone, raises."""
    for field in READ_ON_DEVICE:
        assert one["left_on_cpu"][field] is not None, f"a CPU {field} went unnoticed"
    assert "embedding" in one["left_on_cpu"]["tokens"]   # F.embedding(cpu ids, cuda weight)
    assert "int32" in one["left_on_cpu"]["packed_seq_params"]


@pytest.mark.slow   # two spawned processes, four layouts: ~35 s of CPU (110 s wall at load 20)
def test_pretend_cuda_step_tp2_dp2_pp2(two, one, hf_path):
    for rank, out in enumerate(two):
        _check_run(out, hf_path, 2)
        assert out["dp2"]["skipped"] == 0.0 and out["dp2_empty_rank"]["skipped"] == 0.0
        assert out["calls"].get("all_gather", 0) > 0   # TP gathers of the weight sync
    assert two[0]["received"] and not two[1]["received"]   # rank 0 sends
    # TP=2 and DP=2 give the TP=1 loss (the pretend mode computes real values on every layout).
    assert two[0]["popo"][0]["loss"] == pytest.approx(one["popo"][0]["loss"], rel=1e-5)
    assert two[0]["dp2"]["loss"] == pytest.approx(one["popo"][0]["loss"], rel=1e-5)
    assert {s["received"][k][1] for s in (one, two[0]) for k in ["model.embed_tokens.weight"]} == {(251, 64)}
    # PP=2: the schedule's p2p and the weight funnel (stage 1 sends its tensors to rank 0) on CUDA.
    assert two[0]["pp2"]["loss"] == pytest.approx(one["popo"][0]["loss"], rel=1e-5)
    assert set(two[0]["pp2_received"]) == _hf_names(hf_path) and not two[1]["pp2_received"]
    assert {dev for dev, _, _ in two[0]["pp2_received"].values()} == {"cuda"}
    p2p = sum(two[1]["calls"].get(k, 0) for k in ("send", "isend", "batch_isend_irecv"))
    assert p2p > 0, two[1]["calls"]
    # TP=2 with sequence parallelism (padding to a multiple of tp, the hidden-state gather for P3).
    assert two[0]["tp2_sp"]["loss"] == pytest.approx(one["popo"][0]["loss"], rel=1e-5)
