#!/bin/bash
# qsmprep over a cohort on a SLURM cluster: one participant per array task.
#
#   ls -d /data/bids/sub-* | sed 's|.*/sub-||' > participants.txt
#   sbatch --array=1-$(wc -l < participants.txt) scripts/slurm_array.sh /data/bids /data/derivatives/qsmprep participants.txt
#
# Each task runs the Apptainer image (QSMPREP_SIF, default ./qsmprep-0.1.0.sif) on its participant,
# with its work folder on scratch (QSMPREP_WORK_ROOT, default $SCRATCH or /tmp): when a preempted task
# is requeued it finds that folder again and resumes where it stopped. On a GPU partition add e.g.
# `--partition=gpu --gres=gpu:1` to sbatch: --nv hands the GPU to the learned methods. QSMPREP
# replaces the whole command (e.g. a virtual environment's qsmprep); QSMPREP_OPTIONS adds options
# (e.g. "--inversion lpcnn"). When every task is done: qsmprep BIDS_DIR OUT_DIR group.
#SBATCH --job-name=qsmprep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=qsmprep_%A_%a.log
set -euo pipefail

BIDS_DIR=$(realpath "$1")
OUT_DIR=$(realpath -m "$2")
LABEL=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$3")
WORK_ROOT=${QSMPREP_WORK_ROOT:-${SCRATCH:-/tmp}/qsmprep_work}
WORK_DIR="$WORK_ROOT/sub-$LABEL"
mkdir -p "$WORK_DIR" "$OUT_DIR"
QSMPREP=${QSMPREP:-"apptainer run --nv --cleanenv -B $BIDS_DIR -B $OUT_DIR -B $WORK_ROOT ${QSMPREP_SIF:-qsmprep-0.1.0.sif}"}

echo "qsmprep: array task $SLURM_ARRAY_TASK_ID (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}): sub-$LABEL"
# shellcheck disable=SC2086  # QSMPREP and QSMPREP_OPTIONS are command lines
exec $QSMPREP "$BIDS_DIR" "$OUT_DIR" participant --participant-label "$LABEL" -w "$WORK_DIR" \
    --nprocs "${SLURM_CPUS_PER_TASK:-1}" ${QSMPREP_OPTIONS:-}
