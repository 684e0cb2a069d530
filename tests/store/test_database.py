"""The database layer: paths under the tuneforge home survive the home folder moving."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

from tuneforge.settings import get_settings
from tuneforge.store.database import FileRow, session


def test_files_under_the_home_are_found_after_the_home_moves(tuneforge_home, tmp_path, monkeypatch):
    """A restored backup or a new disk puts the home elsewhere: its files must not look gone."""
    blob = get_settings().files_dir / "file-abc"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_text("{}\n")
    outside = tmp_path / "elsewhere.jsonl"  # e.g. an imported run folder: not under the home
    with session() as s:
        s.add(FileRow(id="file-abc", project="p", filename="t.jsonl", purpose="fine-tune", bytes=3, path=str(blob)))
        s.add(FileRow(id="file-out", project="p", filename="o.jsonl", purpose="fine-tune", bytes=3, path=str(outside)))
        s.commit()
    moved = tmp_path / "moved-home"
    shutil.move(tuneforge_home, moved)
    monkeypatch.setenv("TUNEFORGE_HOME", str(moved))
    get_settings.cache_clear()
    with session() as s:
        paths = dict(s.execute(select(FileRow.id, FileRow.path)).all())
    assert paths == {"file-abc": str(moved / "files" / "file-abc"), "file-out": str(outside)}
    assert Path(paths["file-abc"]).read_text() == "{}\n"
