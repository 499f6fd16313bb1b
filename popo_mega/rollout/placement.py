"""Which GPUs of each node the trainer (torchrun) and the rollout servers use: a pure function of the config.

    p = place(cfg)                                  # placement.nodes x placement.gpus_per_node
    p.nodes[0].trainer_gpus                         # (0, 1, 2, 3): torchrun's GPUs on node 0
    p.nodes[0].servers[0].gpus                      # (4, 5, 6, 7): server 0, SGLang --base-gpu-id 4

Two modes (``placement.mode``):

* ``disaggregated`` -- on every node the first ``placement.trainer_gpus_per_node`` GPUs run the trainer
  and the rest hold the rollout servers, each on ``rollout.server_tp`` contiguous GPUs of its own. No
  GPU is shared, so the weight sync may use NCCL (a process group may not hold two ranks on one GPU:
  NCCL fails with "Duplicate GPU detected"). Left unset, ``trainer_gpus_per_node`` is the largest count
  the servers leave free that the parallel layout can use (a multiple of ``parallel.tensor`` whose
  total over the nodes divides by ``parallel.tensor x parallel.pipeline``).
* ``colocated`` -- the trainer runs on every GPU and the servers share them: SGLang is started with
  ``--enable-memory-saver`` and releases its weights and KV cache (``/release_memory_occupation``)
  for the policy step, resuming them (``/resume_memory_occupation``) for generation. A server on a
  trainer rank's GPU cannot join an NCCL group with that rank, so ``rollout.sync: auto`` syncs the
  servers on rank 0's node by ``/update_weights_from_tensor`` (CUDA IPC handles into rank 0's memory)
  and those on other nodes (no GPU shared with rank 0) by the group (:func:`sync_methods`).

Servers fill the nodes in order, ``ceil(rollout.num_servers / placement.nodes)`` per node, so that a
server never spans nodes and server ``i`` is always on the same node and GPUs. Every misfit is a
:class:`~popo_mega.config.ConfigError` naming the keys (and the config file) to change.

``rollout.mem_fraction`` becomes SGLang's ``--mem-fraction-static``; in SGLang 0.5.23 that is the
fraction of the memory *free when the server starts* that it takes for weights and KV cache
(``kv_pool_runtime.py``: headroom = pre_model_load_memory x (1 - mem_fraction_static)), so a colocated
server started after the trainer built its model takes a share of what the trainer left.

``python -m popo_mega.rollout.placement --config X.yaml [overrides] --node-rank N --shell`` prints the
node's settings for launch/train.sh (torchrun's process count and visible GPUs).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from popo_mega.config import Config, ConfigError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSlot:
    """One rollout server: its index among all servers and its GPUs (ids within its node)."""

    index: int
    gpus: tuple[int, ...]
    mem_fraction: float
    memory_saver: bool       # colocated: --enable-memory-saver (release/resume around the policy step)

    @property
    def base_gpu_id(self) -> int:
        """SGLang's ``--base-gpu-id``: its TP rank r runs on GPU base_gpu_id + r (gpu_id_step 1)."""
        return self.gpus[0]


@dataclass(frozen=True)
class NodePlacement:
    node: int
    trainer_gpus: tuple[int, ...]
    servers: tuple[ServerSlot, ...]
    idle_gpus: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    mode: str
    gpus_per_node: int
    tensor: int
    pipeline: int
    data_parallel: int       # trainer world size / (tensor x pipeline)
    nodes: tuple[NodePlacement, ...]

    @property
    def trainer_world_size(self) -> int:
        return sum(len(n.trainer_gpus) for n in self.nodes)

    @property
    def servers(self) -> tuple[ServerSlot, ...]:
        return tuple(s for n in self.nodes for s in n.servers)


def _default_trainer_gpus(free: int, nodes: int, tp: int, pp: int) -> int:
    """Largest t <= free with t % tp == 0 and nodes*t % (tp*pp) == 0; 0 if none."""
    for t in range(free, 0, -1):
        if t % tp == 0 and (nodes * t) % (tp * pp) == 0:
            return t
    return 0


