"""Serve a run trained with `tuneforge train`: register its weights as an `ft:` model of a project.

The command line and the server share one library, so a run folder is already everything the server
needs (base model name in config.json, adapter or full weights); registering it is one database row,
named the way fine-tuning jobs name their models.
"""

from __future__ import annotations

from pathlib import Path

from ..models.catalogue import resolve
from ..models.load import weights_dir
from ..settings import get_settings
from ..store.database import ModelRow, new_id, session
from ..train.config import TrainConfig
from .worker import fine_tuned_name


def import_run(run_dir: str | Path, project: str = "default", suffix: str | None = None,
               database_url: str | None = None) -> str:
    """Register a finished run folder as a servable model; returns the new `ft:` model name."""
    if not project:
        raise ValueError("a model needs a project name (--project)")
    run_dir = Path(run_dir).resolve()
    cfg = TrainConfig.load(run_dir) if (run_dir / "config.json").is_file() else None
    weights = weights_dir(run_dir)
    if cfg is None or weights == run_dir:
        raise FileNotFoundError(f"{run_dir}: not a finished tuneforge run folder (no config.json or weights)")
    name = fine_tuned_name(resolve(cfg.base).slug, get_settings().org, suffix, new_id("", 8))
    with session(database_url) as s:
        s.add(ModelRow(id=name, project=project, base=cfg.base, job_id="", path=str(weights),
                       owned_by=get_settings().org))
        s.commit()
    return name
