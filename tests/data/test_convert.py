import json

import pandas as pd
import pytest

from tuneforge.data.convert import ConvertError, from_csv, from_dataframe, write_jsonl
from tuneforge.data.validate import validate_file


def test_prompt_completion_rows():
    df = pd.DataFrame({"q": ["What is 2+2?", " hi "], "a": ["4", "hello"]})
    rows = from_dataframe(df, prompt_col="q", completion_col="a")
    assert rows[0] == {"messages": [{"role": "user", "content": "What is 2+2?"},
                                    {"role": "assistant", "content": "4"}]}
    assert rows[1]["messages"][0]["content"] == "hi"


def test_prompt_completion_with_system():
    df = pd.DataFrame({"q": ["x"], "a": ["y"]})
    rows = from_dataframe(df, prompt_col="q", completion_col="a", system="Be brief.")
    assert rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_classification_lists_the_labels_in_the_system_prompt():
    df = pd.DataFrame({"review": ["great", "awful", "fine"], "sentiment": ["positive", "negative", "neutral"]})
    rows = from_dataframe(df, text_col="review", label_col="sentiment")
    assert rows[1] == {"messages": [
        {"role": "system", "content": "Classify the text. Answer with one of: negative, neutral, positive."},
        {"role": "user", "content": "awful"},
        {"role": "assistant", "content": "negative"},
    ]}


def test_numeric_labels_and_custom_system():
    df = pd.DataFrame({"t": ["a", "b"], "y": [1, 0]})
    rows = from_dataframe(df, text_col="t", label_col="y", system="Spam? 1 or 0.")
    assert [r["messages"][0]["content"] for r in rows] == ["Spam? 1 or 0."] * 2
    assert [r["messages"][2]["content"] for r in rows] == ["1", "0"]


def test_text_only_rows():
    assert from_dataframe(pd.DataFrame({"body": ["one", "two"]}), text_col="body") == [{"text": "one"}, {"text": "two"}]


def test_preference_pairs_for_dpo(tmp_path):
    df = pd.DataFrame({"q": [f"Say hello to {i}." for i in range(10)], "good": [f"Hello, {i}!" for i in range(10)],
                       "bad": ["No."] * 10})
    rows = from_dataframe(df, prompt_col="q", chosen_col="good", rejected_col="bad", system="Be kind.")
    assert rows[3] == {
        "input": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello to 3."}]},
        "preferred_output": [{"role": "assistant", "content": "Hello, 3!"}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }
    report = validate_file(write_jsonl(rows, tmp_path / "pairs.jsonl"))
    assert report.ok and report.format == "preference"


@pytest.mark.parametrize("kwargs", [
    {},
    {"prompt_col": "q"},
    {"prompt_col": "q", "completion_col": "a", "label_col": "y"},
    {"text_col": "q", "system": "s"},
    {"prompt_col": "q", "chosen_col": "a"},  # a pair needs its other answer
    {"prompt_col": "q", "completion_col": "a", "chosen_col": "a", "rejected_col": "a"},
])
def test_column_choice_must_name_one_mode(kwargs):
    with pytest.raises(ConvertError, match="prompt \\+ completion \\(chat\\)"):
        from_dataframe(pd.DataFrame({"q": ["x"], "a": ["y"]}), **kwargs)


def test_csv_missing_column_names_it_and_lists_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(ConvertError) as info:
        from_csv(path, prompt_col="prompt", completion_col="answer")
    assert str(info.value) == f"{path}: column 'prompt' not found; columns there: question, answer"


def test_csv_empty_cells_name_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nq1,a1\nq2,\n,a3\n"q4"," "\n')
    with pytest.raises(ConvertError) as info:
        from_csv(path, prompt_col="prompt", completion_col="completion")
    message = str(info.value)
    assert "row 3 column 'completion'; row 4 column 'prompt'; row 5 column 'completion'" in message
    assert "header is row 1" in message


def test_csv_keeps_na_text_and_excel_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffprompt,completion\nWhat does NA mean?,NA\nPad 7,007\n".encode("utf-8"))
    rows = from_csv(path, prompt_col="prompt", completion_col="completion")
    assert [r["messages"][1]["content"] for r in rows] == ["NA", "007"]


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (b"prompt,completion\n", "no rows"),
                                            (b"prompt,completion\ncaf\xe9,x\n", "not UTF-8")])
def test_csv_bad_files(tmp_path, content, match):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    with pytest.raises(ConvertError, match=match):
        from_csv(path, prompt_col="prompt", completion_col="completion")


def test_missing_file():
    with pytest.raises(ConvertError, match="no such file"):
        from_csv("/nonexistent/x.csv", text_col="t")


def test_written_jsonl_validates(tmp_path):
    df = pd.DataFrame({"text": [f"message {i}, with ünïcode" for i in range(12)],
                       "label": ["spam" if i % 3 else "ham" for i in range(12)]})
    out = write_jsonl(from_dataframe(df, text_col="text", label_col="label"), tmp_path / "sub" / "train.jsonl")
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12 and "ünïcode" in lines[0]
    assert json.loads(lines[0])["messages"][0]["content"] == "Classify the text. Answer with one of: ham, spam."
    report = validate_file(out)
    assert report.ok and report.warnings == [] and report.format == "chat" and report.n_examples == 12
