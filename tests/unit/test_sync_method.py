"""Which transport syncs each rollout server (placement.sync_methods) and how rollout.sync is checked.

Expected choices are written by hand from the rule: a colocated server on rank 0's node may share
rank 0's GPU (NCCL refuses two ranks on one GPU) and gets update_weights_from_tensor; a server on
another node shares no GPU with rank 0 and joins the group. CPU only.
"""

import pytest

from popo_mega.config import ConfigError, config_from_dict
from popo_mega.rollout.placement import place, sync_methods


def _cfg(sync, mode="colocated", nodes=2, servers=2, server_tp=8, tp=8):
    return config_from_dict({"parallel": {"tensor": tp}, "placement": {"mode": mode, "nodes": nodes, "gpus_per_node": 8},
                             "rollout": {"backend": "sglang", "num_servers": servers, "server_tp": server_tp,
                                         "sync": sync, "host": "0.0.0.0"}}, source="run.yaml")


def _nodes(cfg):
    return [n.node for n in place(cfg).nodes for _ in n.servers]


def test_colocated_two_nodes_auto_is_tensor_on_node0_and_distributed_on_node1():
    cfg = _cfg("auto")
    assert _nodes(cfg) == [0, 1]
    assert sync_methods("auto", True, _nodes(cfg)) == ("tensor", "distributed")


def test_colocated_four_servers_on_two_nodes():
    cfg = _cfg("auto", servers=4, server_tp=4)
    assert _nodes(cfg) == [0, 0, 1, 1]
    assert sync_methods("auto", True, _nodes(cfg)) == ("tensor", "tensor", "distributed", "distributed")


def test_disaggregated_auto_is_the_group_everywhere():
    cfg = _cfg("auto", mode="disaggregated", servers=2, server_tp=4, tp=4)
    assert _nodes(cfg) == [0, 1]
    assert sync_methods("auto", False, _nodes(cfg)) == ("distributed", "distributed")


def test_disk_and_tensor_and_unknown_hosts():
    assert sync_methods("disk", True, [0, 1]) == ("disk", "disk")
    assert sync_methods("tensor", False, [0, 0]) == ("tensor", "tensor")
    assert sync_methods("auto", True, [0, None]) == ("tensor", "distributed")  # an attached URL elsewhere
    with pytest.raises(ConfigError, match=r"run.yaml: key 'rollout.sync' = tensor, but server\(s\) \[1\]"):
        sync_methods("tensor", True, [0, 1], where="run.yaml")
    with pytest.raises(ConfigError, match=r"key 'rollout.sync' must be auto\|distributed\|tensor\|disk, got 'nccl'"):
        sync_methods("nccl", True, [0])


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"run.yaml: key 'rollout.sync' = 'distributed' with placement.mode colocated"):
        _cfg("distributed")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'rollout.sync' = tensor with placement.nodes = 2"):
        _cfg("tensor")
    with pytest.raises(ConfigError, match=r"rollout.sync"):
        _cfg("nccl")
    assert _cfg("auto").rollout.sync == "auto"
    assert _cfg("tensor", nodes=1, servers=1).rollout.sync == "tensor"


def test_http_engine_sends_tensor_only_to_its_tensor_urls():
    from popo_mega.rollout.http_engine import HttpEngine

    with pytest.raises(ValueError, match=r"tensor_urls \['http://c:3'\] are not among urls"):
        HttpEngine(["http://a:1", "http://b:2"], tensor_urls=["http://c:3"])
    engine = HttpEngine(["http://a:1", "http://b:2/"], tensor_urls=["http://b:2"])
    assert engine.tensor_urls == {"http://b:2"}
