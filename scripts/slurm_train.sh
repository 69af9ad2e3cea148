#!/bin/bash
# Multi-node training under Slurm: one torchrun launcher per node, resubmittable unchanged.
#
#   sbatch --nodes=2 --gpus-per-node=4 scripts/slurm_train.sh configs/unet3d.yaml data.root=/data/brats \
#       data.cache_dir=/local/scratch/brats-cache train.time_limit=1410
#
# - torchrun starts one process per GPU on every node; the rendezvous endpoint is the first node of
#   the allocation. Each process draws its own patches: the effective batch is data.batch_size x
#   (nodes x GPUs per node); the learning rate is not rescaled (scale train.lr yourself if you want).
# - --resume auto continues <out_dir>/last.pt when it exists (a requeued or resubmitted job) and
#   starts fresh otherwise; --max-restarts lets torchrun restart a group whose worker died, which
#   then resumes the same way. train.checkpoint_every bounds the work lost to a preemption, and
#   train.time_limit (minutes, a little under the job's time) stops cleanly before Slurm kills it.
# - data.cache_dir on a node-local disk: the first process of each node builds that node's copy;
#   on a shared filesystem the builders share the work case by case.
#SBATCH --job-name=brats-seg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG [key=value ...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-1}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${RDZV_PORT:-29500}
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT" --rdzv-id="$SLURM_JOB_ID" --max-restarts=3 \
    train.py -c "$CONFIG" --resume auto "$@"
