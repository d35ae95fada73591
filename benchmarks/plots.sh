#!/usr/bin/env bash
# Learning-curve PNGs (and their CSVs) in benchmarks/results/ from the runs of dbp_vs_mse.sh, dfp_lift.sh
# and dbpo_lift.sh. `python benchmarks/plot_runs.py --from-csv --out <png>` redraws one from its CSV.
set -euo pipefail
cd "$(dirname "$0")/.."
last() { ls -d runs/$1__*/ | tail -1; }
python benchmarks/plot_runs.py --runs "$(last lift__dbp_drift)" "$(last lift__dbp_mse)" --labels DBP "MSE regression" \
  --title "lift: DBP against regression (50-episode evaluations)" --out benchmarks/results/dbp_vs_mse_lift.png
python benchmarks/plot_runs.py --runs "$(last lift__dfp_lambda0.5)" --labels "DFP (lambda_topK 0.5)" --switch 10000 \
  --title "lift: DFP offline (10k) then online (5k)" --out benchmarks/results/dfp_lift.png
python benchmarks/plot_runs.py --runs "$(last lift__dbpo_cpu)" "$(last lift__dbpo_cpu_noclip_lr1e-5)" \
  --labels "log-prob of the clipped action (paper), lr 1e-4" "unclipped-sample log-prob, lr 1e-5" \
  --title "lift: DBPO from a 3k-step DBP policy" --out benchmarks/results/dbpo_lift.png
