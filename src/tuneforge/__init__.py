"""tuneforge: self-hosted, OpenAI-compatible fine-tuning of language models.

Stages, by folder: data (1), models (2), train (3-4), evaluate (5), serve (6), jobs, store, monitor (7).
"""

import logging
import os
import warnings

# Nothing tuneforge runs may reach a model hub: models come from the local catalogue, and a library
# that would fetch something at run time must find out at once that it can't. Set before any Hugging
# Face library reads it. (bitsandbytes, when installed for QLoRA, is imported by PEFT and asks the hub
# for a faster CPU kernel; it falls back to its own, and its warnings about that are noise.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# PEFT asks transformers whether gradient checkpointing is on by a name transformers 5 deprecates:
# a warning for PEFT's maintainers, printed to every user of a LoRA run.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
