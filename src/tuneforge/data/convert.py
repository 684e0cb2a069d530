"""CSV / DataFrame -> chat JSONL rows, with the columns named by the user.

A table has no single obvious mapping to a conversation, so the user names the columns:
  prompt_col + completion_col   user = prompt, assistant = completion
  text_col + label_col          classification: user = text, assistant = label, and a system prompt
                                listing the label set so the model knows its choices
  text_col alone                {"text": ...} rows for continued pre-training
  prompt_col + chosen_col + rejected_col
                                preference pairs for DPO (OpenAI's shape): user = prompt, the
                                preferred and the non-preferred assistant answer
Rows of a CSV file are numbered as in the file, with the header as row 1, so errors point at the right row;
rows of a DataFrame, which has no header row, are named by their index label.
"""

from __future__ import annotations

import csv
import itertools
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


def listed_labels(system: str) -> list[str] | None:
    """The label set a classification file made here names in its system prompt (CLASSIFY_SYSTEM);
    None for any other text."""
    head, tail = CLASSIFY_SYSTEM.split("{labels}")
    if not (system.startswith(head) and system.endswith(tail)) or len(system) <= len(head) + len(tail):
        return None
    return system[len(head) : len(system) - len(tail)].split(", ")


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
    """One example per row of df (a column named "0" or 0 finds pandas' default column 0); see the module doc."""
    return _convert(df, False, prompt_col=prompt_col, completion_col=completion_col, text_col=text_col,
                    label_col=label_col, chosen_col=chosen_col, rejected_col=rejected_col, system=system)


def _convert(df: pd.DataFrame, from_file: bool, *, prompt_col=None, completion_col=None, text_col=None,
             label_col=None, chosen_col=None, rejected_col=None, system=None) -> list[dict[str, Any]]:
    """from_dataframe's work; from_file: df is a CSV file's rows, so errors number them as the file does."""
    columns = _columns_for_mode(prompt_col, completion_col, text_col, label_col, chosen_col, rejected_col, system)
    df = df.iloc[:, _require_columns(df, columns)]
    cells = _cells(df, columns, from_file)
    if chosen_col is not None:
        return [_pair(system, row[prompt_col], row[chosen_col], row[rejected_col]) for row in cells]
    if prompt_col is not None:
        return [_chat(system, row[prompt_col], row[completion_col]) for row in cells]
    if label_col is not None:
        labels = _labels([row[label_col] for row in cells], label_col, df, from_file)
        system = system or CLASSIFY_SYSTEM.format(labels=", ".join(labels))
        return [_chat(system, row[text_col], row[label_col]) for row in cells]
    return [{"text": row[text_col]} for row in cells]


def _csv_problem(message: str, path: str | Path, sep: str = ",") -> str:
    """pandas' parser message, said with the file's own line numbers (the header is line 1)."""
    if m := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message):
        what = {",": "a comma", ";": "a semicolon", "\t": "a tab"}[sep]
        return f"{_line(path, int(m[2]), sep)} has {m[3]} fields where the header has {m[1]} ({what} in a value needs quotes)"
    if m := re.search(r"EOF inside string starting at row (\d+)", message):  # row counts from 0
        return f"a quote opened in the row starting on {_line(path, int(m[1]) + 1, sep)} is never closed"
    return message.strip()


def _line(path: str | Path, record: int, sep: str = ",") -> str:
    """ "line N" for pandas' line `record`, which counts a quoted cell's line breaks as none: the file's line."""
    limit = csv.field_size_limit(2**31 - 1)  # a long cell before the bad row is no error here
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=sep)  # quotes as pandas reads them, and a blank line is a record too (as in pandas)
            if sum(1 for _ in itertools.islice(reader, record - 1)) == record - 1:
                return f"line {reader.line_num + 1}"
    except (OSError, csv.Error):
        pass
    finally:
        csv.field_size_limit(limit)
    return f"record {record}"  # the file could not be followed to it: pandas' count, said as what it is


def from_csv(path: str | Path, **columns: Any) -> list[dict[str, Any]]:
    """Rows of a UTF-8 CSV (a leading BOM, as Excel writes, is fine); see from_dataframe."""
    sep = _separator(path)
    df = _read_csv(path, sep)
    df = df.iloc[1:].set_axis(list(df.iloc[0]), axis=1)
    try:
        return _convert(df, True, **columns)
    except ConvertError as err:
        raise ConvertError(f"{path}: {err}") from None


