"""GPU placement (popo_mega.rollout.placement) and its use by the launcher, the loop and launch/train.sh.

The expected assignments are written out by hand from the rules in the module docstring (trainer on
the first GPUs of each node, servers after it in order, ceil(servers / nodes) per node; colocated:
the trainer everywhere and the servers from GPU 0), never computed by the code under test.
Hardware: CPU only (GPUs are names in lists; nothing touches CUDA).
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from popo_mega.config import ConfigError, config_from_dict
from popo_mega.rollout import sglang_launcher
from popo_mega.rollout.placement import ServerSlot, node_shell_settings, place

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(tp=1, pp=1, servers=1, server_tp=1, mode="disaggregated", nodes=None, gpus=8, trainer=None, **rollout):
    placement = {"mode": mode, "gpus_per_node": gpus}
    if nodes is not None:
        placement["nodes"] = nodes
    if trainer is not None:
        placement["trainer_gpus_per_node"] = trainer
    if mode == "colocated":
        rollout.setdefault("sync", "disk")
    return config_from_dict({"parallel": {"tensor": tp, "pipeline": pp}, "placement": placement,
                             "rollout": {"backend": "sglang", "num_servers": servers, "server_tp": server_tp,
                                         **rollout}}, source="run.yaml")


def _table(p):
    """node -> (trainer GPUs, [(server index, GPUs)], idle GPUs)."""
    return [(n.trainer_gpus, [(s.index, s.gpus) for s in n.servers], n.idle_gpus) for n in p.nodes]


# ------------------------------------------------------------------------------------ 1, 2, 8 nodes

def test_one_node_disaggregated():
    p = place(_cfg(tp=2, servers=4, trainer=4), nodes=1)
    assert _table(p) == [((0, 1, 2, 3), [(0, (4,)), (1, (5,)), (2, (6,)), (3, (7,))], ())]
    assert p.data_parallel == 2 and p.trainer_world_size == 4
    assert [s.base_gpu_id for s in p.servers] == [4, 5, 6, 7]
    assert not any(s.memory_saver for s in p.servers) and {s.mem_fraction for s in p.servers} == {0.8}


def test_one_node_default_trainer_count_is_what_the_layout_can_use():
    # one server on GPU 6 leaves 7 GPUs; TP=2 can use 6 of them, GPU 7 stays idle
    p = place(_cfg(tp=2, servers=1), nodes=1)
    assert _table(p) == [((0, 1, 2, 3, 4, 5), [(0, (6,))], (7,))]
    assert p.data_parallel == 3


def test_two_nodes_disaggregated():
    p = place(_cfg(tp=4, pp=2, servers=2, server_tp=4, trainer=4, host="0.0.0.0"), nodes=2)
    assert _table(p) == [((0, 1, 2, 3), [(0, (4, 5, 6, 7))], ()),
                         ((0, 1, 2, 3), [(1, (4, 5, 6, 7))], ())]
    assert p.data_parallel == 1
    # 3 servers of TP 2: two on node 0, one on node 1 (whose last two GPUs stay idle)
    p = place(_cfg(tp=2, servers=3, server_tp=2, trainer=4, host="0.0.0.0"), nodes=2)
    assert _table(p) == [((0, 1, 2, 3), [(0, (4, 5)), (1, (6, 7))], ()),
                         ((0, 1, 2, 3), [(2, (4, 5))], (6, 7))]
    assert p.data_parallel == 4


def test_eight_nodes_colocated_and_disaggregated():
    p = place(_cfg(tp=8, pp=4, servers=8, server_tp=8, mode="colocated", host="0.0.0.0"), nodes=8)
    assert _table(p) == [((0, 1, 2, 3, 4, 5, 6, 7), [(n, (0, 1, 2, 3, 4, 5, 6, 7))], ()) for n in range(8)]
    assert p.data_parallel == 2 and all(s.memory_saver and s.base_gpu_id == 0 for s in p.servers)
    p = place(_cfg(tp=4, pp=2, servers=8, server_tp=4, trainer=4, host="0.0.0.0"), nodes=8)
    assert _table(p) == [((0, 1, 2, 3), [(n, (4, 5, 6, 7))], ()) for n in range(8)]
    assert p.data_parallel == 4 and p.trainer_world_size == 32


def test_attached_servers_leave_every_gpu_to_the_trainer():
    p = place(_cfg(tp=2, urls=["http://h:1"]), nodes=1)
    assert _table(p) == [((0, 1, 2, 3, 4, 5, 6, 7), [], ())]


# ------------------------------------------------------------------------------------ misfits

@pytest.mark.parametrize("kw, nodes, message", [
    (dict(tp=8, servers=1), 1, "parallel.tensor x parallel.pipeline = 8 x 1 does not fit in the 7 GPU(s) per node "
                               "that rollout.num_servers x rollout.server_tp = 1 x 1 leave"),
    (dict(tp=8, servers=1, trainer=8), 1, "rollout.num_servers x rollout.server_tp = 1 x 1 GPUs do not fit"),
    (dict(servers=8, server_tp=8), 1, "leaves no GPU for the trainer"),
    (dict(tp=4, servers=2, trainer=6), 1, "not a multiple of parallel.tensor = 4"),
    (dict(tp=2, pp=4, servers=1, trainer=2), 1, "not divisible by parallel.tensor x parallel.pipeline = 2 x 4"),
    (dict(servers=2, trainer=4), 2, "key 'rollout.host' = '127.0.0.1'"),
    (dict(server_tp=16), 1, "'rollout.server_tp' = 16 is more than placement.gpus_per_node = 8"),
    (dict(tp=8, servers=9, server_tp=8, mode="colocated", host="0.0.0.0"), 8,
     "9 x 8 GPUs are more than placement.nodes x placement.gpus_per_node = 8 x 8"),
    (dict(trainer=9), 1, "'placement.trainer_gpus_per_node' must be in [1, placement.gpus_per_node = 8], got 9"),
])
def test_misfits_name_the_keys(kw, nodes, message):
    with pytest.raises(ConfigError) as e:
        place(_cfg(**kw), nodes=nodes)
    assert message in str(e.value) and "run.yaml" in str(e.value)


def test_config_load_checks_the_placement_and_names_the_key():
    with pytest.raises(ConfigError, match=r"run.yaml: key 'rollout.sync' = 'distributed' with placement.mode colocated"):
        _cfg(mode="colocated", sync="distributed")
    with pytest.raises(ConfigError, match=r"'placement.trainer_gpus_per_node' = 4: with placement.mode colocated"):
        _cfg(mode="colocated", trainer=4)
    with pytest.raises(ConfigError, match=r"'rollout.server_tp' = 2, but the embedded server runs on one device"):
        config_from_dict({"rollout": {"backend": "embedded", "server_tp": 2}}, source="run.yaml")
    with pytest.raises(ConfigError, match=r"'rollout.mem_fraction' must be in \(0, 1\), got 1.5"):
        config_from_dict({"rollout": {"mem_fraction": 1.5}}, source="run.yaml")
    with pytest.raises(ConfigError, match="leaves no GPU for the trainer on placement.nodes = 1"):  # nodes set: full check
        _cfg(servers=8, nodes=1)
    _cfg(servers=8)  # node count left to the launch: nothing to place yet
    with pytest.raises(ConfigError, match="'placement.nodes' is unset and the launch did not say it"):
        place(_cfg(servers=1))


def test_node_shell_settings_map_ids_through_the_visible_list():
    p = place(_cfg(tp=2, servers=4, trainer=4), nodes=1)
    visible = ["3", "2", "1", "0", "7", "6", "5", "4"]
    assert node_shell_settings(p, 0, visible) == {"NPROC_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "3,2,1,0",
                                                  "POPO_NODE_GPUS": "3,2,1,0,7,6,5,4"}
    with pytest.raises(ConfigError, match="this node has 4 GPU"):
        node_shell_settings(p, 0, visible[:4])
    with pytest.raises(ConfigError, match="node rank 1 is outside placement.nodes = 1"):
        node_shell_settings(p, 1, visible)


# ------------------------------------------------------------------------------------ the launcher

@pytest.fixture
def fake_start(monkeypatch):
    """Record what launch_servers would start, start nothing."""
    started = []

    def start(cmd, url, *, log_path=None, env=None):
        started.append((cmd, url, env))
        return sglang_launcher.ServerProcess(url, process=None, log_path=log_path, cmd=cmd, env=env)

    monkeypatch.setattr(sglang_launcher, "start", start)
    monkeypatch.setattr(sglang_launcher, "wait_for_health", lambda *a, **k: None)
    monkeypatch.setattr(sglang_launcher, "sglang_available", lambda: True)
    return started


def _flags(cmd):
    return {a: (cmd[i + 1] if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else True)
            for i, a in enumerate(cmd) if a.startswith("--")}


def test_launcher_starts_each_server_on_its_gpus(fake_start):
    slots = [ServerSlot(2, (4, 5, 6, 7), 0.7, False), ServerSlot(3, (0, 1, 2, 3), 0.5, True)]
    node = ["10", "11", "12", "13", "14", "15", "16", "17"]
    servers = sglang_launcher.launch_servers("sglang", "/m", slots=slots, node_gpus=node, ports=[1, 2],
                                             host="0.0.0.0", advertise_host="node3")
    assert [s.url for s in servers] == ["http://node3:1", "http://node3:2"]
    (cmd0, _, env0), (cmd1, _, env1) = fake_start
    f0, f1 = _flags(cmd0), _flags(cmd1)
    assert (f0["--tp-size"], f0["--base-gpu-id"], f0["--mem-fraction-static"]) == ("4", "4", "0.7")
    assert "--enable-memory-saver" not in f0
    assert (f1["--tp-size"], f1["--base-gpu-id"], f1["--mem-fraction-static"]) == ("4", "0", "0.5")
    assert f1["--enable-memory-saver"] is True and f1["--enable-weights-cpu-backup"] is True
    assert env0["CUDA_VISIBLE_DEVICES"] == env1["CUDA_VISIBLE_DEVICES"] == "10,11,12,13,14,15,16,17"


def test_embedded_server_sees_only_its_gpu(fake_start):
    sglang_launcher.launch_servers("embedded", "/m", slots=[ServerSlot(0, (6,), 0.8, False), ServerSlot(1, (7,), 0.8, True)],
                                   node_gpus=[str(i) for i in range(8)], ports=[5, 6])
    (cmd, _, env), (cmd1, _, env1) = fake_start
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and _flags(cmd)["--device"] == "cuda"
    assert "--enable-memory-saver" not in _flags(cmd)
    # a colocated slot gets SGLang's flags (before, only SGLang servers got them)
    assert env1["CUDA_VISIBLE_DEVICES"] == "7"
    assert _flags(cmd1)["--enable-memory-saver"] is True and _flags(cmd1)["--enable-weights-cpu-backup"] is True


@pytest.mark.parametrize("mode,saver", [("colocated", True), ("disaggregated", False)])
def test_cpu_run_servers_get_the_memory_saver_only_when_colocated(fake_start, mode, saver):
    """On the CPU (no slots), placement.mode colocated starts the embedded server with
    --enable-memory-saver, so that the release around the policy step really frees its weights;
    without the CPU backup flag, which would keep them in the same RAM."""
    cfg = config_from_dict({"placement": {"mode": mode}, "rollout": {"backend": "embedded", "deterministic": True}})
    run = sglang_launcher.start_run_servers(cfg, SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1))
    (cmd, url, _), = fake_start
    assert run.urls == [url]
    flags = _flags(cmd)
    assert ("--enable-memory-saver" in flags) is saver and "--enable-weights-cpu-backup" not in flags
    assert flags["--enable-deterministic-inference"] is True   # the run's other flags stay
    assert flags["--weight-version"] == "step0"   # what model.hf_path holds, named as the loop's syncs


class _Rt:
    def __init__(self, world, rank=0, local_rank=0):
        self.device, self.world_size, self.rank, self.local_rank = torch.device("cuda"), world, rank, local_rank


def test_run_servers_refuse_a_torchrun_that_owns_every_gpu(fake_start, monkeypatch):
    """The defect: torchrun on all 8 GPUs while servers start from GPU 0. Now an error naming the key."""
    cfg = _cfg(tp=2, servers=4, trainer=4)
    monkeypatch.setenv("POPO_NODE_GPUS", "0,1,2,3,4,5,6,7")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_RANK", "0")
    with pytest.raises(ConfigError, match=r"torchrun runs 8 process\(es\) on node 0, but the placement"):
        sglang_launcher.start_run_servers(cfg, _Rt(8))
    assert fake_start == []


def test_run_servers_start_this_nodes_servers_beside_the_trainer(fake_start, monkeypatch):
    cfg = _cfg(tp=2, servers=4, trainer=4)
    monkeypatch.setenv("POPO_NODE_GPUS", "0,1,2,3,4,5,6,7")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_RANK", "0")

    def gather(box, obj):  # every rank of this node reports what rank 0 found
        box[:] = [obj] + [(None, [])] * (len(box) - 1)

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    run = sglang_launcher.start_run_servers(cfg, _Rt(4))
    server_gpus = [int(_flags(cmd)["--base-gpu-id"]) for cmd, _, _ in fake_start]
    assert server_gpus == [4, 5, 6, 7] and set(server_gpus).isdisjoint({0, 1, 2, 3})
    assert len(run.urls) == 4 and run.urls == [s.url for s in run.local]


class _Engine:
    def __init__(self):
        self.calls = []

    def release_memory_occupation(self):
        self.calls.append("release")

    def resume_memory_occupation(self):
        self.calls.append("resume")


def test_colocated_servers_release_memory_for_the_step_only():
    engine, timings = _Engine(), {}
    with sglang_launcher.released_during_step(engine, True, world_size=1, timings=timings):
        engine.calls.append("step")
    assert engine.calls == ["release", "step", "resume"]
    assert set(timings) == {"release_s", "resume_s"} and min(timings.values()) >= 0   # logged per step
    engine, timings = _Engine(), {}
    with sglang_launcher.released_during_step(engine, False, world_size=1, timings=timings):
        engine.calls.append("step")
    assert engine.calls == ["step"] and timings == {}
    with sglang_launcher.released_during_step(None, True, world_size=1):  # ranks without the engine
        pass


# ------------------------------------------------------------------------------------ launch/train.sh

def _fake_bin(tmp_path, gpus: int):
    """`python -c ...` answers the GPU count, any other python call is the real one; torchrun prints."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/bash\nif [ "$1" = "-c" ]; then echo {gpus}; exit 0; fi\n'
                                    f'exec {sys.executable} "$@"\n')
    (bin_dir / "torchrun").write_text('#!/bin/bash\necho "torchrun $*"\n'
                                      'echo "CVD=$CUDA_VISIBLE_DEVICES NODE=$POPO_NODE_GPUS"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE", "NNODES",
                                                            "NODE_RANK", "SLURM_JOB_ID", "POPO_NODE_GPUS")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["PYTHONPATH"] = REPO
    return env


