#!/usr/bin/env bash
# popo-train under torchrun, on one node or several.
#
#   bash launch/train.sh configs/qwen2.5-math-7b-popo.yaml [key.sub=value ...]
#
# GPUs: the config's placement (popo_mega/rollout/placement.py) decides which GPUs of this node run
# torchrun: disaggregated, only the trainer's (torchrun sees them through CUDA_VISIBLE_DEVICES, and the
# rollout servers get the others); colocated, all of them. POPO_NODE_GPUS keeps the node's whole list
# for the servers. NPROC_PER_NODE, if set, must agree. CPU (no GPU visible): NPROC_PER_NODE, else 1.
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as torchrun uses them; under SLURM they
# are taken from SLURM_NNODES, SLURM_NODEID and the first host of SLURM_JOB_NODELIST
# (see launch/slurm/popo.sbatch). The environment only places processes; what the run does is in
# the config file and the overrides.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash launch/train.sh CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi
CONFIG="$1"; shift
if [ ! -f "$CONFIG" ]; then
  echo "launch/train.sh: config file not found: $CONFIG" >&2
  exit 2
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
  NNODES="${NNODES:-${SLURM_NNODES:-1}}"
  NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
  if [ -z "${MASTER_ADDR:-}" ] && command -v scontrol >/dev/null; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NGPUS="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NGPUS" -gt 0 ]; then
  VISIBLE="${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NGPUS - 1)))}"
  SETTINGS="$(python -m popo_mega.rollout.placement --config "$CONFIG" --nodes "$NNODES" --node-rank "$NODE_RANK" \
    --visible-gpus "$VISIBLE" --shell "$@")" || exit 2
  PLACED_NPROC="$(sed -n 's/^NPROC_PER_NODE=//p' <<< "$SETTINGS")"
  if [ -n "${NPROC_PER_NODE:-}" ] && [ "$NPROC_PER_NODE" != "$PLACED_NPROC" ]; then
    echo "launch/train.sh: NPROC_PER_NODE=$NPROC_PER_NODE, but the placement of $CONFIG gives the trainer" \
      "$PLACED_NPROC GPU(s) per node (python -m popo_mega.rollout.placement --config $CONFIG)" >&2
    exit 2
  fi
  NPROC_PER_NODE="$PLACED_NPROC"
  export POPO_NODE_GPUS="$(sed -n 's/^POPO_NODE_GPUS=//p' <<< "$SETTINGS")"
  export CUDA_VISIBLE_DEVICES="$(sed -n 's/^CUDA_VISIBLE_DEVICES=//p' <<< "$SETTINGS")"
  echo "[launch] node $NODE_RANK: trainer on GPUs $CUDA_VISIBLE_DEVICES of $POPO_NODE_GPUS"
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
echo "[launch] nodes=$NNODES node_rank=$NODE_RANK procs/node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT config=$CONFIG"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m popo_mega.train.cli --config "$CONFIG" "$@"
