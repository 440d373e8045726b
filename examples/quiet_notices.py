"""Keeps library chatter that means nothing to someone running an example off the screen; import it before the
libraries (diffusers, transformers, peft) are.

Silenced: transformers' and diffusers' notices below errors (e.g. "`CLIPImageProcessor` requires torchvision; falling
back to ...", "No LoRA keys associated to CLIPTextModel ...") and their model-loading progress bars, bitsandbytes'
kernel notices, and Python warnings (deprecations inside the libraries). Errors still show.
"""

import logging
import warnings

import diffusers.utils.logging
import transformers.utils.logging


logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
warnings.simplefilter("ignore")
