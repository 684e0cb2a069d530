import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tuneforge.cli import app
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


@pytest.mark.parametrize("content, line", [
    ("question,answer\nWhat is 2+2?,4,math\nCapital of France?,Paris,geo\n", 2),  # was read shifted: user "4"
    ("question,answer\nWhat is 2+2?,4,\nCapital of France?,Paris,\n", 2),  # a trailing comma: was "empty cell(s)"
    ("question,answer\nWhat is 2+2?,4\nCapital of France?,Paris,geo\n", 3),
])
def test_csv_row_with_more_fields_than_the_header_is_an_error_naming_its_line(tmp_path, content, line):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(ConvertError) as info:
        from_csv(path, prompt_col="question", completion_col="answer")
    assert str(info.value).startswith(f"{path} is not a valid CSV: line {line} has 3 fields where the header has 2")


@pytest.mark.parametrize("content, problem", [
    ('q,a\n"multi\nline",a0\nq1,a1\nq2,a2,x\n', "line 5 has 3 fields"),  # pandas counts the quoted cell as 1 line
    ('q,a\n\n"multi\nline",a0\n\nq2,a2,x\n', "line 6 has 3 fields"),  # blank lines count
    ('q,a\r\n"multi\r\nline",a0\r\nq2,a2,x\r\n', "line 4 has 3 fields"),
    ('q,a\n"multi\nline",a0\nq1,"a1\n', "a quote opened in the row starting on line 4 is never closed"),
])
def test_csv_parser_errors_name_the_line_of_the_file(tmp_path, content, problem):
    path = tmp_path / "d.csv"
    path.write_bytes(content.encode())
    with pytest.raises(ConvertError, match=f"not a valid CSV: {problem}"):
        from_csv(path, prompt_col="q", completion_col="a")


@pytest.mark.parametrize("sep", [";", "\t"])
def test_csv_separated_by_semicolons_or_tabs_is_read_as_such(tmp_path, sep):
    # Excel's "CSV" in most of Europe: read with commas it was one column named "Frage;Antwort", or (a
    # comma in a value) a parser error on a row that has none of the file's own separators out of place
    path = tmp_path / "d.csv"
    path.write_bytes(f'\ufeffFrage{sep}Antwort\r\nWas ist 1,5 plus 1?{sep}"2,5{sep} sagt man"\r\nHallo{sep}Gut\r\n'
                     .encode())
    rows = from_csv(path, prompt_col="Frage", completion_col="Antwort")
    assert [[m["content"] for m in r["messages"]] for r in rows] == [["Was ist 1,5 plus 1?", f"2,5{sep} sagt man"],
                                                                     ["Hallo", "Gut"]]
    path.write_text(f'q{sep}a\n"multi\nline"{sep}a0\nq2{sep}a2{sep}x\n')
    with pytest.raises(ConvertError, match="not a valid CSV: line 4 has 3 fields where the header has 2"):
        from_csv(path, prompt_col="q", completion_col="a")


def test_duplicated_column_in_use_is_refused():
    df = pd.DataFrame([["a", "b", "c"]], columns=["q", "q", "a"])
    with pytest.raises(ConvertError, match="column 'q' appears 2 times"):
        from_dataframe(df, prompt_col="q", completion_col="a")
    rows = from_dataframe(df.set_axis(["x", "q", "a"], axis=1), prompt_col="q", completion_col="a")
    assert rows[0]["messages"][0]["content"] == "b"


def test_csv_duplicated_header_in_use_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,q,a,notes,notes\na,b,c,,\n")  # an unused duplicate is no problem
    with pytest.raises(ConvertError, match=f"^{path}: column 'q' appears 2 times"):
        from_csv(path, prompt_col="q", completion_col="a")
    assert from_csv(path, text_col="a") == [{"text": "c"}]


@pytest.mark.parametrize("names", [("0", "1"), (0, 1)])
def test_integer_column_names(names):
    rows = from_dataframe(pd.DataFrame([["a", "b"]]), prompt_col=names[0], completion_col=names[1])
    assert rows[0]["messages"][1]["content"] == "b"


def test_dataframe_errors_name_the_index_label_not_a_csv_row():
    df = pd.DataFrame({"q": ["x", None, "z"], "a": ["1", "2", np.nan]}, index=[10, 11, 12])
    with pytest.raises(ConvertError) as info:
        from_dataframe(df, prompt_col="q", completion_col="a")
    assert str(info.value) == "empty cell(s): index 11 column 'q'; index 12 column 'a'"
    with pytest.raises(ConvertError, match="^the DataFrame has no rows$"):
        from_dataframe(df.iloc[:0], prompt_col="q", completion_col="a")


def test_integral_float_labels_lose_their_point():
    df = pd.DataFrame({"t": list("abcd"), "y": [1.0, 0.0, np.nan, 2.5]}).dropna()  # the NaN made the column float
    rows = from_dataframe(df, text_col="t", label_col="y")
    assert rows[0]["messages"][0]["content"] == "Classify the text. Answer with one of: 0, 1, 2.5."
    assert [r["messages"][2]["content"] for r in rows] == ["1", "0", "2.5"]


def test_numeric_labels_are_listed_in_numeric_order():
    rows = from_dataframe(pd.DataFrame({"t": list("abc"), "y": [1, 10, 2]}), text_col="t", label_col="y")
    assert rows[0]["messages"][0]["content"] == "Classify the text. Answer with one of: 1, 2, 10."


def test_classification_needs_two_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("t,y\na,pos\nb,pos\n")
    with pytest.raises(ConvertError, match=f"^{path}: column 'y' has the one label 'pos': .* at least two labels"):
        from_csv(path, text_col="t", label_col="y")


def test_labels_differing_only_in_case_are_refused_naming_both(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("t,y\na,neg\nb,Pos\nc,pos\nd,Pos\n")
    with pytest.raises(ConvertError) as info:
        from_csv(path, text_col="t", label_col="y")
    assert str(info.value) == (f"{path}: column 'y' has labels that differ only in case: 'Pos' (row 3) and "
                               "'pos' (row 4); write each label one way")
    with pytest.raises(ConvertError, match="'pos' \\(index 'x'\\) and 'POS' \\(index 'y'\\)"):
        from_dataframe(pd.DataFrame({"t": ["a", "b", "c"], "y": ["pos", "POS", "neg"]}, index=list("xyz")),
                       text_col="t", label_col="y")


@pytest.mark.parametrize("n, said", [(1, "wrote 1 example to"), (2, "wrote 2 examples to")])
def test_cli_convert_says_example_or_examples(tmp_path, n, said):
    path = tmp_path / "d.csv"
    path.write_text("q,a\n" + "x,y\n" * n)
    result = CliRunner().invoke(app, ["data", "convert", str(path), "--prompt-col", "q", "--completion-col", "a",
                                      "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 0 and result.stdout == f"{said} {tmp_path / 'o.jsonl'}\n"
