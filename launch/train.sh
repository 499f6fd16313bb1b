#!/usr/bin/env bash
# popo-train under torchrun, on one node or several.
#
#   bash launch/train.sh configs/qwen2.5-math-7b-popo.yaml [key.sub=value ...]
#
# Processes per node: NPROC_PER_NODE, else the number of visible GPUs, else 1 (CPU).
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
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
echo "[launch] nodes=$NNODES node_rank=$NODE_RANK procs/node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT config=$CONFIG"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m popo_mega.train.cli --config "$CONFIG" "$@"
