"""What every Diffusion-DPO trainer script shares (Wallace et al., arXiv 2311.12908), one module per concern, in the
order a run uses them:

    args         the shared flags and their checks, before anything loads
    data         preference pairs: layouts, streaming, image decoding, counted skips
    family       ModelFamily: what a trainer script tells the rest about its model; the trained model and reference
    cache        the latents and text embeddings, encoded once with the family's encoders
    noise        how a family corrupts latents and what it predicts: DDPM (epsilon, v) or rectified flow
    losses       dpo_loss and mapo_loss on per-sample errors, and the step that computes those errors
    evaluation   held-out preference metrics
    checkpoints  checkpoints, their records and the checks a resume makes
    run          the accelerator, output lock, signals, disk, and the bookkeeping of a training step
    outputs      LoRA files (diffusers, kohya), validation images, model card, Hub

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