def _check_keys(cfg: Config) -> None:
    """The checks that need no node count: each key alone, and the mode against the sync method."""
    where, pc, r = cfg.source, cfg.placement, cfg.rollout
    if pc.nodes is not None and pc.nodes < 1:
        raise ConfigError(f"{where}: key 'placement.nodes' must be >= 1, got {pc.nodes}")
    if pc.gpus_per_node is not None and pc.gpus_per_node < 1:
        raise ConfigError(f"{where}: key 'placement.gpus_per_node' must be >= 1, got {pc.gpus_per_node}")
    if cfg.parallel.tensor < 1 or cfg.parallel.pipeline < 1:
        raise ConfigError(f"{where}: keys 'parallel.tensor' and 'parallel.pipeline' must be >= 1, got "
                          f"{cfg.parallel.tensor}, {cfg.parallel.pipeline}")
    if not 0.0 < r.mem_fraction < 1.0:
        raise ConfigError(f"{where}: key 'rollout.mem_fraction' must be in (0, 1), got {r.mem_fraction}")
    if not r.urls and r.num_servers < 1:
        raise ConfigError(f"{where}: key 'rollout.num_servers' must be >= 1 (or list running servers in "
                          f"rollout.urls), got {r.num_servers}")
    if r.server_tp < 1:
        raise ConfigError(f"{where}: key 'rollout.server_tp' must be >= 1, got {r.server_tp}")
    if not r.urls and r.backend == "embedded" and r.server_tp != 1:
        raise ConfigError(f"{where}: key 'rollout.server_tp' = {r.server_tp}, but the embedded server runs on one "
                          "device (rollout.backend: embedded); use 1, or rollout.backend: sglang")
    if pc.mode == "colocated":
        if r.urls:
            raise ConfigError(f"{where}: key 'placement.mode' = colocated needs servers this run launches "
                              "(rollout.urls is set): it must start them with --enable-memory-saver")
        if r.sync == "distributed":
            raise ConfigError(f"{where}: key 'rollout.sync' = {r.sync!r} with placement.mode colocated: a server "
                              "on a trainer rank's GPU cannot join an NCCL group with it (\"Duplicate GPU "
                              "detected\"); use rollout.sync: auto (update_weights_from_tensor on rank 0's node, "
                              "the group elsewhere), tensor or disk")
        if pc.trainer_gpus_per_node is not None and pc.trainer_gpus_per_node != pc.gpus_per_node:
            raise ConfigError(f"{where}: key 'placement.trainer_gpus_per_node' = {pc.trainer_gpus_per_node}: with "
                              "placement.mode colocated the trainer runs on all GPUs of each node; leave it unset")
    if r.sync == "tensor" and pc.nodes is not None and pc.nodes > 1:
        raise ConfigError(f"{where}: key 'rollout.sync' = tensor with placement.nodes = {pc.nodes}: "
                          "update_weights_from_tensor reaches only servers on rank 0's node; use rollout.sync: auto")


def sync_methods(sync: str, colocated: bool, server_nodes: list[int | None], sender_node: int = 0,
                 where: str = "config") -> tuple[str, ...]:
    """How each server gets the trainer's weights: "tensor", "distributed" or "disk", one per server.

    sync:          ``rollout.sync``
    colocated:     ``placement.mode == "colocated"``
    server_nodes:  each server's node (None: unknown, e.g. an attached URL on another host)
    sender_node:   the node of global rank 0, which sends the weights

    ``auto``: tensor for a colocated server on the sender's node (it may share rank 0's GPU, which
    NCCL refuses; it can map rank 0's memory), the group for every other server (a server on another
    node shares no GPU with rank 0). ``tensor`` on a server off the sender's node is a ConfigError.
    """
    if sync not in ("auto", "distributed", "tensor", "disk"):
        raise ConfigError(f"{where}: key 'rollout.sync' must be auto|distributed|tensor|disk, got {sync!r}")
    if sync == "disk":
        return tuple("disk" for _ in server_nodes)
    if sync == "tensor":
        off = [i for i, n in enumerate(server_nodes) if n != sender_node]
        if off:
            raise ConfigError(f"{where}: key 'rollout.sync' = tensor, but server(s) {off} are not on rank 0's node "
                              "(update_weights_from_tensor passes memory handles within one host); use auto")
        return tuple("tensor" for _ in server_nodes)
    if sync == "auto" and colocated:
        return tuple("tensor" if n == sender_node else "distributed" for n in server_nodes)
    return tuple("distributed" for _ in server_nodes)


