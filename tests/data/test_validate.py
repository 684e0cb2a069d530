import json
from pathlib import Path

import pytest

from tuneforge.data.render import render_preference
from tuneforge.data.validate import DataError, Issue, load_examples, validate_file
from tuneforge.models.tiny import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"

# code -> (line, field) of the one issue its fixture must produce. Fixtures with a bad record have ten
# good chat examples around it, the bad one at line 3.
EXPECTED = {
    "invalid_json": (3, None),
    "data_type": (3, None),
    "missing_messages_list": (3, "messages"),
    "message_missing_key": (3, "messages[1].role"),
    "message_unrecognized_key": (3, "messages[1].extra"),
    "unrecognized_role": (3, "messages[1].role"),
    "missing_content": (3, "messages[2].content"),
    "example_missing_assistant_message": (3, "messages"),
    "invalid_weight": (3, "messages[2].weight"),
    "invalid_encoding": (3, None),
    "invalid_n_examples": (None, None),
    "example_too_long": (3, None),
    "empty_file": (None, None),
    "unsupported_format": (None, None),
    "duplicate_example": (3, None),
    "missing_system_message": (3, None),
    "missing_user_message": (3, None),
    "example_truncated": (3, None),
    "unrecognized_key": (3, "weight"),  # a top-level weight: dropped, the example would train at full weight
    "no_loss_tokens": (3, "weight"),  # one example's only answer has weight 0
    "identical_answers": (3, "non_preferred_output"),
}
WARNINGS = {"duplicate_example", "missing_system_message", "missing_user_message", "example_truncated",
            "no_loss_tokens", "identical_answers"}
