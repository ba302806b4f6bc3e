#!/usr/bin/env bash
# A selector comparison on a task, each configuration over the same seeds, then `tipdistill report`
# over the whole sweep (report.md, report.csv, PNG plots).
# Usage: [RUNS="..."] [SEEDS=0,1] scripts/sweep_selectors.sh [SWEEP_DIR] [extra overrides]
#   default RUNS: full (all tokens), entropy at keep 0.5, type_aware / q3 / random at keep 0.2
#   planning (issue 8): RUNS="full q3@0.2 type_aware@0.2" scripts/sweep_selectors.sh outputs/sweeps/planning task=planning
# Each configuration is a Hydra multirun over SEEDS (jobs one after another in one process; vLLM
# engines are built and dropped per job). ~3.5 min per job on 2 CPU cores for the default.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-outputs/sweeps/selectors_$(date +%Y%m%d_%H%M%S)}
shift || true
T=.venv/bin/tipdistill
SEEDS=${SEEDS:-0,1}
RUNS=${RUNS:-full entropy@0.5 type_aware@0.2 q3@0.2 random@0.2}
for run in $RUNS; do
  selector=${run%@*}
  if [ "$selector" = "$run" ]; then keep=1.0; else keep=${run#*@}; fi
  $T train -m selector="$selector" keep="$keep" seed="$SEEDS" hydra.sweep.dir="$DIR/${selector}_$keep" "$@"
done
$T report "$DIR"
