#!/usr/bin/env bash
# Runs one paper table: the multirun defined by conf/experiment/<table>.yaml (hydra.mode: MULTIRUN, hydra.sweeper.params).
#   scripts/reproduce_table.sh table_entropy_keep
#   scripts/reproduce_table.sh table_q3 seed=0 model.student=/ckpt/qwen3-4b     # extra overrides go to every job
# Tables: table_entropy_keep, table_type_aware_vs_entropy, table_soft_or_halves, table_q3, table_memory_qwen25.
# Needs `- experiment: null` in conf/train.yaml's defaults list (with it, `+experiment=` becomes `experiment=`).
# Each job builds its own vLLM engine; on one GPU prefer a fresh process per job: add hydra/launcher=submitit_local.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 <table> [overrides...]   tables: $(cd "$(dirname "$0")/../conf/experiment" && ls table_*.yaml | sed 's/\.yaml//' | tr '\n' ' ')" >&2
  exit 2
fi
table="$1"; shift
exec tipdistill train "experiment=${table}" "$@"