GOOD = ["good_chat_tools.jsonl", "good_prompt_completion.jsonl", "good_dpo.jsonl", "good_text.jsonl",
        "good_raw.txt", "good_human_assistant.txt"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def fixture(code: str) -> Path:
    (path,) = FIXTURES.glob(f"{code}.*")
    return path


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_each_fixture_yields_exactly_its_code(code, tok):
    report = validate_file(fixture(code), tokenizer=tok)
    issues = report.errors + report.warnings
    assert [(i.code, i.line, i.field) for i in issues] == [(code, *EXPECTED[code])]
    assert report.ok == (code in WARNINGS)
    assert issues[0].severity == ("warning" if code in WARNINGS else "error")


def test_every_fixture_is_covered():
    named = {p.stem for p in FIXTURES.iterdir() if not p.stem.startswith("good_")}
    assert named == set(EXPECTED)


@pytest.mark.parametrize("name", GOOD)
def test_good_fixtures_validate(name, tok):
    report = validate_file(FIXTURES / name, tokenizer=tok)
    assert report.errors == [] and report.warnings == []
    assert report.n_examples == 10 and report.n_epochs == 10
    assert report.stats.n_tokenized == 10


def test_all_lacking_system_is_not_warned_but_mixed_is(tmp_path, tok):
    chat = lambda i, sys: {"messages": ([{"role": "system", "content": "s"}] if sys else [])  # noqa: E731
                           + [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(chat(i, False)) for i in range(10)))
    assert validate_file(path).warnings == []
    path.write_text("\n".join(json.dumps(chat(i, i % 2)) for i in range(10)))
    (warning,) = validate_file(path).warnings
    assert warning.code == "missing_system_message" and warning.line == 1
    assert "5 of 10" in warning.message and "line 1, 3, 5, 7, 9" in warning.message


def test_duplicate_names_both_lines(tok):
    (warning,) = validate_file(fixture("duplicate_example")).warnings
    assert "line 1" in warning.message and warning.line == 3


def test_token_checks_need_a_tokenizer():
    report = validate_file(fixture("example_too_long"))
    assert report.ok and report.stats is None and report.billing_tokens is None and report.costs == []
    assert report.n_epochs == 9  # 11 examples: min(25, 100 // 11)


def test_the_statistics_say_they_cover_only_the_good_examples(tok):
    data = validate_file(fixture("invalid_json"), tokenizer=tok).to_dict()
    assert data["n_examples"] == 11  # every record, the bad one at line 3 too
    assert data["stats"]["n_tokenized"] == 10 and "n_examples" not in data["stats"]


def test_max_length_is_honoured(tok):
    report = validate_file(FIXTURES / "good_prompt_completion.jsonl", tokenizer=tok, max_length=85)
    assert {(i.code, i.line) for i in report.warnings} == {("example_truncated", n) for n in range(1, 11)}
    assert report.stats.n_truncated == 10
    assert report.stats.trained_tokens == 850 and report.n_sequences == 10


def test_texts_longer_than_max_length_are_split_not_truncated(tok):
    """Each 37-token document makes two windows at max_length 20: every token trained, no warning."""
    report = validate_file(FIXTURES / "good_text.jsonl", tokenizer=tok, max_length=20)
    assert report.ok and report.warnings == []
    assert report.stats.n_truncated == 0 and report.stats.trained_tokens == report.billing_tokens == 370
    assert report.n_examples == 10 and report.n_sequences == report.stats.n_sequences == 20
    assert report.n_epochs == 5  # OpenAI's rule for the 20 sequences trained on, as the trainer resolves it
    assert "10 document(s), 20 training sequence(s) of up to 20 tokens" in report.format_text()


def one_long_document(tmp_path, words: int) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(" ".join(f"word{i}" for i in range(words)) + "\n")
    return path


def test_one_long_document_making_ten_windows_is_enough(tmp_path, tok):
    """A single 3,000-word document was refused ('has 1 example(s), but must have at least 10'): for
    continued pre-training the minimum counts the sequences trained on, the document's windows."""
    path = one_long_document(tmp_path, 3000)  # ~23,000 tokens: 360 windows of 64
    report = validate_file(path, tokenizer=tok, max_length=64)
    assert report.ok and report.warnings == [] and report.n_examples == 1
    assert report.n_sequences == report.stats.n_sequences == -(-report.stats.trained_tokens // 64)
    assert report.stats.trained_tokens == report.stats.tokens_per_example["max"]  # every token
    assert "1 document(s), " in report.format_text()
    assert [e.kind for e in load_examples(path, tok, 64)] == ["text"]


def test_without_a_tokenizer_a_few_documents_are_not_refused(tmp_path, tok):
    """The trainer checks the file before its model and tokenizer load: windows cannot be counted
    yet, so the minimum waits for the check with the tokenizer, which still applies it."""
    path = one_long_document(tmp_path, 3000)
    assert [e.kind for e in load_examples(path, None, 64)] == ["text"]
    short = one_long_document(tmp_path, 20)  # ~150 tokens: 3 windows of 64
    assert load_examples(short, None, 64)
    with pytest.raises(DataError) as err:
        load_examples(short, tok, 64)
    assert [i.code for i in err.value.report.errors] == ["invalid_n_examples"]
    assert ("has 1 document(s), 3 training sequence(s) of up to 64 tokens, but must have at least 10 "
            "training sequences") in str(err.value)


def test_unrenderable_example(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    report = validate_file(FIXTURES / "good_prompt_completion.jsonl", tokenizer=tok)
    assert [(i.code, i.line) for i in report.errors] == [("unrenderable_example", n) for n in range(1, 11)]
    assert "roles must alternate" in report.errors[0].message
    assert report.stats.n_tokenized == 0


def test_report_numbers_and_json(tok):
    report = validate_file(FIXTURES / "good_text.jsonl", tokenizer=tok, tokens_per_second=100.0)
    # "Document number 0. It has some text." is 36 bytes -> 36 tokens + end-of-text
    assert report.billing_tokens == 10 * 37
    assert report.estimated_local_seconds == pytest.approx(10 * 37 * 10 / 100.0)
    costs = {c["model"]: c["usd"] for c in report.costs}
    assert costs["gpt-3.5-turbo"] == pytest.approx(3700 / 1000 * 0.008)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["format"] == "text" and data["stats"]["billing_tokens"] == 370


def test_format_text_lists_errors_with_line_and_field(tok):
    text = validate_file(fixture("unrecognized_role"), tokenizer=tok, tokens_per_second=50).format_text()
    assert "line 3, field messages[1].role: unrecognized_role: role 'human' is not one of" in text
    assert "Default epochs" in text and "gpt-4o-mini" in text and "Estimated local training time" in text
    assert text.endswith("FAILED: 1 error(s)")


def test_load_examples_returns_examples(tok):
    examples = load_examples(FIXTURES / "good_dpo.jsonl", tokenizer=tok)
    assert len(examples) == 10 and examples[0].kind == "preference" and examples[9].line == 10


def test_load_examples_raises_a_readable_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(fixture("unrecognized_role").read_text() + '{"messages": 1}\n')
    with pytest.raises(DataError) as info:
        load_examples(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(path) in str(err)
    assert "line 3, field messages[1].role: unrecognized_role" in str(err)
    assert "line 12, field messages: data_type" in str(err)
    assert [i.code for i in err.report.errors] == ["unrecognized_role", "data_type"]


def test_issue_str():
    assert str(Issue("empty_file", "nothing")) == "empty_file: nothing"
    assert str(Issue("invalid_json", "bad", 2)) == "line 2: invalid_json: bad"


def test_preference_pairs_report_what_dpo_reads_beside_the_supervised_numbers(tok):
    report = validate_file(FIXTURES / "good_dpo.jsonl", tokenizer=tok, tokens_per_second=100)
    examples = load_examples(FIXTURES / "good_dpo.jsonl", tokenizer=tok)
    both = sum(len(r.input_ids) for e in examples for r in render_preference(e, tok))
    assert report.dpo_tokens == both > report.stats.trained_tokens  # the other answer is read too
    assert report.estimated_local_seconds_dpo == pytest.approx(both * report.n_epochs / 100)
    assert f"As DPO (both answers of each pair): {both:,} tokens per epoch" in report.format_text()
    assert validate_file(fixture("unrecognized_role"), tokenizer=tok).dpo_tokens is None  # chat: no DPO line


def test_a_file_where_no_answer_carries_loss_is_refused(tmp_path, tok):
    """Validation passed it and training then refused it; a mixed file lost examples without a word."""
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    path = tmp_path / "w0.jsonl"
    path.write_text("\n".join(json.dumps(chat | {"messages": [{"role": "user", "content": f"q{i}"}, chat["messages"][1]]})
                              for i in range(12)))
    (error,) = validate_file(path, tokenizer=tok).errors
    assert (error.code, error.line, error.field) == ("no_loss_tokens", 1, "weight")


def test_extra_keys_are_warned_once_and_keys_that_change_training_refused(tmp_path):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps({"id": i} | chat | {"messages": [{"role": "user", "content": f"q{i}"},
                                                                        chat["messages"][1]]}) for i in range(12)))
    report = validate_file(path)
    assert report.ok and len(load_examples(path)) == 12  # bookkeeping keys are harmless...
    (warning,) = report.warnings  # ...and said once for the file, not once a line
    assert (warning.code, warning.line, warning.field) == ("unrecognized_key", 1, "id")
    assert "12 line(s) (1, 2, 3, 4, 5, ...)" in warning.message

    labelled = tmp_path / "labels.jsonl"  # classification rows written by hand: the label would be dropped
    labelled.write_text("\n".join(json.dumps({"text": f"doc {i}", "label": "x"}) for i in range(12)))
    (error,) = validate_file(labelled).errors
    assert (error.code, error.field) == ("unrecognized_key", "label") and "--label-col" in error.message


def test_a_json_array_is_one_error_not_one_per_line(tmp_path):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([chat] * 12, indent=2))
    report = validate_file(path)
    (error,) = report.errors
    assert error.code == "invalid_json" and "one JSON array" in error.message and error.line is None
    assert report.n_examples == 12  # the array's items, not the pretty-printed lines
    path.write_text(json.dumps([chat] * 3))  # on one line: no "fewer than 10 examples" beside it
    assert [e.code for e in validate_file(path).errors] == ["invalid_json"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_a_utf16_file_is_one_error_naming_the_encoding(tmp_path, encoding):
    # as Windows' Notepad saves "Unicode": each line read as UTF-8 was an invalid_json of its own
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    for name in ("data.jsonl", "data.txt"):
        path = tmp_path / name
        path.write_bytes("".join(json.dumps(chat) + "\n" for _ in range(12)).encode(encoding))
        (error,) = validate_file(path).errors
        assert error.code == "invalid_encoding" and "UTF-16" in error.message and error.line is None


def test_a_pretty_printed_object_is_one_error_but_a_single_bad_line_keeps_its_own(tmp_path):
    chat = {"messages": [{"role": "robot", "content": "q"}]}
    spread = tmp_path / "spread.jsonl"
    spread.write_text(json.dumps(chat, indent=2))
    errors = validate_file(spread).errors
    assert all(e.line is None for e in errors)  # not one error per line of the object
    assert any(e.code == "invalid_json" and "spread over several lines" in e.message for e in errors)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(chat) + "\n")
    codes = [(e.code, e.line, e.field) for e in validate_file(one).errors]
    assert ("unrecognized_role", 1, "messages[0].role") in codes, codes


def test_max_length_must_be_what_training_takes(tmp_path):
    with pytest.raises(ValueError, match="^max_length must be at least 16, got 15$"):  # train.config's words
        validate_file(FIXTURES / "good_text.jsonl", max_length=15)
    assert validate_file(FIXTURES / "good_text.jsonl").max_length == 1024  # what training uses by default


def test_the_error_for_a_file_it_cannot_read_points_at_the_fix_not_the_report(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("q,a\nx,y\n")
    with pytest.raises(DataError) as err:
        load_examples(csv)
    said = str(err.value)
    assert "tuneforge data convert qa.csv" in said and "...." not in said and "data validate" not in said
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n" * 12)
    with pytest.raises(DataError, match="Run `tuneforge data validate .*bad.jsonl` for the full report"):
        load_examples(bad)
