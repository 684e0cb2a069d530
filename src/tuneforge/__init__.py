"""tuneforge: self-hosted, OpenAI-compatible fine-tuning of language models.

Stages, by folder: data (1), models (2), train (3-4), evaluate (5), serve (6), jobs, store, monitor (7).
"""

__version__ = "0.1.0"
