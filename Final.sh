#!/bin/bash
# Train UniMOS with the paper's settings (width 64, 224x224 crops, batch 8 per GPU, RMSprop 5e-4).
#
#   sbatch Final.sh                                  one view (VIEW=axial by default), one GPU
#   VIEW=coronal sbatch Final.sh                     another view (sbatch passes the environment on)
#   sbatch --array=0-2 Final.sh                      all three views, one array task each
#   sbatch --gres=gpu:4 Final.sh                     4 GPUs of one node (torchrun, DDP)
#   sbatch --nodes=2 --gres=gpu:4 Final.sh           2 nodes x 4 GPUs (srun starts one torchrun per node)
#   bash Final.sh                                    the same without Slurm: one process, or torchrun
#                                                    when GPUS_PER_NODE > 1 (NNODES > 1: run it on every
#                                                    node with the same MASTER_ADDR / MASTER_PORT)
#
# Extra arguments go to Final.py, e.g. `sbatch Final.sh --epochs 100 --no-semi`. Environment:
# DATA, OUT, VIEW, PYTHON, GPUS_PER_NODE (default: Slurm's GPUs on the node, else 1), NNODES,
# MASTER_ADDR (default: the allocation's first node), MASTER_PORT (default 29500 + job id % 1000),
# GRACE (seconds torchrun waits for its workers after a signal before killing them, default 170).
# -b is per GPU: the global batch is b x GPUs (see engine/distributed.py for what DDP computes).
#
# Preemption and time limit: Slurm sends SIGUSR1 to this script 180 s before the end
# (--signal=B:USR1@180 below). The script forwards it (srun -> torchrun -> every worker, or straight to
# the single Final.py process); each worker finishes its step, rank 0 saves resu_last_{view}.pth.tar
# and Final.py exits with 3. The script then runs `scontrol requeue`, and the requeued job continues
# exactly where it stopped (`--resume auto`). SIGTERM (scancel, Slurm preemption) is handled the same.
#
#SBATCH --job-name=unimos
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x_%A_%a.out
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}" || exit 1
# Slurm opens --output before the script starts: the folder must exist when the job is submitted
# (`mkdir -p logs` once); this only prepares it for later submissions.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then mkdir -p logs; fi

VIEWS=(axial coronal sagittal)
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  if [[ ! "$SLURM_ARRAY_TASK_ID" =~ ^[0-2]$ ]]; then
    echo "error: SLURM_ARRAY_TASK_ID: must be 0, 1 or 2 (axial, coronal, sagittal), got '$SLURM_ARRAY_TASK_ID'" >&2
    exit 2
  fi
  VIEW=${VIEWS[$SLURM_ARRAY_TASK_ID]}
fi
VIEW=${VIEW:-axial}
DATA=${DATA:-./data}
OUT=${OUT:-./runs/unimos}
PYTHON=${PYTHON:-python}
NNODES=${SLURM_JOB_NUM_NODES:-${NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
GRACE=${GRACE:-170}
EXIT_REQUEUE=3  # engine/preempt.py
# bash arithmetic below would read "2x" as an error and go on with one process
for name in NNODES MASTER_PORT; do
  if [[ ! "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name: must be a whole number >= 1, got '${!name}'" >&2
    exit 2
  fi
done
for name in GPUS_PER_NODE GRACE; do  # 0 GPUs (a CPU node) runs one process; a grace of 0 is allowed
  if [[ ! "${!name}" =~ ^(0|[1-9][0-9]*)$ ]]; then  # "08" is an error to bash arithmetic
    echo "error: $name: must be a whole number >= 0, got '${!name}'" >&2
    exit 2
  fi
done
if (( NNODES > 1 && GPUS_PER_NODE < 1 )); then
  echo "error: GPUS_PER_NODE: several nodes need at least one process per node, got 0" >&2
  exit 2
fi

ARGS=(Final.py --data "$DATA" --out "$OUT" --view "$VIEW"
      --width 64 --blocksize 224 -b 8 -s 3 --lr 5e-4 --momentum 0.9 --epochs 2500
      --amp --channels-last --workers "${SLURM_CPUS_PER_TASK:-4}" --resume auto "$@")

if (( NNODES > 1 || GPUS_PER_NODE > 1 )); then
  if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  MASTER_ADDR=${MASTER_ADDR:-localhost}
  # c10d rendezvous: the torchrun on MASTER_ADDR hosts the store, node ranks are assigned on joining.
  # torchrun forwards SIGUSR1/SIGTERM to its workers and gives them GRACE seconds to checkpoint.
  LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
          --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
          --rdzv_id "${SLURM_JOB_ID:-unimos}"
          --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "$GRACE")
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # One torchrun per node; srun forwards the signals it receives to them.
    CMD=(srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1
         --cpus-per-task "${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 "${LAUNCH[@]}" "${ARGS[@]}")
  else
    CMD=("${LAUNCH[@]}" "${ARGS[@]}")
  fi
else
  CMD=("$PYTHON" "${ARGS[@]}")
fi

echo "[$(date)] ${CMD[*]}"
# The trainer runs in the background so that this shell can take Slurm's warning signal and pass it on.
"${CMD[@]}" &
CHILD=$!
SIGNALLED=0
forward() {
  SIGNALLED=1
  echo "[$(date)] SIG$1 received: asking the trainer to checkpoint and stop"
  kill -USR1 "$CHILD" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early (>128) when a trapped signal arrives: keep waiting while the trainer runs. The
# last `wait` gives the trainer's own exit status (bash keeps it after the process has ended).
while kill -0 "$CHILD" 2>/dev/null; do
  wait "$CHILD"
done
wait "$CHILD"
RC=$?

# torchrun reports a signalled shutdown as a failure, not as the workers' exit code 3.
if (( RC == EXIT_REQUEUE || (SIGNALLED && RC != 0) )); then
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    echo "[$(date)] stopped early (exit $RC): requeueing job $SLURM_JOB_ID; it resumes from $OUT"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "[$(date)] stopped early (exit $RC): run this script again to resume from $OUT"
  exit "$EXIT_REQUEUE"
fi
exit "$RC"
