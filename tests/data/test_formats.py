import json
from pathlib import Path

import pytest

from tuneforge.data.formats import parse_file, parse_record

FIXTURES = Path(__file__).parent / "fixtures"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def codes(parsed):
    return [(i.code, i.line, i.field) for i in parsed.issues]


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "name, fmt, kind",
    [
        ("good_chat_tools.jsonl", "chat", "chat"),
        ("good_prompt_completion.jsonl", "prompt_completion", "chat"),
        ("good_dpo.jsonl", "preference", "preference"),
        ("good_text.jsonl", "text", "text"),
        ("good_raw.txt", "raw_txt", "text"),
        ("good_human_assistant.txt", "instruction_txt", "chat"),
    ],
)
def test_good_fixtures_parse_cleanly(name, fmt, kind):
    parsed = parse_file(FIXTURES / name)
    assert parsed.issues == []
    assert parsed.format == fmt
    assert parsed.n_records == len(parsed.examples) == 10
    assert {e.kind for e in parsed.examples} == {kind}


def test_chat_keeps_tools_weights_and_tool_calls():
    ex = parse_file(FIXTURES / "good_chat_tools.jsonl").examples[1]
    assert ex.line == 2
    assert ex.tools[0]["function"]["name"] == "get_weather"
    roles = [m["role"] for m in ex.messages]
    assert roles == ["system", "user", "assistant", "assistant", "tool", "assistant"]
    assert ex.messages[2]["weight"] == 0
    assert ex.messages[3]["content"] is None
    assert ex.messages[3]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'


def test_prompt_completion_becomes_user_assistant_chat():
    ex = parse_file(FIXTURES / "good_prompt_completion.jsonl").examples[2]
    assert ex.kind == "chat" and ex.line == 3
    assert ex.messages == [
        {"role": "user", "content": "Translate to French: house"},
        {"role": "assistant", "content": "maison"},
    ]


def test_dpo_keeps_prompt_and_both_answers():
    ex = parse_file(FIXTURES / "good_dpo.jsonl").examples[0]
    assert ex.messages == [{"role": "user", "content": "Say hello to person 0."}]
    assert ex.chosen == [{"role": "assistant", "content": "Hello, person 0!"}]
    assert ex.rejected == [{"role": "assistant", "content": "No."}]
    assert ex.tools == []


def test_raw_txt_one_document_per_blank_line_block():
    examples = parse_file(FIXTURES / "good_raw.txt").examples
    assert examples[0].text == "Paragraph 0, first line.\nParagraph 0, second line."
    assert [e.line for e in examples[:3]] == [1, 4, 7]


def test_human_assistant_txt_pairs_and_multi_turn():
    examples = parse_file(FIXTURES / "good_human_assistant.txt").examples
    assert examples[0].messages == [
        {"role": "user", "content": "What is 0 times 2?"},
        {"role": "assistant", "content": "0"},
    ]
    last = examples[-1]
    assert last.line == 28
    assert [m["role"] for m in last.messages] == ["user", "assistant", "user", "assistant"]
    assert last.messages[1]["content"] == "Hello! How can I help?\n\nI can do arithmetic."
    assert last.messages[3]["content"] == "9"


