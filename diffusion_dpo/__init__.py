"""What every Diffusion-DPO trainer script shares (Wallace et al., arXiv 2311.12908), one module per concern:
args, data, family, cache, noise, losses, evaluation, checkpoints, run, training, outputs (docs/architecture.md).

The trainer scripts at the repository root (train_diffusion_dpo*.py) import it from a clone as it is; `pip install .`
installs it for a script copied elsewhere. docs/architecture.md follows one pair through it.
"""


class InputError(ValueError):
    """Bad input from the user: reported as one line, never as a traceback."""


class TrainingStopped(RuntimeError):
    """Training cannot usefully go on (only non-finite steps, a full disk, a signal): reported as one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run at once (before training, or a second signal during it): one line. A
    KeyboardInterrupt, so that what handles Ctrl-C (the precompute committing its progress) handles SIGTERM alike."""
