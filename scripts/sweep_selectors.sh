#!/usr/bin/env bash
# The selector comparison on a task (default: the embedded arithmetic default), two seeds each:
#   full (all tokens), entropy at keep 0.5, type_aware / q3 / random at keep 0.2
# then `tipdistill report` over the whole sweep (report.md, report.csv, PNG plots).
# Usage: scripts/sweep_selectors.sh [SWEEP_DIR] [extra overrides, e.g. task=planning]
# Each group is a Hydra multirun (jobs run one after another in one process; vLLM engines are
# built and dropped per job). ~3.5 min per job on 2 CPU cores for the default.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-outputs/sweeps/selectors_$(date +%Y%m%d_%H%M%S)}
shift || true
T=.venv/bin/tipdistill
SEEDS=${SEEDS:-0,1}
$T train -m selector=full seed="$SEEDS" hydra.sweep.dir="$DIR/full" "$@"
$T train -m selector=entropy keep=0.5 seed="$SEEDS" hydra.sweep.dir="$DIR/entropy_0.5" "$@"
$T train -m selector=type_aware,q3,random keep=0.2 seed="$SEEDS" hydra.sweep.dir="$DIR/keep_0.2" "$@"
$T report "$DIR"