def test_txt_marker_with_space_and_blank_lines_inside_answers(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("### Human: one\n\n### Assistant: two\n\nmore two\n\n### Human: three\n### Assistant: four\n")
    parsed = parse_file(path)
    assert parsed.issues == []
    assert [e.messages for e in parsed.examples] == [
        [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two\n\nmore two"}],
        [{"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}],
    ]
    assert [e.line for e in parsed.examples] == [1, 7]


def test_txt_problems(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("preamble\n###Human: q1\n###Assistant:\n\n###Human: q2\n\n###Human: q3\n###Assistant: a3\n")
    parsed = parse_file(path)
    assert codes(parsed) == [
        ("data_type", 1, None),
        ("missing_content", 3, "###Assistant"),
        ("example_missing_assistant_message", 5, "###Assistant"),
    ]
    assert parsed.n_records == 3
    assert [e.line for e in parsed.examples] == [7]


def test_csv_is_refused_with_a_pointer_to_convert():
    parsed = parse_file(FIXTURES / "unsupported_format.csv")
    assert codes(parsed) == [("unsupported_format", None, None)]
    assert "tuneforge data convert" in parsed.issues[0].message


def test_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\r\n\r\n" + json.dumps(CHAT).encode() + b"\r\n")
    parsed = parse_file(path)
    assert parsed.issues == []
    assert [e.line for e in parsed.examples] == [1, 3]


def test_invalid_encoding_names_the_line_and_other_lines_still_parse(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b'\n{"text": "caf\xe9"}\n' + json.dumps(CHAT).encode())
    parsed = parse_file(path)
    assert codes(parsed) == [("invalid_encoding", 2, None)]
    assert "0xe9" in parsed.issues[0].message
    assert [e.line for e in parsed.examples] == [1, 3]


def test_one_file_holds_one_kind(tmp_path):
    rows = [CHAT, {"prompt": "p", "completion": "c"}, {"text": "raw"}]
    parsed = parse_file(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert codes(parsed) == [("data_type", 3, None)]
    assert parsed.format == "chat+prompt_completion"


@pytest.mark.parametrize(
    "record, expected",
    [
        ("[1, 2]", [("data_type", None)]),
        ("42", [("data_type", None)]),
        ("{not json", [("invalid_json", None)]),
        ('{"foo": 1}', [("missing_messages_list", "messages")]),
        ('{"messages": "hi"}', [("data_type", "messages")]),
        ('{"messages": ["hi"]}', [("data_type", "messages[0]")]),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}',
         [("message_missing_key", "messages[1].content")]),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
         [("data_type", "messages[0].content")]),
        ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},'
         ' {"role": "assistant", "content": "a"}]}', [("data_type", "messages[0].content[0]")]),
        ('{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}',
         [("invalid_weight", "messages[0].weight")]),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": true}]}',
         [("invalid_weight", "messages[1].weight")]),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
         [("missing_content", "messages[1].content")]),
        ('{"messages": [{"role": 7, "content": "q"}, {"role": "assistant", "content": "a"}]}',
         [("unrecognized_role", "messages[0].role")]),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": {}}',
         [("data_type", "tools")]),
        ('{"prompt": "p"}', [("message_missing_key", "completion")]),
        ('{"prompt": "p", "completion": 3}', [("data_type", "completion")]),
        ('{"prompt": "  ", "completion": "c"}', [("missing_content", "prompt")]),
        ('{"text": ""}', [("missing_content", "text")]),
        ('{"text": null}', [("data_type", "text")]),
        ('{"input": [], "preferred_output": [], "non_preferred_output": []}', [("data_type", "input")]),
        ('{"input": {"messages": [{"role": "user", "content": "q"}]},'
         ' "preferred_output": [{"role": "user", "content": "a"}], "non_preferred_output": []}',
         [("unrecognized_role", "preferred_output[0].role"),
          ("example_missing_assistant_message", "non_preferred_output")]),
        ('{"preferred_output": [{"role": "assistant", "content": "a"}],'
         ' "non_preferred_output": [{"role": "assistant", "content": "b"}]}',
         [("missing_messages_list", "input.messages")]),
    ],
)
def test_record_issues(record, expected):
    fmt, example, issues, _ = parse_record(record, 4)
    assert [(i.code, i.field) for i in issues] == expected
    assert all(i.line == 4 and i.severity == "error" for i in issues)


@pytest.mark.parametrize(
    "record, message",
    [
        ('{"text": "cut', "not valid JSON: Unterminated string starting at column 10"),
        ('{"text": "a\tb"}', "not valid JSON: Invalid control character at column 12"),
        ("{not json", "not valid JSON: Expecting property name enclosed in double quotes at column 2"),
    ],
)
def test_invalid_json_says_where_once(record, message):
    (issue,) = parse_record(record, 3)[2]
    assert (issue.code, issue.message) == ("invalid_json", message)


def test_assistant_with_only_tool_calls_needs_no_content():
    record = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                              "function": {"name": "w", "arguments": "{}"}}]},
    ]}
    fmt, example, issues, _ = parse_record(json.dumps(record), 1)
    assert (fmt, issues) == ("chat", [])
    assert example.messages == record["messages"]


