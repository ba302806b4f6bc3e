"""`python -m tipdistill <command> ...`: the CLI as a module, so that `torchrun --nproc_per_node N -m tipdistill
train ...` starts one job of N ranks (tipdistill/distributed.py)."""

from tipdistill.cli import main

main()
