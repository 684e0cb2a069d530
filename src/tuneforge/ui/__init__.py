"""The web dashboard: static files shipped in the package, served by `tuneforge serve`.

No build step and no CDN: index.html, app.js and style.css are written by hand and use only the
server's public HTTP API. `mount_ui(app)` serves the page at `/` and its assets under `/ui/`, so it
adds no catch-all route: every `/v1/...` path (and an unknown one's JSON 404) stays the API's,
whatever order the routers were added in.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"


def mount_ui(app) -> None:
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    def dashboard():
        # no-cache: the browser revalidates (ETag), so an upgraded package shows its new page at once
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui")