def test_garbage_never_raises(tmp_path):
    junk = ["", "null", "[]", '"s"', "{", '{"messages": null}', '{"messages": [null, 1, []]}',
            '{"messages": [{"role": []}]}', '{"input": {"messages": {}}}', "[" * 100000 + "]" * 100000,
            '{"messages": [{"role": "assistant", "content": [1, {"type": "text"}]}]}', "1e999999",
            '{"prompt": {}, "completion": []}', '{"text": ["a"]}', '{"messages": [{"role": "assistant", '
            '"content": "a", "weight": NaN, "tool_calls": "x", "name": 3}]}']
    parsed = parse_file(write_jsonl(tmp_path / "junk.jsonl", junk))
    assert parsed.examples == []
    assert parsed.n_records == len(junk) - 1  # the empty line is no record
    assert {i.line for i in parsed.issues} == set(range(2, len(junk) + 1))


@pytest.mark.parametrize("record, field, says", [
    # OpenAI's deprecated function_call: it was taken, and trained as an empty answer
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]},
     "messages[1].function_call", "write it as tool_calls"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [1]}]},
     "messages[1].tool_calls[0].function", "a tool call must be"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]},
     "messages[1].tool_calls[0].function.arguments", "must be a string"),
    ({"messages": CHAT["messages"], "tools": [{"type": "function"}]}, "tools[0].function.name", "function.name"),
    # the answer needs a prompt before it (the template error said "empty conversation")
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "b"}]}, "messages[0].role", "starts with an assistant message"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]},
      "preferred_output": [{"role": "assistant", "content": "a", "weight": 0}],
      "non_preferred_output": [{"role": "assistant", "content": "b"}]}, "preferred_output[0].weight", "not used"),
    ({"messages": [{"role": "user", "content": "q \ud83d"}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "lone surrogate \\ud83d at character 3"),
])
def test_malformed_records_are_refused_by_field(record, field, says):
    issues = parse_record(json.dumps(record), 7)[2]
    assert [(i.line, i.field) for i in issues] == [(7, field)]
    assert says in issues[0].message


def test_instruction_markers_in_any_case_and_on_one_line(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("###Human: q1\n###Assistant: a1\n\n### human: q2\n###ASSISTANT: a2\n\n"
                    "###Human: q3 ###Assistant: a3\n")
    parsed = parse_file(path)
    assert parsed.issues == []
    assert [[m["content"] for m in e.messages] for e in parsed.examples] == [["q1", "a1"], ["q2", "a2"], ["q3", "a3"]]


def test_instruction_markers_indented_or_spaced_before_the_colon_are_markers(tmp_path):
    # missed, such a file was read as raw text: the markers themselves trained as a document
    path = tmp_path / "chat.txt"
    path.write_text("  ###Human: q1\n  ###Assistant: a1\n\n###Human : q2\n### Assistant :  a2\n\n"
                    "\t###Human: q3 ### Assistant : a3\n")
    parsed = parse_file(path)
    assert parsed.format == "instruction_txt" and parsed.issues == []
    assert [[m["content"] for m in e.messages] for e in parsed.examples] == [["q1", "a1"], ["q2", "a2"], ["q3", "a3"]]


def test_trls_chosen_rejected_shape_is_one_error_pointing_at_openais():
    """TRL's {"prompt", "chosen", "rejected"} (the shape of most public preference datasets) was read as
    prompt/completion: "no completion" and two warnings of keys left unread, none saying what to write."""
    fmt, example, issues, unread = parse_record(json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}), 3)
    assert (fmt, example, unread) == (None, None, [])
    assert [(i.code, i.line, i.field) for i in issues] == [("unsupported_format", 3, "chosen")]
    assert "TRL's preference shape" in issues[0].message and '"preferred_output"' in issues[0].message
    assert "--chosen-col" in issues[0].message


def test_a_key_a_pairs_input_does_not_read_is_an_error_naming_it():
    """A misspelt `tool` in a pair's input was dropped unread: the pair trained with no tools offered."""
    pair = {"input": {"messages": [{"role": "user", "content": "q"}], "tool": []},
            "preferred_output": [{"role": "assistant", "content": "a"}],
            "non_preferred_output": [{"role": "assistant", "content": "b"}]}
    _, _, issues, _ = parse_record(json.dumps(pair), 7)
    assert [(i.code, i.line, i.field, i.severity) for i in issues] == [("unrecognized_key", 7, "input.tool", "error")]
    assert issues[0].message == "unrecognized key 'tool' in input; it holds messages, tools, parallel_tool_calls"
    pair["input"] = {"messages": pair["input"]["messages"], "parallel_tool_calls": False}
    assert parse_record(json.dumps(pair), 7)[2] == []
