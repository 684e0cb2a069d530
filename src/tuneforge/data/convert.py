"""CSV / DataFrame -> chat JSONL rows, with the columns named by the user.

A table has no single obvious mapping to a conversation, so the user names the columns:
  prompt_col + completion_col   user = prompt, assistant = completion
  text_col + label_col          classification: user = text, assistant = label, and a system prompt
                                listing the label set so the model knows its choices
  text_col alone                {"text": ...} rows for continued pre-training
  prompt_col + chosen_col + rejected_col
                                preference pairs for DPO (OpenAI's shape): user = prompt, the
                                preferred and the non-preferred assistant answer
Rows are numbered as in the CSV file, with the header as row 1, so errors point at the right row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

CLASSIFY_SYSTEM = "Classify the text. Answer with one of: {labels}."
SHOWN = 5  # empty cells named in one error message


class ConvertError(ValueError):
    pass


def from_dataframe(
    df: pd.DataFrame,
    *,
    prompt_col: str | None = None,
    completion_col: str | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    chosen_col: str | None = None,
    rejected_col: str | None = None,
    system: str | None = None,
) -> list[dict[str, Any]]:
    columns = _columns_for_mode(prompt_col, completion_col, text_col, label_col, chosen_col, rejected_col, system)
    _require_columns(df, columns)
    cells = _cells(df, columns)
    if chosen_col:
        return [_pair(system, row[prompt_col], row[chosen_col], row[rejected_col]) for row in cells]
    if prompt_col:
        return [_chat(system, row[prompt_col], row[completion_col]) for row in cells]
    if label_col:
        labels = sorted({row[label_col] for row in cells})
        system = system or CLASSIFY_SYSTEM.format(labels=", ".join(labels))
        return [_chat(system, row[text_col], row[label_col]) for row in cells]
    return [{"text": row[text_col]} for row in cells]


def _csv_problem(message: str) -> str:
    """pandas' parser message, said with the file's own line numbers (the header is line 1)."""
    if m := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message):
        return f"line {m[2]} has {m[3]} fields where the header has {m[1]} (a comma in a value needs quotes)"
    if m := re.search(r"EOF inside string starting at row (\d+)", message):
        return f"a quote opened on line {int(m[1]) + 1} is never closed"
    return message.strip()


def from_csv(path: str | Path, **columns: Any) -> list[dict[str, Any]]:
    """Rows of a UTF-8 CSV (a leading BOM, as Excel writes, is fine); see from_dataframe."""
    try:
        # dtype=str and no NA parsing: "NA", "null" or "01" in a cell are text, not missing/numbers.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConvertError(f"{path} is not UTF-8 text; save it as CSV UTF-8") from None
    except pd.errors.EmptyDataError:
        raise ConvertError(f"{path} is empty") from None
    except pd.errors.ParserError as err:
        raise ConvertError(f"{path} is not a valid CSV: {_csv_problem(str(err))}") from None
    try:
        return from_dataframe(df, **columns)
    except ConvertError as err:
        raise ConvertError(f"{path}: {err}") from None


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _columns_for_mode(prompt_col, completion_col, text_col, label_col, chosen_col, rejected_col, system) -> list[str]:
    named = [c for c in (prompt_col, completion_col, text_col, label_col, chosen_col, rejected_col) if c]
    for mode in ([prompt_col, completion_col], [text_col, label_col], [prompt_col, chosen_col, rejected_col]):
        if all(mode) and len(named) == len(mode):
            return mode
    if text_col and len(named) == 1 and not system:
        return [text_col]
    raise ConvertError(
        "name the columns as prompt + completion (chat), text + label (classification), "
        "prompt + chosen + rejected (preference pairs) or text alone (raw text, which takes no system prompt)"
    )


def _require_columns(df: pd.DataFrame, columns: list[str]) -> None:
    there = [str(c) for c in df.columns]
    for col in columns:
        if col not in there:
            raise ConvertError(f"column {col!r} not found; columns there: {', '.join(there) or 'none'}")


def _cells(df: pd.DataFrame, columns: list[str]) -> list[dict[str, str]]:
    """The named cells as stripped strings; ConvertError naming the rows of any empty ones."""
    if df.empty:
        raise ConvertError("no rows under the header")
    rows, empty = [], []
    for i, record in enumerate(df[columns].itertuples(index=False)):
        row = {col: _text(value) for col, value in zip(columns, record)}
        empty += [f"row {i + 2} column {col!r}" for col, value in row.items() if not value]
        rows.append(row)
    if empty:
        more = f" and {len(empty) - SHOWN} more" if len(empty) > SHOWN else ""
        raise ConvertError(f"empty cell(s): {'; '.join(empty[:SHOWN])}{more} (the header is row 1)")
    return rows


def _text(value: Any) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value).strip()


def _pair(system: str | None, user: str, chosen: str, rejected: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "input": {"messages": messages + [{"role": "user", "content": user}]},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def _chat(system: str | None, user: str, assistant: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
