#!/usr/bin/env bash
# Multi-node DDP training of one backbone with torchrun (no scheduler). Run this on EVERY node, from the same
# project checkout on a shared filesystem (same params.yaml, data/ and models/ paths), e.g. for 2 nodes x 4 GPUs:
#
#   node 0:  NNODES=2 NODE_RANK=0 GPUS_PER_NODE=4 MASTER_ADDR=10.0.0.1 deploy/ddp/torchrun.sh resnet18
#   node 1:  NNODES=2 NODE_RANK=1 GPUS_PER_NODE=4 MASTER_ADDR=10.0.0.1 deploy/ddp/torchrun.sh resnet18
#
# Lightning reads the torchrun environment (TorchElasticEnvironment); only rank 0 writes models/<backbone> and
# logs to MLflow. Afterwards, on one node: `dvc commit train@<backbone>` records the result and
# `dvc repro` runs the downstream stages (benchmark, evaluate, smear, register).
set -euo pipefail
BACKBONE=${1:?usage: torchrun.sh <backbone>}
NNODES=${NNODES:?set NNODES}
NODE_RANK=${NODE_RANK:?set NODE_RANK}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR (node 0, reachable from all nodes on MASTER_PORT)}
MASTER_PORT=${MASTER_PORT:-29500}
cd "$(dirname "$0")/../.."

# Every node must train with the same parameters: compose them once, identically (trainer=ddp -> strategy ddp).
.venv/bin/smearnet compose-params trainer=ddp "trainer.num_nodes=${NNODES}" "trainer.devices=${GPUS_PER_NODE}" \
  ${EXTRA_OVERRIDES:-}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:?point every node at the shared tracking server}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

exec .venv/bin/torchrun \
  --nnodes="${NNODES}" --nproc-per-node="${GPUS_PER_NODE}" --node-rank="${NODE_RANK}" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="smearnet-${BACKBONE}" \
  pipeline/train.py "${BACKBONE}"
