#!/usr/bin/env bash
# DFP on lift with the default generated data, CPU preset (3x256 networks), with and without L_topK.
# Reported in the README ("DFP"); curves: python benchmarks/plot_runs.py.
set -euo pipefail
cd "$(dirname "$0")/.."
for lam in ${LAMBDAS:-0.5 0}; do
  python dfp_offline_to_online.py --env-id lift --offline-steps 10000 --online-steps 5000 \
    --hidden-dims 256 256 256 --start-training 1000 --eval-every 2500 --eval-episodes 50 \
    --final-eval-episodes 100 --lambda-topk "$lam" --exp-name "dfp_lambda${lam}" --threads 1
done
