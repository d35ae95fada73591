#!/usr/bin/env bash
# Learning-curve PNGs (and their CSVs) in benchmarks/results/ from the runs of dbp_vs_mse.sh, dfp_lift.sh,
# dfp_lift_long.sh and dbpo_lift.sh (dbpo_lift.png and dbpo_lift_anchor0.1.*: commit 229d4ef's version of it and its
# ANCHOR_COEF=0.1 run; dbpo_lift_30it.*: commit 456e9b7's version).
# `python benchmarks/plot_runs.py --from-csv --out <png>` redraws one from its CSV.
set -euo pipefail
cd "$(dirname "$0")/.."
last() { ls -d runs/$1__*/ | tail -1; }
python benchmarks/plot_runs.py --runs "$(ls -d runs/lift__dbp_drift__1__*/ | tail -1)" "$(ls -d runs/lift__dbp_drift__2__*/ | tail -1)" \
  "$(last lift__dbp_mse)" --labels "DBP (seed 1)" "DBP (seed 2)" "MSE regression" \
  --title "lift: DBP against regression (50-episode evaluations)" --out benchmarks/results/dbp_vs_mse_lift.png
python benchmarks/plot_runs.py --runs "$(last can__dbp_drift)" "$(last can__dbp_mse)" --labels "DBP" "MSE regression" \
  --title "can: DBP against regression (50-episode evaluations)" --out benchmarks/results/dbp_vs_mse_can.png
python benchmarks/plot_runs.py --runs "$(last can__dbp_drift_60k)" "$(last can__dbp_mse_60k)" "$(last can__dbp_drift_to2_60k)" \
  --labels "DBP" "MSE regression" "DBP, To = 2, H = 5" --title "can: DBP against regression, 60k steps (50-episode evaluations)" \
  --out benchmarks/results/dbp_vs_mse_can_60k.png
python benchmarks/plot_runs.py --runs "$(last square__dbp_drift)" "$(last square__dbp_mse)" --labels "DBP (stopped at 15k)" \
  "MSE regression" --title "square: DBP against regression (50-episode evaluations)" \
  --out benchmarks/results/dbp_vs_mse_square.png
python benchmarks/plot_runs.py --runs "$(last lift__dfp_normobs_lambda0.5)" "$(last lift__dfp_normobs_lambda0)" \
  --labels "DFP (lambda_topK 0.5)" "DFP w/o L_topK (lambda 0)" --switch 5000 \
  --title "lift: DFP offline (5k) then online (5k), --normalize-obs" --out benchmarks/results/dfp_lift.png
python benchmarks/plot_runs.py --runs "$(last lift__dfp_long_lambda0.5)" "$(last lift__dfp_long_lambda0)" \
  --labels "DFP (lambda_topK 0.5)" "DFP w/o L_topK (lambda 0)" --switch 15000 \
  --title "lift: DFP offline (15k) then online (10k), --normalize-obs" --out benchmarks/results/dfp_lift_long.png
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_lift_cpu)" --labels "DBPO, CPU preset (clip 0.1, sigma 0.1), stopped at iteration 70" \
  --title "lift: DBPO from a 5k-step DBP policy (default demos)" --out benchmarks/results/dbpo_lift.png
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_lift_anchor0.1)" \
  --labels "DBPO, CPU preset with --anchor-coef 0.1" \
  --title "lift: DBPO from a 5k-step DBP policy, anchor weight 0.1" --out benchmarks/results/dbpo_lift_anchor0.1.png
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_noisy)" \
  --labels "DBPO, unclipped-sample log-prob, actor lr 3e-5" \
  --title "lift: DBPO from a 3.5k-step DBP policy (default demos)" --out benchmarks/results/dbpo_lift_30it.png
# The *_clean.png / .csv files are from the clean demos (--noise 0 --hesitate 0), dfp_lift_rawobs.* from the DFP run
# on raw observations (--actor-init he, 5k + 4k): redraw them with --from-csv.
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_lift_chunkbase)" "$(last lift__dbpo_lift_16env)" \
  --labels "V(s, f(z, s)) baseline (--chunk-baseline), 40 iterations" "V(s) baseline, same settings, stopped near iteration 35" \
  --xlabel iteration --title "lift: DBPO, 16 envs x 64 decisions, critic warm-up 10 iterations" \
  --out benchmarks/results/dbpo_lift_chunk_baseline.png
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_lift_chunkbase_shaped)" \
  --labels "chunk baseline + potential-based reward shaping, 40 iterations" \
  --xlabel iteration --title "lift: DBPO with potential-based shaping, 16 envs x 64 decisions" \
  --out benchmarks/results/dbpo_lift_shaped.png
python benchmarks/plot_runs.py --runs "$(last can__dbp_can500_dart)" "$(last can__dbp_can500_dart_mse)" \
  --labels "DBP" "MSE regression" --title "can, 500 DART-labelled demos, lr 1e-3, 400-step limit (50-episode evaluations)" \
  --out benchmarks/results/dbp_vs_mse_can500.png
python benchmarks/plot_runs.py --runs "$(last can__dbp_bc_can500_clear_drift)" "$(last can__dbp_bc_can500_clear_mse)" \
  --labels "DBP" "MSE regression" --title "can, 500 DART demos, hover 0.07, aside 0.4 (50-ep. evaluations)" \
  --out benchmarks/results/dbp_vs_mse_can500_clear.png
python benchmarks/plot_runs.py --runs "$(last can__dbpo_can_chunkbase)" \
  --labels "DBPO, chunk baseline, 400-step limit, stopped at iteration 36" \
  --xlabel iteration --title "can: DBPO from a 7k-step DBP policy, 16 envs x 64 decisions" \
  --out benchmarks/results/dbpo_can_chunk_baseline.png
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_lift_quiet)" \
  --labels "DBPO, chunk baseline, 16 envs x 64 decisions (stopped at 150)" \
  --xlabel iteration --title "lift: DBPO from a 6k-step DBP policy (100-episode evaluations)" \
  --out benchmarks/results/dbpo_lift_100it.png
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_lift_sigma02)" "$(last lift__dbpo_lift_quiet)" \
  --labels "std 0.2: 80 iterations (benchmarks/dbpo_lift.sh), then to 120" "std 0.1, 150 iterations (docs: the std-0.1 table)" \
  --xlabel iteration --title "lift: DBPO from a 6k-step DBP policy (100 episodes, same seeds)" \
  --out benchmarks/results/dbpo_lift_sigma02.png
