"""The server's state: one schema for SQLite (default) and PostgreSQL (by URL).

Every table has an integer `seq` primary key that only grows, so lists and cursors (`after=<id>`)
order by insertion without relying on timestamps, which collide within a second. The public string
id (file-..., ftjob-...) is a separate unique column. Times are Unix seconds as floats; the API
rounds them down to OpenAI's integer timestamps.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, TypeDecorator, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..settings import get_settings

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """OpenAI-style ids: a prefix and random alphanumerics (file-abc..., ftjob-abc...)."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> float:
    return time.time()


def metadata_matches(meta: dict | None, wanted: dict[str, str]) -> bool:
    """Whether an object's metadata has every wanted key=value. Filtered in Python: a JSON column
    cannot be queried the same way on SQLite and PostgreSQL."""
    return all((meta or {}).get(k) == v for k, v in wanted.items())


class HomePath(TypeDecorator):
    """A path on disk (an uploaded file, a run folder, weights), kept relative to TUNEFORGE_HOME when
    it lies under it and read back absolute: the database still finds everything after the home folder
    moves (a new disk, a restored backup), where an absolute path names the old place and every file,
    model and checkpoint looks gone. A path elsewhere (an imported run folder) stays absolute."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        try:
            return Path(value).relative_to(get_settings().home).as_posix()
        except ValueError:
            return str(value)

    def process_result_value(self, value, dialect):
        if value is None or Path(value).is_absolute():
            return value  # (and the absolute paths of rows written before paths were kept relative)
        return str(get_settings().home / value)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    project: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    hint: Mapped[str] = mapped_column(String(32))  # "tf-abc...wxyz", enough to recognise a key
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class FileRow(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    project: Mapped[str] = mapped_column(String(200), index=True)
    filename: Mapped[str] = mapped_column(String(1000))
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(HomePath)
    status: Mapped[str] = mapped_column(String(32), default="processed")
    created_at: Mapped[float] = mapped_column(Float, default=now)


class JobRow(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    project: Mapped[str] = mapped_column(String(200), index=True)
    model: Mapped[str] = mapped_column(String(1000))  # base model name
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), index=True)
    method: Mapped[str] = mapped_column(String(32), default="supervised")
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(1000))
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[float | None] = mapped_column(Float)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float)
    # Worker bookkeeping: who holds the job, when it last said so, and what the API asked of it.
    worker_id: Mapped[str | None] = mapped_column(String(200), index=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    control: Mapped[str | None] = mapped_column(String(16))  # "cancel" | "pause" | None
    run_dir: Mapped[str | None] = mapped_column(HomePath)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class StoredCompletionRow(Base):
    """A chat completion kept because its request said `store: true` (OpenAI's stored completions):
    served traffic that can be read back, labelled with metadata and turned into training data."""

    __tablename__ = "stored_completions"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # the completion's chatcmpl- id
    project: Mapped[str] = mapped_column(String(200), index=True)
    model: Mapped[str] = mapped_column(String(1000), index=True)
    messages: Mapped[list[Any]] = mapped_column(JSON)  # the request's messages, as sent
    # the ChatCompletion returned, with the request's tools and tool_choice (serve.stored.keep)
    completion: Mapped[dict[str, Any]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ResponseRow(Base):
    """A response of the Responses API kept for `previous_response_id`, GET and input_items (OpenAI keeps
    them unless the request says `store: false`)."""

    __tablename__ = "responses"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # resp_...
    project: Mapped[str] = mapped_column(String(200), index=True)
    model: Mapped[str] = mapped_column(String(1000), index=True)
    context: Mapped[list[Any]] = mapped_column(JSON)  # earlier turns ({role, content}), from previous_response_id
    input: Mapped[list[Any]] = mapped_column(JSON)  # this request's input items, as input_items lists them
    response: Mapped[dict[str, Any]] = mapped_column(JSON)  # the response object returned
    created_at: Mapped[float] = mapped_column(Float, default=now)


class EventRow(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id"), index=True)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(1000), index=True)  # ft:...:ckpt-step-N
    path: Mapped[str] = mapped_column(HomePath)  # folder with the servable weights
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ModelRow(Base):
    __tablename__ = "models"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(1000), unique=True, index=True)  # ft:base:org:suffix:short
    project: Mapped[str] = mapped_column(String(200), index=True)
    base: Mapped[str] = mapped_column(String(1000))
    job_id: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(HomePath)  # adapter (or full model) folder
    owned_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class UsageRow(Base):
    __tablename__ = "usage"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str | None] = mapped_column(String(64), index=True)
    project: Mapped[str | None] = mapped_column(String(200), index=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(1000))
    model: Mapped[str | None] = mapped_column(String(1000))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)


# --- engine ----------------------------------------------------------------------------------------

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets the server read while a worker writes; busy_timeout makes a writer wait for the
    # other process's lock instead of failing at once with "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    # In WAL mode NORMAL loses nothing when a process dies (only on power loss), and spares an
    # fsync per commit: a worker writes an event per training step.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _create_schema(engine: Engine) -> None:
    # The server and a separately started worker may both create the schema at the same moment;
    # the loser of that race sees "table already exists" and only needs to look again.
    from sqlalchemy.exc import OperationalError, ProgrammingError

    for attempt in range(3):
        try:
            Base.metadata.create_all(engine)
            return
        except (OperationalError, ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(0.2)


def resolve_url(database_url: str | None = None) -> str:
    return database_url or get_settings().resolved_database_url


def get_engine(database_url: str | None = None) -> Engine:
    """One engine per URL per process, with the schema created on first use."""
    url = resolve_url(database_url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    from pathlib import Path

                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _create_schema(engine)
            _engines[url] = engine
        return engine


def session_factory(database_url: str | None = None) -> sessionmaker[Session]:
    # expire_on_commit=False: rows are read after commit to build responses, without a new query.
    return sessionmaker(get_engine(database_url), expire_on_commit=False)


def session(database_url: str | None = None) -> Session:
    return session_factory(database_url)()
