#!/usr/bin/env bash
# DBPO from a deliberately short DBP pretraining on lift (3k steps), CPU preset: 6 envs x 64 chunk decisions
# per iteration (1.5k env steps), 40 iterations, a 10x higher actor learning rate than the paper's 1e-5 (which
# is tuned for 1500 iterations of 80k env steps). Deterministic one-call success over 50 episodes before the
# first update (iteration 0) and every 10 iterations. Reported in the README ("DBPO").
set -euo pipefail
cd "$(dirname "$0")/.."
python dbpo_online.py --env-id lift --pretrain-steps 3000 --num-envs 6 --num-steps 64 --num-iterations 40 \
  --eval-every 10 --eval-episodes 50 --actor-lr 1e-4 --actor-lr-min 3e-5 --exp-name dbpo_cpu --threads 1

# From the same pretrained checkpoint, with the log-prob of the unclipped Gaussian sample (docs/dbpo_online.md:
# with the paper's clipped log-prob, most samples sat at the -2 floor) and the paper's actor lr 1e-5
# (at 1e-4 the approximate KL reached 0.7-1.4 after one full-batch step).
python dbpo_online.py --env-id lift --checkpoint "$(ls -d runs/lift__dbpo_pretrain__1__*/ | tail -1)dbp.pt" \
  --num-envs 6 --num-steps 64 --num-iterations 20 --eval-every 10 --eval-episodes 50 \
  --no-clip-logprob-action --exp-name dbpo_cpu_noclip_lr1e-5 --threads 1
