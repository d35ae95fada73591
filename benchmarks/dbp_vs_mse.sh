#!/usr/bin/env bash
# DBP against plain regression (--loss mse): same data (200 generated multimodal demos), network, budget.
# Each run: 20k steps, 50-episode evaluations every 5k steps, then 100 episodes on unseen seeds for the
# final and the best checkpoint. Reported in docs/dbp_bc.md ("Experiment results").
# The longer can runs of docs/dbp_bc.md: STEPS=60000 EVAL_EVERY=20000 TASKS=can benchmarks/dbp_vs_mse.sh
# (run names dbp_drift_60k / dbp_mse_60k). Extra flags for every run go in FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-20000}
suffix=$([ "$steps" = 20000 ] && echo "" || echo "_$((steps / 1000))k")
for task in ${TASKS:-lift can square}; do
  for loss in drift mse; do
    python dbp_bc.py --env-id "$task" --loss "$loss" --exp-name "dbp_${loss}${suffix}" --threads 1 \
      --total-steps "$steps" --eval-every "${EVAL_EVERY:-5000}" ${FLAGS:-}
  done
done
