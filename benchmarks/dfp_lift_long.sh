#!/usr/bin/env bash
# DFP on lift with the default generated data toward the 95% target: benchmarks/dfp_lift.sh's settings (3x256,
# --actor-init he, --normalize-obs) with a longer budget, 15k offline steps then 10k online env steps (UTD 1),
# with and without L_topK run side by side, one core each (measured on an idle 2-core machine: 65 min with
# L_topK, 52 min without).
# Evaluations: 50 episodes every 5k steps, 100 at the end. Reported in docs/dfp_offline_to_online.md; curves: benchmarks/plots.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
for lam in ${LAMBDAS:-0.5 0}; do
  python dfp_offline_to_online.py --env-id lift --offline-steps 15000 --online-steps 10000 \
    --hidden-dims 256 256 256 --start-training 1000 --eval-every 5000 --eval-episodes 50 \
    --final-eval-episodes 100 --lambda-topk "$lam" --actor-init he --normalize-obs \
    --exp-name "dfp_long_lambda${lam}" --threads 1 > "runs/dfp_long_lambda${lam}.log" 2>&1 &
done
wait