def place(cfg: Config, nodes: int | None = None, gpus_per_node: int | None = None, *,
          check_only: bool = False) -> Placement | None:
    """The placement of ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs (default: the config's
    ``placement.nodes`` and ``placement.gpus_per_node``). Pure: reads nothing but its arguments.

    With ``check_only`` (config loading) a config that leaves the node count or the GPUs per node to
    the launch gets the checks that need neither, and None.
    """
    _check_keys(cfg)
    where = cfg.source
    pc, r = cfg.placement, cfg.rollout
    nodes = pc.nodes if nodes is None else nodes
    gpus = pc.gpus_per_node if gpus_per_node is None else gpus_per_node
    if nodes is None or gpus is None:
        if check_only:
            return None
        missing = "placement.nodes" if nodes is None else "placement.gpus_per_node"
        raise ConfigError(f"{where}: key '{missing}' is unset and the launch did not say it")
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if nodes < 1:
        raise ConfigError(f"{where}: key 'placement.nodes' must be >= 1, got {nodes}")
    if gpus < 1:
        raise ConfigError(f"{where}: key 'placement.gpus_per_node' must be >= 1, got {gpus}")
    launched = not r.urls
    num_servers, stp = (r.num_servers, r.server_tp) if launched else (0, 1)
    if stp > gpus:
        raise ConfigError(f"{where}: key 'rollout.server_tp' = {stp} is more than placement.gpus_per_node = "
                          f"{gpus}: a server does not span nodes")
    per_node = math.ceil(num_servers / nodes)      # servers on each node (the last ones may hold fewer)
    colocated = pc.mode == "colocated"
    if colocated:
        if pc.trainer_gpus_per_node not in (None, gpus):
            raise ConfigError(f"{where}: key 'placement.trainer_gpus_per_node' = {pc.trainer_gpus_per_node}: with "
                              f"placement.mode colocated the trainer runs on all {gpus} GPUs of each node; "
                              "leave it unset")
        trainer = gpus
        first_server_gpu = 0
    else:
        free = gpus - per_node * stp
        if pc.trainer_gpus_per_node is None:
            if free < 1:
                raise ConfigError(
                    f"{where}: rollout.num_servers x rollout.server_tp = {num_servers} x {stp} leaves no GPU for "
                    f"the trainer on placement.nodes = {nodes} node(s) of placement.gpus_per_node = {gpus} "
                    "(placement.mode disaggregated): add nodes, use fewer or smaller servers, or "
                    "placement.mode: colocated")
            trainer = _default_trainer_gpus(free, nodes, tp, pp)
            if trainer == 0:
                raise ConfigError(
                    f"{where}: the trainer's parallel.tensor x parallel.pipeline = {tp} x {pp} does not fit in the "
                    f"{free} GPU(s) per node that rollout.num_servers x rollout.server_tp = {num_servers} x {stp} "
                    f"leave on placement.nodes = {nodes} node(s) of placement.gpus_per_node = {gpus}: set "
                    "placement.trainer_gpus_per_node, add nodes, or use fewer or smaller servers")
        else:
            trainer = pc.trainer_gpus_per_node
            if not 1 <= trainer <= gpus:
                raise ConfigError(f"{where}: key 'placement.trainer_gpus_per_node' must be in [1, "
                                  f"placement.gpus_per_node = {gpus}], got {trainer}")
            capacity = (gpus - trainer) // stp
            if nodes * capacity < num_servers:
                raise ConfigError(
                    f"{where}: rollout.num_servers x rollout.server_tp = {num_servers} x {stp} GPUs do not fit "
                    f"beside the trainer: placement.nodes x (placement.gpus_per_node - "
                    f"placement.trainer_gpus_per_node) = {nodes} x ({gpus} - {trainer}) leaves room for "
                    f"{nodes * capacity} server(s) of {stp} GPU(s)")
        first_server_gpu = trainer
    if trainer % tp:
        raise ConfigError(f"{where}: the trainer's {trainer} GPUs per node are not a multiple of parallel.tensor = "
                          f"{tp} (a tensor-parallel group would span nodes): change "
                          "placement.trainer_gpus_per_node or parallel.tensor")
    world = nodes * trainer
    if world % (tp * pp):
        raise ConfigError(f"{where}: the trainer's placement.nodes x {trainer} GPUs = {world} are not divisible "
                          f"by parallel.tensor x parallel.pipeline = {tp} x {pp}")
    if colocated and nodes * (gpus // stp) < num_servers:
        raise ConfigError(f"{where}: rollout.num_servers x rollout.server_tp = {num_servers} x {stp} GPUs are more "
                          f"than placement.nodes x placement.gpus_per_node = {nodes} x {gpus}, even colocated")
    if launched and nodes > 1 and num_servers > per_node and r.host in _LOOPBACK:
        raise ConfigError(f"{where}: key 'rollout.host' = {r.host!r}: servers on nodes other than the first must "
                          "be reachable from the trainer's rank 0; use rollout.host: 0.0.0.0")
    out = []
    for n in range(nodes):
        indices = range(n * per_node, min((n + 1) * per_node, num_servers))
        servers = tuple(ServerSlot(i, tuple(range(first_server_gpu + j * stp, first_server_gpu + (j + 1) * stp)),
                                   r.mem_fraction, colocated) for j, i in enumerate(indices))
        used = set(range(trainer)) | {g for s in servers for g in s.gpus}
        out.append(NodePlacement(n, tuple(range(trainer)), servers, tuple(g for g in range(gpus) if g not in used)))
    return Placement(pc.mode, gpus, tp, pp, world // (tp * pp), tuple(out))


def format_placement(p: Placement) -> str:
    """One line per node: ``node 0: trainer GPUs 0-3 | server 0: GPUs 4-7 (base-gpu-id 4) | idle 8``."""
    def span(ids) -> str:
        return "-" if not ids else (f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]))

    head = (f"placement {p.mode}: {len(p.nodes)} node(s) x {p.gpus_per_node} GPUs; trainer TP={p.tensor} "
            f"PP={p.pipeline} DP={p.data_parallel} on {p.trainer_world_size} GPUs; {len(p.servers)} server(s)"
            + (f" x TP {len(p.servers[0].gpus)}, mem_fraction {p.servers[0].mem_fraction}" if p.servers else "")
            + (", --enable-memory-saver" if p.mode == "colocated" and p.servers else ""))
    lines = [head]
    for n in p.nodes:
        parts = [f"node {n.node}: trainer GPUs {span(n.trainer_gpus)}"]
        parts += [f"server {s.index}: GPUs {span(s.gpus)} (base-gpu-id {s.base_gpu_id})" for s in n.servers]
        if n.idle_gpus:
            parts.append(f"idle GPUs {','.join(map(str, n.idle_gpus))}")
        lines.append("  " + " | ".join(parts))
    return "\n".join(lines)


