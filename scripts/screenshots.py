"""Screenshots of every dashboard page, for the README: `python scripts/screenshots.py`.

Starts a real `tuneforge serve` in a temporary home, uploads a good and a bad file, runs a short job
(and cancels another), chats in the playground, and writes PNGs of each page at 1280x800 and at a
narrow 420px window to docs/screenshots/. Needs Debian's chromium (apt-get install -y chromium) and
the `playwright` Python package (pip install -e .[dev]); never downloads a browser.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tuneforge.models.catalogue import EMBEDDED, TINY, available
from tuneforge.ui.harness import LiveServer, launch_chromium, write_bad_file, write_good_file

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"desktop": (1280, 800), "narrow": (420, 860)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--base", default=None, help=f"base model to tune (default: {EMBEDDED} if installed, else {TINY})")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--window-only", action="store_true", help="capture only the window, not whole pages")
    args = ap.parse_args()
    base = args.base or (EMBEDDED if EMBEDDED in available() else TINY)
    args.out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tuneforge-shots-") as tmp, LiveServer(Path(tmp) / "home") as srv:
        tmp = Path(tmp)
        good = srv.upload(write_good_file(tmp / "support-answers.jsonl"))
        bad = srv.upload(write_bad_file(tmp / "first-draft.jsonl"))
        say(f"server at {srv.url}; training {base} for {args.epochs} epoch(s)")
        job = srv.api("POST", "/v1/fine_tuning/jobs", {
            "model": base, "training_file": good["id"], "suffix": "support",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": args.epochs}}},
        })
        job = srv.wait_job(job["id"], ("succeeded", "failed", "cancelled"), timeout=1800)
        if job["status"] != "succeeded":
            say(f"the demo job ended {job['status']}: {job.get('error')}")
            return 1
        for question, rating in (("How do I reset my password?", "good"), ("Can I change my plan?", "bad")):
            srv.api("POST", "/v1/chat/completions", {
                "model": job["fine_tuned_model"], "max_tokens": 40, "store": True, "metadata": {"rating": rating},
                "messages": [{"role": "user", "content": question}]})
        srv.api("POST", "/v1/chat/completions", {  # kept with the tools it was offered: the Monitor lists them
            "model": job["fine_tuned_model"], "max_tokens": 40, "store": True, "metadata": {"rating": "bad"},
            "messages": [{"role": "user", "content": "Where is my order?"}],
            "tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
                      for name in ("lookup_order", "open_ticket")]})
        other = srv.api("POST", "/v1/fine_tuning/jobs", {"model": base, "training_file": good["id"], "suffix": "draft"})
        srv.api("POST", f"/v1/fine_tuning/jobs/{other['id']}/cancel")

        with sync_playwright() as p:
            browser = launch_chromium(p)
            for size, (w, h) in SIZES.items():
                ctx = browser.new_context(viewport={"width": w, "height": h}, device_scale_factor=1)
                ctx.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(srv.key)})")
                page = ctx.new_page()
                page.set_default_timeout(60_000)

                def shot(name: str, route: str, ready: str, before=None):
                    page.goto(f"{srv.url}/#/{route}")
                    page.wait_for_selector(ready)
                    if before:
                        before()
                    page.evaluate("window.scrollTo(0, 0)")
                    page.wait_for_timeout(400)
                    path = args.out / f"{name}-{size}.png"
                    page.screenshot(path=str(path), full_page=not args.window_only)
                    say(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

                shot("jobs", "jobs", "[data-test=jobs-table]")
                shot("create-job", f"jobs/new?file={good['id']}&model={base}", "#create-form")
                shot("upload-report-errors", f"upload/{bad['id']}?model={base}", "[data-test=errors-table]")
                shot("upload-report", f"upload/{good['id']}?model={base}", "[data-test=report-stats]")
                shot("job-detail", f"jobs/{job['id']}", "[data-test=loss-chart] path[data-series=train]")
                shot("models", "models", "[data-test=models-table]")
                shot("monitor", "monitor", "[data-test=stored-question]:not(:has(.muted))")  # questions loaded

                def chat():
                    page.check("#pg-compare")
                    page.fill("#pg-system", "Answer briefly.")
                    page.fill("#pg-max-tokens", "40")
                    page.fill("#pg-temperature", "0")
                    page.fill("#pg-prompt", "What is twice 7?")
                    page.click("#pg-send")
                    page.wait_for_selector(".msg.assistant[data-done=true] >> nth=1", timeout=120_000)
                    page.wait_for_function("!document.querySelector('.msg.streaming')", timeout=120_000)

                shot("playground", f"playground?model={job['fine_tuned_model']}", "#pg-model", chat)
                ctx.close()
            browser.close()
    return 0


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
