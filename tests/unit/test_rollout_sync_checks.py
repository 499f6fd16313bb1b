"""Weight-sync pieces that need no server: the probe keeper's host copies, the bounded wait on a
broadcast next to the servers' HTTP answers, and the address the servers dial."""

import ipaddress
import socket
import threading
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

from popo_mega.rollout.server_calls import ServerCalls
from popo_mega.rollout.weight_sync import WeightSyncError, _ProbeKeeper, await_collective, trainer_address


class _CountHostCopies(TorchFunctionMode):
    """Counts Tensor.cpu() / .tolist() calls (each one a device -> host copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.tolist):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_probe_keeper_copies_only_the_probed_heads():
    gen = torch.Generator().manual_seed(0)
    named = [(f"t{i}", torch.randn(40 + i, generator=gen)) for i in range(30)]
    named.insert(5, ("matrix", torch.randn(8, 8, generator=gen)))  # 2-D: never probed (TP shards cut rows)
    keeper = _ProbeKeeper(count=2, values=16)
    with _CountHostCopies() as mode:
        for name, t in named:
            keeper.see(name, t)
        out = keeper.result()
    assert list(out) == ["t0", "t1", "t29"]
    for name in out:
        want = dict(named)[name][:16]
        assert out[name] == [float(x) for x in want]
    # three probes: three .cpu() and three .tolist(), whatever the number of tensors (31 here)
    assert mode.calls == 6, mode.calls


def test_probe_keeper_keeps_the_last_value_seen_not_a_later_overwrite():
    keeper = _ProbeKeeper(count=0, values=4)
    buf = torch.arange(8.0)
    keeper.see("a", buf)
    buf.fill_(-1.0)  # a streaming gather that reuses its buffer for the next tensor
    assert keeper.result() == {"a": [0.0, 1.0, 2.0, 3.0]}


def _calls(answers):
    """ServerCalls over fake servers: answers[url] = (delay_s, error or None)."""
    def call(url):
        delay, error = answers[url]
        time.sleep(delay)
        if error:
            raise WeightSyncError(error)
    return ServerCalls(list(answers), call)


def test_a_server_error_aborts_the_pending_broadcast_at_once():
    aborted = threading.Event()
    calls = _calls({"http://a": (30.0, None), "http://b": (0.05, "HTTP 400: must run between begin and end")})
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"http://b: HTTP 400: must run between.*did not join the broadcast"):
        await_collective(lambda: False, calls, deadline=time.monotonic() + 60, what="bucket 0", abort=aborted.set)
    assert time.monotonic() - t0 < 5 and aborted.is_set()


def test_no_answer_and_no_broadcast_end_at_the_deadline_naming_the_silent_server():
    aborted = threading.Event()
    calls = _calls({"http://a": (0.0, None), "http://b": (30.0, None)})
    t0 = time.monotonic()
    while calls.pending() != ["http://b"] and time.monotonic() < t0 + 4:  # a has answered (a thread a loaded
        time.sleep(0.001)  # machine runs 0.5 s late is rightly named too: not what this checks)
    with pytest.raises(WeightSyncError, match=r"no answer from \['http://b'\]"):
        await_collective(lambda: False, calls, deadline=time.monotonic() + 0.5, what="bucket 0", abort=aborted.set)
    assert time.monotonic() - t0 < 5 and aborted.is_set()


def test_a_completed_broadcast_with_every_answer_returns():
    calls = _calls({"http://a": (0.0, None), "http://b": (0.05, None)})
    aborted = threading.Event()
    await_collective(lambda: True, calls, deadline=time.monotonic() + 10, what="bucket 0", abort=aborted.set)
    assert not aborted.is_set() and calls.pending() == []


def test_trainer_address_is_loopback_only_for_local_servers():
    assert trainer_address(["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"
    try:
        addr = trainer_address(["http://127.0.0.1:30000", "http://203.0.113.7:30000"])  # TEST-NET-3: never answers
    except WeightSyncError as exc:
        assert "rollout.master_address" in str(exc)  # no route and a loopback hostname: told what to set
        return
    assert not ipaddress.ip_address(addr).is_loopback
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((addr, 0))  # an address of this host (binding a foreign one fails)
