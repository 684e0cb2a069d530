"""The API server: the FastAPI app (`create_app`) and `serve()`, which runs it with its workers.

`serve()` creates the schema, prints the URL (and, on a fresh install, the one key to use), starts
the training worker processes and runs uvicorn. Workers are supervised: one that dies is started
again, and all of them get SIGTERM (checkpoint, hand the job back) when the server stops. A server
killed outright takes its workers with it (they watch their parent), and the next start resumes
their jobs from their checkpoints.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from sqlalchemy import text

from .. import __version__
from ..jobs.validation import FileValidator
from ..monitor.retention import prune
from ..monitor.usage import UsageRecord, record
from ..settings import Settings, get_settings
from ..store.database import get_engine, new_id, session_factory
from ..store.keys import ensure_initial_key
from ..train.device import visible_gpus
from ..ui import mount_ui
from . import chat, errors, files, fine_tuning, models, reports, responses, stored
from .engine import Engine

log = logging.getLogger("tuneforge.serve")
PRUNE_EVERY_SECONDS = 3600.0


class UsageMiddleware:
    """One usage row per /v1 request: key, project, model, tokens, latency and final status.

    A plain ASGI middleware rather than `@app.middleware("http")`: a streamed response is only
    finished when its last body chunk is sent, which is when the tokens are known.
    """

    def __init__(self, app, sessions):
        self.app, self.sessions = app, sessions

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})  # the same dict request.state writes into
        started = time.perf_counter()
        status = {"code": 500}
        request_id = new_id("req_", 32)

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                # OpenAI's request id header, which the SDK exposes as `._request_id` (for support and logs)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            rec = UsageRecord(  # the handler may say how a streamed answer really ended (499, 500)
                method=scope["method"], path=scope["path"], status=state.get("status", status["code"]),
                latency_ms=(time.perf_counter() - started) * 1000, key_id=state.get("key_id"),
                project=state.get("project"), model=state.get("model"),
                prompt_tokens=state.get("prompt_tokens", 0), completion_tokens=state.get("completion_tokens", 0),
            )
            with anyio.CancelScope(shield=True):  # a client that hung up still gets its request counted
                await anyio.to_thread.run_sync(self._write, rec)

    def _write(self, rec: UsageRecord) -> None:
        try:
            with self.sessions() as s:
                record(s, rec)
        except Exception:  # monitoring must never break serving
            log.warning("could not record usage", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    url = settings.resolved_database_url
    app = FastAPI(
        title="tuneforge",
        version=__version__,
        description="OpenAI-compatible fine-tuning server: files, fine-tuning jobs, models, chat, responses.",
    )
    app.state.settings = settings
    app.state.sessions = session_factory(url)
    app.state.engine = Engine()
    errors.install(app)
    for module in (files, fine_tuning, models, chat, stored, responses):
        app.include_router(module.router)
    app.include_router(reports.router)  # tuneforge's own: upload report, model sizes (the dashboard uses them)

    @app.get("/health", tags=["health"])
    def health():
        with app.state.sessions() as s:
            s.execute(text("SELECT 1"))
        return {"status": "ok", "version": __version__}

    mount_ui(app)  # the dashboard at / and /ui/ (no catch-all: /v1 stays the API's)
    app.add_middleware(errors.ServerErrors)  # inside UsageMiddleware: a 500 is counted, with its request id
    app.add_middleware(UsageMiddleware, sessions=app.state.sessions)
    if settings.retention_days or settings.usage_retention_days:
        _prune_hourly(app, settings)
    _validate_files(app)
    return app


def _validate_files(app: FastAPI) -> None:
    """New jobs' files are validated by a thread of the server (jobs.validation) while the app runs,
    whatever the workers are doing; it first takes the jobs a stopped server left unvalidated."""
    inner = app.router.lifespan_context
    app.state.validator = FileValidator(app.state.sessions)

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            app.state.validator.start()
            try:
                yield state
            finally:
                await anyio.to_thread.run_sync(app.state.validator.stop)

    app.router.lifespan_context = lifespan


def _prune_hourly(app: FastAPI, settings: Settings) -> None:
    """Apply the deployment's retention (monitor.retention) when the server starts, then every hour,
    in a thread of its own for as long as the app runs."""
    inner, stop = app.router.lifespan_context, threading.Event()

    def run():
        while True:
            try:
                with app.state.sessions() as s:
                    gone = prune(s, days=settings.retention_days, usage_days=settings.usage_retention_days)
                if any(gone.values()):
                    log.info("retention: deleted %s", gone)
            except Exception:  # a failed pass is logged and tried again next hour, never fatal
                log.exception("retention pass failed")
            if stop.wait(PRUNE_EVERY_SECONDS):
                return

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            thread = threading.Thread(target=run, daemon=True, name="tuneforge-retention")
            thread.start()
            try:
                yield state
            finally:
                stop.set()

    app.router.lifespan_context = lifespan


# --- workers ----------------------------------------------------------------------------------------


class WorkerPool:
    """`n` worker subprocesses, restarted when they die, stopped with SIGTERM when the server stops."""

    RESTART_DELAY = 5.0  # a worker that keeps crashing at start must not spin

    def __init__(self, n: int, database_url: str):
        self.n, self.database_url = n, database_url
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.started_at = [0.0] * n
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watch = threading.Thread(target=self._supervise, daemon=True, name="tuneforge-workers")

    def worker_env(self, i: int) -> dict[str, str]:
        """Worker i's environment. With several GPUs, each worker gets one of them (round robin), so
        `--workers N` trains N jobs side by side instead of N jobs on the first GPU."""
        env = dict(os.environ, TUNEFORGE_WORKER_PARENT=str(os.getpid()))
        gpus = visible_gpus()
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        return env

    def _spawn(self, i: int) -> None:
        env = self.worker_env(i)
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "tuneforge.jobs.worker", "--database-url", self.database_url], env=env
        )
        self.started_at[i] = time.monotonic()

    def start(self) -> None:
        for i in range(self.n):
            self._spawn(i)
        self._watch.start()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                for i, p in enumerate(self.procs):
                    if p is None or p.poll() is None or self._stop.is_set():
                        continue
                    if p.returncode == 0:
                        # A clean exit is a worker that was told to stop (SIGTERM to the process
                        # group, as service managers and Ctrl-C do): the server is going down too.
                        self.procs[i] = None
                        continue
                    if time.monotonic() - self.started_at[i] < self.RESTART_DELAY:
                        continue
                    log.warning("worker %d (pid %d) exited with %s; starting it again", i, p.pid, p.returncode)
                    self._spawn(i)

    def stop(self, timeout: float = 60.0) -> None:
        with self._lock:  # no respawn can start after this point
            self._stop.set()
        if self._watch.is_alive():
            self._watch.join(timeout=5)
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.terminate()  # SIGTERM: the worker checkpoints its job and hands it back to the queue
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def _stop_on_shutdown(app: FastAPI, pool: WorkerPool) -> None:
    """Stop the workers during uvicorn's shutdown: after shutting down, uvicorn re-raises the
    SIGTERM/SIGINT it caught, which ends this process before a `finally` could run."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            try:
                yield state
            finally:
                await anyio.to_thread.run_sync(pool.stop)

    app.router.lifespan_context = lifespan


def serve(host: str, port: int, workers: int, database_url: str | None) -> None:
    """Run the API server and `workers` training workers until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    if database_url:
        settings = settings.model_copy(update={"database_url": database_url})
    url = settings.resolved_database_url
    get_engine(url)  # create the schema before workers race to do it
    new_key = ensure_initial_key(url)
    app = create_app(settings)
    pool = WorkerPool(max(0, workers), url)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    print(f"tuneforge {__version__}: OpenAI-compatible API at http://{shown}:{port}/v1 "
          f"({workers} training worker(s), state in {settings.home})", flush=True)
    if new_key:
        print("A fresh install: this API key (project 'default') is shown only once:", flush=True)
        print(f"  {new_key}", flush=True)
        print(f"  OpenAI(base_url='http://{shown}:{port}/v1', api_key='{new_key}')", flush=True)
    pool.start()
    _stop_on_shutdown(app, pool)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        pool.stop()
