#!/bin/bash
# Train UniMOS with the paper's settings (width 64, 224x224 crops, batch 8, RMSprop 5e-4).
#
#   sbatch Final.sh                        one view (VIEW=axial by default)
#   VIEW=coronal sbatch Final.sh           another view (sbatch passes the environment on)
#   sbatch --array=0-2 Final.sh            all three views, one array task each
#   sbatch --nodes=2 --gres=gpu:4 Final.sh GPUS_PER_NODE=4 ...  several GPUs/nodes (srun + torchrun)
#   bash Final.sh                          the same without Slurm (one process, or torchrun if GPUS_PER_NODE>1)
#
# Extra arguments are passed to Final.py, e.g. `sbatch Final.sh --epochs 100 --no-semi`.
# Preemption: Slurm sends SIGUSR1 180 s before the time limit (--signal below); Final.py saves
# resu_last_{view}.pth.tar and exits with 3, and this script requeues the job, which resumes.
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
cd "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}"
mkdir -p logs

VIEWS=(axial coronal sagittal)
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  VIEW=${VIEWS[$SLURM_ARRAY_TASK_ID]}
fi
VIEW=${VIEW:-axial}
DATA=${DATA:-./data_resampled}
OUT=${OUT:-./runs/unimos}
PYTHON=${PYTHON:-python}
NNODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}

ARGS=(Final.py --data "$DATA" --out "$OUT" --view "$VIEW"
      --width 64 --blocksize 224 -b 8 -s 3 --lr 5e-4 --momentum 0.9 --epochs 2500
      --amp --channels-last --workers "${SLURM_CPUS_PER_TASK:-4}" --resume auto "$@")

if (( NNODES > 1 || GPUS_PER_NODE > 1 )); then
  MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
  MASTER_ADDR=${MASTER_ADDR:-localhost}
  LAUNCH=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
          --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500" --rdzv_id "${SLURM_JOB_ID:-local}")
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    CMD=(srun --kill-on-bad-exit=1 "${LAUNCH[@]}" "${ARGS[@]}")
  else
    CMD=("${LAUNCH[@]}" "${ARGS[@]}")
  fi
else
  CMD=("$PYTHON" "${ARGS[@]}")
fi

echo "[$(date)] ${CMD[*]}"
# Run in the background so this shell can forward Slurm's warning signal to the trainer.
"${CMD[@]}" &
CHILD=$!
# torchrun and srun pass SIGTERM on to the workers; Final.py checkpoints on either signal.
forward() { kill -TERM "$CHILD" 2>/dev/null; }
trap forward USR1 TERM
while true; do
  wait "$CHILD"; RC=$?
  # wait returns >128 when interrupted by a trapped signal; keep waiting for the trainer to finish.
  if kill -0 "$CHILD" 2>/dev/null; then continue; fi
  break
done

if [[ $RC -eq 3 && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "[$(date)] preempted: checkpoint saved, requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $RC