def _separator(path: str | Path) -> str:
    """The field separator: a comma, unless the header is one column holding a semicolon or a tab -
    Excel writes "CSV" with semicolons where the decimal separator is a comma (most of Europe), and
    tab-separated exports are common. Read as commas, such a file was one column named "q;a"."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeError, csv.Error):
        return ","  # read_csv says what is wrong with the file
    return next((c for c in ";\t" if c in header[0]), ",") if len(header) == 1 else ","


def _read_csv(path: str | Path, sep: str) -> pd.DataFrame:
    try:
        # dtype=str and no NA parsing: "NA", "null" or "01" in a cell are text, not missing/numbers.
        # header=None: the header is read as a row, so pandas checks every row's field count against it; with
        # header=0 a first data row one field longer than the header silently became the index, shifting the columns.
        return pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConvertError(f"{path} is not UTF-8 text; save it as CSV UTF-8") from None
    except pd.errors.EmptyDataError:
        raise ConvertError(f"{path} is empty") from None
    except pd.errors.ParserError as err:
        raise ConvertError(f"{path} is not a valid CSV: {_csv_problem(str(err), path, sep)}") from None


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _columns_for_mode(prompt_col, completion_col, text_col, label_col, chosen_col, rejected_col, system) -> list[str]:
    # "is not None": a column may be named 0
    named = [c for c in (prompt_col, completion_col, text_col, label_col, chosen_col, rejected_col) if c is not None]
    for mode in ([prompt_col, completion_col], [text_col, label_col], [prompt_col, chosen_col, rejected_col]):
        if None not in mode and len(named) == len(mode):
            return mode
    if text_col is not None and len(named) == 1 and not system:
        return [text_col]
    raise ConvertError(
        "name the columns as prompt + completion (chat), text + label (classification), "
        "prompt + chosen + rejected (preference pairs) or text alone (raw text, which takes no system prompt)"
    )


def _require_columns(df: pd.DataFrame, columns: list[str]) -> list[int]:
    """The position of each named column, matched as text (pandas' default column names are the integers 0, 1...)."""
    there = [str(c) for c in df.columns]
    for col in columns:
        if str(col) not in there:
            raise ConvertError(f"column {col!r} not found; columns there: {', '.join(there) or 'none'}")
        if there.count(str(col)) > 1:  # which of them is meant? pandas would quietly take one
            raise ConvertError(f"column {col!r} appears {there.count(str(col))} times: give the columns unique names")
    return [there.index(str(col)) for col in columns]


def _where(df: pd.DataFrame, i: int, from_file: bool) -> str:
    """The i-th row as the user knows it: its row in the CSV file, or its index label in the DataFrame."""
    return f"row {i + 2}" if from_file else f"index {df.index[i:i + 1].tolist()[0]!r}"  # tolist: 11, not np.int64(11)


def _cells(df: pd.DataFrame, columns: list[str], from_file: bool) -> list[dict[str, str]]:
    """The named cells as stripped strings; ConvertError naming the rows of any empty ones."""
    if df.empty:
        raise ConvertError("no rows under the header" if from_file else "the DataFrame has no rows")
    rows, empty = [], []
    for i, record in enumerate(df.itertuples(index=False)):
        row = {col: _text(value) for col, value in zip(columns, record)}
        empty += [f"{_where(df, i, from_file)} column {col!r}" for col, value in row.items() if not value]
        rows.append(row)
    if empty:
        more = f" and {len(empty) - SHOWN} more" if len(empty) > SHOWN else ""
        header = " (the header is row 1)" if from_file else ""
        raise ConvertError(f"empty cell(s): {'; '.join(empty[:SHOWN])}{more}{header}")
    return rows


def _text(value: Any) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if pd.api.types.is_float(value) and value.is_integer():
        return str(int(value))  # a label 1 read as 1.0 (pandas makes a column with a NaN float) is still "1"
    return str(value).strip()


def _labels(labels: list[str], col: str, df: pd.DataFrame, from_file: bool) -> list[str]:
    """The label set for the system prompt, numbers in numeric order; ConvertError if it cannot train a classifier."""
    first: dict[str, int] = {}
    for i, label in enumerate(labels):
        first.setdefault(label, i)  # each label's first row, in order
    if len(first) < 2:
        raise ConvertError(f"column {col!r} has the one label {labels[0]!r}: a classifier needs at least two labels")
    by_case: dict[str, list[str]] = {}
    for label in first:
        by_case.setdefault(label.casefold(), []).append(label)
    for same in by_case.values():  # "Pos" and "pos" would be taught as two different answers
        if len(same) > 1:
            said = " and ".join(f"{label!r} ({_where(df, first[label], from_file)})" for label in same)
            raise ConvertError(f"column {col!r} has labels that differ only in case: {said}; write each label one way")
    try:
        return sorted(first, key=lambda label: (float(label), label))  # 1, 2, 10 rather than 1, 10, 2
    except ValueError:
        return sorted(first)


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
