"""The CPU's colocated mode (placement.mode: colocated, issue 12 item 3): the run's embedded servers
start with ``--enable-memory-saver``, so ``/release_memory_occupation`` really frees their weights
while the policy steps (popo_mega/rollout/server.py), and the weight sync after the step gives them
back. Disaggregated runs start them without it."""

from types import SimpleNamespace

import pytest
import torch

from popo_mega.config import config_from_dict
from popo_mega.rollout import sglang_launcher


@pytest.mark.parametrize("mode,saver", [("colocated", True), ("disaggregated", False)])
def test_cpu_servers_get_the_memory_saver_only_when_colocated(mode, saver, monkeypatch):
    seen = {}

    def fake_launch(kind, model_path, **kw):
        seen.update(kind=kind, extra=kw["extra_args"])
        return [SimpleNamespace(url="http://127.0.0.1:1")]

    monkeypatch.setattr(sglang_launcher, "launch_servers", fake_launch)
    cfg = config_from_dict({"placement": {"mode": mode}, "rollout": {"backend": "embedded", "deterministic": True}})
    rt = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    servers = sglang_launcher.start_run_servers(cfg, rt)
    assert servers.urls == ["http://127.0.0.1:1"]
    assert ("--enable-memory-saver" in seen["extra"]) is saver
    assert "--enable-deterministic-inference" in seen["extra"]   # the other flags stay


class Posts:
    def __init__(self):
        self.calls = []

    def release_memory_occupation(self):
        self.calls.append("release")

    def resume_memory_occupation(self):
        self.calls.append("resume")


def test_release_and_resume_are_timed_around_the_step():
    engine, timings, inside = Posts(), {}, []
    with sglang_launcher.released_during_step(engine, True, 1, timings):
        inside.append(list(engine.calls))
    assert inside == [["release"]] and engine.calls == ["release", "resume"]
    assert set(timings) == {"release_s", "resume_s"} and all(v >= 0 for v in timings.values())
    engine, timings = Posts(), {}
    with sglang_launcher.released_during_step(engine, False, 1, timings):
        pass
    assert engine.calls == [] and timings == {}
