#!/usr/bin/env bash
# DFP on lift with the default generated data, CPU preset (3x256 networks, 5k offline steps then 4k online env
# steps), with and without L_topK. --actor-init he: with the paper's Xavier init the actor scored 0/50 at 2k and
# 4k offline steps on this data (docs/dfp_offline_to_online.md). Reported in the README ("DFP");
# curves: benchmarks/plots.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
for lam in ${LAMBDAS:-0.5 0}; do
  python dfp_offline_to_online.py --env-id lift --offline-steps 5000 --online-steps 4000 \
    --hidden-dims 256 256 256 --start-training 1000 --eval-every 2500 --eval-episodes 50 \
    --final-eval-episodes 100 --lambda-topk "$lam" --actor-init he --exp-name "dfp_he_lambda${lam}" --threads 1
done
