"""Import-only stand-in for wandb, for diffusers' research scripts, which `import wandb` at the top but use it only
with --report_to wandb. benchmarks/gpu_suite.sh puts this folder on their PYTHONPATH only where wandb is not
installed, runs them with --report_to tensorboard, and records that it did; any use of wandb fails here."""
