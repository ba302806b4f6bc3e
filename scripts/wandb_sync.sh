#!/usr/bin/env bash
# Upload offline W&B runs written by `tipdistill train logger=wandb` (no API key -> offline).
# Usage: scripts/wandb_sync.sh [outputs/sweeps/<id> ...]   (default: everything under outputs/)
set -euo pipefail
cd "$(dirname "$0")/.."
roots=("${@:-outputs}")
find "${roots[@]}" -type d -name 'offline-run-*' -print0 | xargs -0 -r -n 20 .venv/bin/wandb sync
