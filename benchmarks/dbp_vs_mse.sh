#!/usr/bin/env bash
# DBP against plain regression (--loss mse): same data (200 generated multimodal demos), network, budget.
# Each run: 20k steps, 50-episode evaluations every 5k steps, then 100 episodes on unseen seeds for the
# final and the best checkpoint. Reported in the README ("DBP against regression").
set -euo pipefail
cd "$(dirname "$0")/.."
for task in ${TASKS:-lift can square}; do
  for loss in drift mse; do
    python dbp_bc.py --env-id "$task" --loss "$loss" --exp-name "dbp_${loss}" --threads 1
  done
done
