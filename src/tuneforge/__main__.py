"""`python -m tuneforge ...` (and `torchrun --nproc_per_node N -m tuneforge train ...`) = the CLI."""

from .cli import app

app()
