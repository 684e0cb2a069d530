"""`python -m tuneforge.serve`: the server without the CLI (same as `tuneforge serve`)."""

import argparse

from .app import serve

parser = argparse.ArgumentParser(prog="python -m tuneforge.serve")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--workers", type=int, default=1)
parser.add_argument("--database-url", default=None)
args = parser.parse_args()
serve(args.host, args.port, args.workers, args.database_url)
