#!/usr/bin/env bash
# Main job: 2-rank torchrun training that is stopped part-way (as a preemption would), resumed
# from its latest checkpoint, then evaluated; all on CPU, on local disk unless RUN_DIR says otherwise.
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/demo}
EPOCHS=${EPOCHS:-6}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "$RUN_DIR" in *://*) ;; *) rm -rf "$RUN_DIR" ;; esac

run() { torchrun --standalone --nproc_per_node="$NPROC" -m launch.train --run-dir "$RUN_DIR" --epochs "$EPOCHS" "$@"; }

echo "== 1. train, stopped after epoch 3"
run --stop-after-epoch 3
echo "== 2. restart: resumes from the latest checkpoint; kickstarted by a teacher loaded from a URI"
echo "      (here the run's own epoch-3 checkpoint; mock://teacher works too)"
run --teacher-uri "$RUN_DIR/checkpoints/$(basename "$RUN_DIR").e00000003.safetensors"
echo "== 3. evaluate the latest checkpoint, and a mock policy for comparison"
python -m launch.evaluate --uri "$RUN_DIR"
python -m launch.evaluate --uri mock://baseline
echo "== checkpoints in $RUN_DIR"
ckptio ls "$RUN_DIR"
