"""tipdistill's Hydra launchers: hydra-submitit-launcher's, with each submitit task one rank of the job
(tipdistill/cluster.py). A namespace-package plugin, so Hydra finds it; inert without the `cluster` extra."""