def node_shell_settings(p: Placement, node_rank: int, visible: list[str]) -> dict[str, str]:
    """What launch/train.sh exports on node ``node_rank`` before torchrun.

    visible: the node's GPUs as CUDA names it (CUDA_VISIBLE_DEVICES entries, or "0".."N-1"); the
    placement's ids index this list. Disaggregated: torchrun sees only the trainer's GPUs; colocated:
    all of them. POPO_NODE_GPUS keeps the whole list, for the servers the trainer starts.
    """
    if not 0 <= node_rank < len(p.nodes):
        raise ConfigError(f"node rank {node_rank} is outside placement.nodes = {len(p.nodes)}")
    if len(visible) < p.gpus_per_node:
        raise ConfigError(f"this node has {len(visible)} GPU(s) ({','.join(visible) or 'none'}), fewer than "
                          f"placement.gpus_per_node = {p.gpus_per_node}")
    node = p.nodes[node_rank]
    return {"NPROC_PER_NODE": str(len(node.trainer_gpus)),
            "CUDA_VISIBLE_DEVICES": ",".join(visible[g] for g in node.trainer_gpus),
            "POPO_NODE_GPUS": ",".join(visible[:p.gpus_per_node])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_mega.rollout.placement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, help="nodes launched (checked against placement.nodes when set)")
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--visible-gpus", default=None,
                    help="this node's GPUs, comma-separated (CUDA_VISIBLE_DEVICES, or 0,...,N-1)")
    ap.add_argument("--shell", action="store_true", help="print this node's KEY=VALUE lines for launch/train.sh")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from popo_mega.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        pc = cfg.placement
        if args.nodes is not None and pc.nodes is not None and args.nodes != pc.nodes:
            raise ConfigError(f"{cfg.source}: key 'placement.nodes' = {pc.nodes}, but {args.nodes} node(s) "
                              "were launched")
        visible = [v for v in (args.visible_gpus or "").split(",") if v]
        gpus = pc.gpus_per_node if pc.gpus_per_node is not None else (len(visible) if args.visible_gpus else None)
        if (pc.nodes or args.nodes) is None or gpus is None:
            raise ConfigError(f"{cfg.source}: placement.nodes / placement.gpus_per_node are unset: pass --nodes "
                              "and --visible-gpus (launch/train.sh does)")
        p = place(cfg, nodes=args.nodes, gpus_per_node=gpus)
        if args.shell:
            for k, v in node_shell_settings(p, args.node_rank, visible).items():
                print(f"{k}={v}")
        else:
            print(format_placement(p))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
