"""Drive the dashboard in a real browser against a real `tuneforge serve` (browser tests, screenshots).

`LiveServer` starts `tuneforge serve` as a subprocess in its own TUNEFORGE_HOME with a fresh API key;
`launch_chromium` opens Debian's chromium through Playwright (never a browser Playwright downloads).
Nothing here is used by the server itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    env = os.environ.get("TUNEFORGE_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return next((p for p in CHROMIUM_CANDIDATES if Path(p).exists()), None)


def launch_chromium(playwright):
    path = chromium_path()
    if path is None:
        raise RuntimeError("no chromium found: apt-get install -y chromium (or set TUNEFORGE_CHROMIUM)")
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tuneforge_cmd() -> list[str]:
    exe = shutil.which("tuneforge", path=str(Path(sys.executable).parent)) or shutil.which("tuneforge")
    return [exe] if exe else [sys.executable, "-m", "tuneforge.cli"]


class LiveServer:
    """`tuneforge serve` on a free port with its own home; `.url`, `.key`, `.api(...)`."""

    def __init__(self, home: Path, workers: int = 1, env: dict[str, str] | None = None):
        self.home = Path(home)
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TUNEFORGE_HOME": str(self.home), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("TUNEFORGE_DATABASE_URL", None)
        self.proc: subprocess.Popen | None = None
        self.key = ""
        self.log_path = self.home / "server.log"

    def start(self, timeout: float = 120.0) -> LiveServer:
        self.home.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(_tuneforge_cmd() + ["keys", "create", "--project", "ui-e2e", "--name", "browser"],
                             env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"tuneforge keys create failed: {out.stderr}")
        self.key = out.stdout.strip().splitlines()[-1]
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            _tuneforge_cmd() + ["serve", "--port", str(self.port), "--workers", str(self.workers)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tuneforge serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"tuneforge serve did not answer /health in {timeout:.0f}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # the server stops its workers (they checkpoint and exit)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # A worker the server (re)started while it was stopping may outlive it: the server runs in
        # its own process group, so end whatever is left of that group.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the public API, for setting things up without the browser -------------------------------

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def upload(self, path: Path) -> dict:
        boundary = "----tuneforge-ui-harness"
        content = Path(path).read_bytes()
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{Path(path).name}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{self.url}/v1/files", data=body, method="POST", headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def wait_job(self, job_id: str, statuses: tuple[str, ...], timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.api("GET", f"/v1/fine_tuning/jobs/{job_id}")
            if job["status"] in statuses:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {job['status']} after {timeout:.0f}s:\n{self.log()}")
            time.sleep(0.5)


# --- data for demos and tests -------------------------------------------------------------------


def write_good_file(path: Path, n: int = 24) -> Path:
    """n distinct chat examples that a model can learn: the answer doubles the question's number."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What is twice {i}?"},
                {"role": "assistant", "content": f"Twice {i} is {2 * i}."},
            ]}) + "\n")
    return path


def write_bad_file(path: Path) -> Path:
    """A file with one error of several kinds, on known lines (see BAD_FILE_ERRORS)."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                      {"role": "assistant", "content": f"Hello {i}"}]}) for i in range(12)]
    lines[2] = '{"messages": [{"role": "user", "content": "unterminated"'  # line 3: invalid_json
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})  # line 5
    lines[6] = json.dumps({"messages": [{"role": "robot", "content": "beep"},
                                        {"role": "assistant", "content": "boop"}]})  # line 7
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_FILE_ERRORS = {3: "invalid_json", 5: "example_missing_assistant_message", 7: "unrecognized_role"}