def _train_sh(config, env, *overrides):
    return subprocess.run(["bash", os.path.join(REPO, "launch", "train.sh"), config, *overrides], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_train_sh_gives_torchrun_only_the_trainers_gpus(tmp_path):
    env = _fake_bin(tmp_path, gpus=8)
    r = _train_sh("configs/qwen2.5-math-7b-popo.yaml", env)
    assert r.returncode == 0, r.stderr
    assert "--nproc-per-node 4" in r.stdout and "CVD=0,1,2,3 NODE=0,1,2,3,4,5,6,7" in r.stdout
    r = _train_sh("configs/qwen2.5-math-7b-popo.yaml", {**env, "CUDA_VISIBLE_DEVICES": "8,9,10,11,12,13,14,15"})
    assert "CVD=8,9,10,11 NODE=8,9,10,11,12,13,14,15" in r.stdout, r.stderr
    r = _train_sh("configs/qwen2.5-math-7b-popo.yaml", {**env, "NPROC_PER_NODE": "8"})
    assert r.returncode == 2 and "NPROC_PER_NODE=8, but the placement" in r.stderr
    r = _train_sh("configs/qwen2.5-math-7b-popo.yaml", {**env, "NNODES": "2"})
    assert r.returncode == 2 and "key 'placement.nodes' = 1, but 2 node(s) were launched" in r.stderr
    r = _train_sh("configs/qwen2.5-math-7b-popo.yaml", env, "placement.trainer_gpus_per_node=6")
    assert r.returncode == 2 and "not a multiple of parallel.tensor" not in r.stderr  # 6 % 2 == 0 fits the TP ...
    assert "rollout.num_servers x rollout.server_tp = 4 x 1 GPUs do not fit" in r.stderr  # ... not the 4 servers


def test_train_sh_colocated_gives_torchrun_every_gpu(tmp_path):
    env = _fake_bin(tmp_path, gpus=8)
    r = _train_sh("configs/qwen2.5-72b-popo.yaml", {**env, "NNODES": "8", "NODE_RANK": "3"})
    assert r.returncode == 0, r.stderr
    assert "--nproc-per-node 8" in r.stdout and "--node-rank 3" in r.stdout
    assert "CVD=0,1,2,3,4,5,6,7 NODE=0,1,2,3,4,5,6,7" in r.stdout


def test_train_sh_on_cpu_keeps_one_process(tmp_path):
    env = _fake_bin(tmp_path, gpus=0)
    r = _train_sh("configs/quickstart_cpu.yaml", env)
    assert r.returncode == 0 and "--nproc-per-node 1" in r.stdout, r.stderr


def test_run_servers_refuse_another_node_count_than_the_configs(fake_start, monkeypatch):
    cfg = _cfg(tp=2, servers=4, trainer=4, nodes=1)
    monkeypatch.setenv("POPO_NODE_GPUS", "0,1,2,3,4,5,6,7")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"'placement.nodes' = 1, but torchrun runs 2 node\(s\) of 4 process"):
        sglang_launcher.start_run_servers(cfg, _Rt(8))
