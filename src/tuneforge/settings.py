"""Where tuneforge keeps its state, and the knobs a deployment sets from the environment.

One Settings object, read from TUNEFORGE_* variables; the CLI and the server both call `get_settings()`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_")

    home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "tuneforge")
    database_url: str | None = None  # default: SQLite under home
    max_upload_bytes: int = 512 * 1024 * 1024
    org: str = "tuneforge"  # the {org} part of ft:{base}:{org}:{suffix}:{id}
    # The server deletes stored completions and kept responses older than this, and usage rows older
    # than usage_retention_days, at start and hourly (monitor.retention); None keeps them.
    retention_days: float | None = Field(default=None, gt=0)
    usage_retention_days: float | None = Field(default=None, gt=0)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'tuneforge.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
