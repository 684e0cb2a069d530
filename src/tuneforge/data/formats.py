"""Parse a training file into Examples, turning every malformed thing into an Issue.

Accepted without conversion by the user:
  .jsonl  OpenAI chat {"messages", "tools"?, "parallel_tool_calls"?}; legacy {"prompt", "completion"}
          (becomes a user + assistant chat); raw {"text"} for continued pre-training; OpenAI DPO
          {"input": {"messages", "tools"?}, "preferred_output", "non_preferred_output"}.
  .txt    with ###Human: / ###Assistant: markers: one chat per conversation. A ###Human: marker after
          a blank line starts a new conversation; one right after an answer continues it (multi-turn),
          so answers may still contain blank lines. Without markers: raw text, one document per
          blank-line-separated block.
.csv goes through `tuneforge data convert` first (see convert.py): a CSV has no single obvious
mapping to chat, so guessing the columns here would train on the wrong thing silently.

This module checks each record on its own (shape, keys, roles, content, weights); checks across the
whole file (example count, duplicates, token lengths) live in validate.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .example import Example

ROLES = ("system", "user", "assistant", "tool")


def chat_role(role: str) -> str:
    """The role chat templates and this format know for an OpenAI message role: the newer `developer`
    role is the system role."""
    return "system" if role == "developer" else role

MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
# Top-level keys of each JSONL format (OpenAI's); any other key is reported, not silently dropped.
RECORD_KEYS = {
    "chat": ("messages", "tools", "parallel_tool_calls"),
    "preference": ("input", "preferred_output", "non_preferred_output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")  # a preference pair's input (a chat record's own)
SUPPORTED_SUFFIXES = (".jsonl", ".txt")
# `###Human:` / `###Assistant:` starting a line, in any case and with the spacing hand-edited files
# have ("### human :", an indented marker): missed, the whole file would train as raw text, silently
MARKER = re.compile(r"^[ \t]*###[ \t]*(Human|Assistant)[ \t]*:[ \t]?(.*)$", re.IGNORECASE)
# an answer's marker after the question on the same line: "###Human: q ###Assistant: a"
INLINE_ANSWER = re.compile(r"[ \t]+(?=###[ \t]*Assistant[ \t]*:)", re.IGNORECASE)
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Issue:
    """One problem found in a training file. Re-exported by validate.py, which lists the codes."""

    code: str
    message: str
    line: int | None = None  # 1-based; None for problems with the whole file
    field: str | None = None  # e.g. "messages[1].role"
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = [f"line {self.line}"] if self.line is not None else []
        where += [f"field {self.field}"] if self.field else []
        prefix = ", ".join(where)
        return f"{prefix}: {self.code}: {self.message}" if prefix else f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Parsed:
    format: str  # chat | prompt_completion | text | preference | instruction_txt | raw_txt | <suffix>
    examples: list[Example]  # only records that parsed without errors
    issues: list[Issue]
    n_records: int = 0  # records in the file, good or bad: what the user counts as examples


def parse_file(path: str | Path) -> Parsed:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        return Parsed(suffix.lstrip(".") or "unknown", [], [_unsupported(path, suffix)])
    data = path.read_bytes()
    if _utf16(data):  # said once: each line decoded as UTF-8 would be an invalid_json of its own
        msg = "the file is UTF-16 text (Windows' \"Unicode\"), not UTF-8; save it as UTF-8"
        return Parsed(suffix.lstrip("."), [], [Issue("invalid_encoding", msg)])
    lines, encoding_issues = _decode_lines(data)
    if not any(text.strip() for text in lines):
        return Parsed(suffix.lstrip("."), [], encoding_issues + [Issue("empty_file", f"{path.name} has no examples")])
    if suffix == ".jsonl":
        parsed = _parse_jsonl(lines, skip={i.line for i in encoding_issues})
    else:  # .txt: a replaced character does not change the structure, so parse on and report both
        parsed = _parse_txt(lines)
    parsed.issues[:0] = encoding_issues
    return parsed


def _unsupported(path: Path, suffix: str) -> Issue:
    if suffix == ".csv":
        cmd = f"tuneforge data convert {path.name} -o {path.stem}.jsonl --prompt-col ... --completion-col ..."
        hint = f"convert it first: {cmd}"
    else:
        hint = "use .jsonl (one JSON object per line) or .txt"
    what = f"a {suffix} file" if suffix else "a file without an extension"
    return Issue("unsupported_format", f"{what} is not a training format; {hint}")


def _utf16(data: bytes) -> bool:
    """UTF-16: its byte-order mark, or the NUL byte beside the first character (ASCII in UTF-16
    without a mark); UTF-8 text has no NUL bytes."""
    return data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:2]


def _decode_lines(data: bytes) -> tuple[list[str], list[Issue]]:
    """Lines decoded one by one, so a bad byte is reported at its own line, not as a whole-file failure."""
    lines, issues = [], []
    for n, raw in enumerate(data.removeprefix(UTF8_BOM).split(b"\n"), 1):
        raw = raw.removesuffix(b"\r")
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            msg = f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save the file as UTF-8"
            issues.append(Issue("invalid_encoding", msg, n))
            lines.append(raw.decode("utf-8", "replace"))
    return lines, issues


# --- JSONL ----------------------------------------------------------------------------------------


def _parse_jsonl(lines: list[str], skip: set[int | None]) -> Parsed:
    examples, formats, issues, n_records = [], [], [], 0
    unread: dict[tuple[str, str], list[int]] = {}  # (format, key) -> lines with a key no format reads
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue  # blank lines (a trailing newline, spacing) are not records
        n_records += 1
        if n in skip:
            continue
        fmt, example, found, extra = parse_record(text, n)
        if example is not None and examples and example.kind != examples[0].kind:
            msg = f"a {fmt} example, but line {examples[0].line} is {formats[0]}; one file holds one kind"
            found.append(Issue("data_type", msg, n))
        for key in extra:
            unread.setdefault((fmt, key), []).append(n)
        issues += found
        if example is not None and not found:
            examples.append(example)
            formats.append(fmt)
    if n_records and not examples and (whole := _whole_json(lines, n_records)):
        return Parsed("json", [], [whole[0]], whole[1])
    issues += [_unread_key(fmt, key, where) for (fmt, key), where in unread.items()]
    fmt = "+".join(dict.fromkeys(formats)) or "jsonl"
    return Parsed(fmt, examples, issues, n_records)


# Keys that change what an example teaches: dropped, the file would train something else than meant.
MEANT_KEYS = {
    "label": "a labelled example is a chat whose answer is the label: convert labelled rows with "
             "`tuneforge data convert FILE.csv -o FILE.jsonl --text-col ... --label-col ...`",
    "weight": "weight goes on an assistant message of a chat example (messages[i].weight)",
    "functions": 'OpenAI\'s deprecated functions: write them as tools, [{"type": "function", "function": {...}}]',
}


def _unread_key(fmt: str, key: str, where: list[int]) -> Issue:
    """A key no format reads, on the lines `where`: an error where ignoring it changes what is trained
    (MEANT_KEYS), otherwise a warning - extra bookkeeping keys ("id", "source") are common and harmless,
    but a misspelt "tools" is not, so it is said once, not dropped silently."""
    lines = ", ".join(map(str, where[:5])) + (", ..." if len(where) > 5 else "")
    read = ", ".join(RECORD_KEYS[fmt])
    if key in MEANT_KEYS:
        msg = f"{key!r} is not read in {fmt} examples (line {lines}); {MEANT_KEYS[key]}"
        return Issue("unrecognized_key", msg, where[0], key)
    msg = f"{key!r} on {len(where)} line(s) ({lines}) is ignored: {fmt} examples read only {read}"
    return Issue("unrecognized_key", msg, where[0], key, severity="warning")


def _whole_json(lines: list[str], n_records: int) -> tuple[Issue, int] | None:
    """A whole-file mistake behind a file that has no good line: one JSON array or pretty-printed
    object spread over many lines is not JSONL - said once, not as an invalid line per line. (A
    one-line file that is a single bad example keeps its own line's errors.) With it, the records the
    file holds: an array's items, not a pretty-printed array's lines."""
    try:
        value = json.loads("\n".join(lines))
    except ValueError:
        return None
    if n_records == 1 and not isinstance(value, list):
        return None
    what = "one JSON array" if isinstance(value, list) else "one JSON value spread over several lines"
    hint = " (e.g. `jq -c '.[]' FILE > FILE.jsonl`)" if isinstance(value, list) else ""
    issue = Issue("invalid_json", f"the file holds {what}, not JSON Lines: write one example per line{hint}")
    return issue, len(value) if isinstance(value, list) else 1


def parse_record(text: str, line: int) -> tuple[str | None, Example | None, list[Issue], list[str]]:
    """One JSONL line -> (format name, Example or None when it cannot be built, issues, the keys
    that format does not read)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        msg = err.msg.removesuffix(" at")  # some of json's end in "at" ("Unterminated string starting at")
        return None, None, [Issue("invalid_json", f"not valid JSON: {msg} at column {err.colno}", line)], []
    except (ValueError, RecursionError) as err:  # huge integers, absurdly deep nesting
        return None, None, [Issue("invalid_json", f"not valid JSON: {err}", line)], []
    if not isinstance(obj, dict):
        return None, None, [Issue("data_type", f"each line must be a JSON object, not {_type(obj)}", line)], []
    if "chosen" in obj or "rejected" in obj:  # (read as prompt/completion, it was "no completion" and two warnings)
        msg = ('chosen/rejected is TRL\'s preference shape; write OpenAI\'s: {"input": {"messages": [...]}, '
               '"preferred_output": [{"role": "assistant", ...}], "non_preferred_output": [...]} (a table converts '
               "with tuneforge data convert --prompt-col --chosen-col --rejected-col)")
        return None, None, [Issue("unsupported_format", msg, line, "chosen" if "chosen" in obj else "rejected")], []
    if "messages" in obj:
        fmt, parse = "chat", _parse_chat
    elif any(k in obj for k in ("input", "preferred_output", "non_preferred_output")):
        fmt, parse = "preference", _parse_preference
    elif "prompt" in obj or "completion" in obj:
        fmt, parse = "prompt_completion", _parse_prompt_completion
    elif "text" in obj:
        fmt, parse = "text", _parse_text
    else:
        msg = (
            "no messages list; expected {messages}, {prompt, completion}, {text} or "
            f"{{input, preferred_output, non_preferred_output}}, found keys: {', '.join(obj) or 'none'}"
        )
        return None, None, [Issue("missing_messages_list", msg, line, "messages")], []
    return fmt, *parse(obj, line), [k for k in obj if k not in RECORD_KEYS[fmt]]


def _parse_chat(obj: dict, line: int) -> tuple[Example, list[Issue]]:
    issues = _check_tools(obj.get("tools"), line, "tools")
    if "parallel_tool_calls" in obj and not isinstance(obj["parallel_tool_calls"], bool):
        issues.append(Issue("data_type", "parallel_tool_calls must be true or false", line, "parallel_tool_calls"))
    issues += _check_messages(obj["messages"], line, "messages")
    if not issues and not any(m.get("role") == "assistant" for m in obj["messages"]):
        msg = "no assistant message: there is nothing to learn from this example"
        issues.append(Issue("example_missing_assistant_message", msg, line, "messages"))
    elif not issues and obj["messages"][0]["role"] == "assistant":
        issues.append(_starts_with_answer(line, "messages[0].role"))
    return Example("chat", obj["messages"], obj.get("tools"), line=line), issues


def _starts_with_answer(line: int, field: str) -> Issue:
    # An answer is learned as what follows its prompt; the first message has none (no template renders it).
    msg = "the conversation starts with an assistant message; put a system or user message before the first answer"
    return Issue("data_type", msg, line, field)


def _parse_preference(obj: dict, line: int) -> tuple[Example, list[Issue]]:
    prompt = obj.get("input", {})
    if not isinstance(prompt, dict):
        return Example("preference", line=line), [Issue("data_type", "input must be an object", line, "input")]
    issues = _check_tools(prompt.get("tools"), line, "input.tools")
    issues += [Issue("unrecognized_key", f"unrecognized key {k!r} in input; it holds {', '.join(INPUT_KEYS)}",
                     line, f"input.{k}") for k in prompt if k not in INPUT_KEYS]  # (a misspelt tools: none offered)
    issues += _check_messages(prompt.get("messages"), line, "input.messages")
    for key in ("preferred_output", "non_preferred_output"):
        if not obj.get(key):
            msg = f"{key} must be a non-empty list of assistant messages"
            issues.append(Issue("example_missing_assistant_message", msg, line, key))
        else:
            issues += _check_messages(obj[key], line, key, roles=("assistant",))
            issues += [Issue("invalid_weight", "weight is not used in preference answers: each answer is "
                             "learned whole", line, f"{key}[{i}].weight")
                       for i, m in enumerate(obj[key]) if isinstance(m, dict) and "weight" in m]
    example = Example(
        "preference", prompt.get("messages") or [], prompt.get("tools"),
        chosen=obj.get("preferred_output"), rejected=obj.get("non_preferred_output"), line=line,
    )
    return example, issues


def _parse_prompt_completion(obj: dict, line: int) -> tuple[Example, list[Issue]]:
    issues = []
    for key in ("prompt", "completion"):
        if key not in obj:
            issues.append(Issue("message_missing_key", f"prompt/completion examples need both; no {key}", line, key))
        else:
            issues += _check_text(obj[key], line, key)
    messages = [
        {"role": "user", "content": obj.get("prompt")},
        {"role": "assistant", "content": obj.get("completion")},
    ]
    return Example("chat", messages, line=line), issues


def _parse_text(obj: dict, line: int) -> tuple[Example, list[Issue]]:
    return Example("text", text=obj["text"], line=line), _check_text(obj["text"], line, "text")


def _check_text(value: Any, line: int, path: str) -> list[Issue]:
    if not isinstance(value, str):
        return [Issue("data_type", f"{path} must be a string, not {_type(value)}", line, path)]
    if not value.strip():
        return [Issue("missing_content", f"{path} is empty", line, path)]
    return _check_unicode(value, line, path)


def _check_unicode(text: str, line: int, path: str) -> list[Issue]:
    """JSON may escape half of a surrogate pair ("\\ud83d" alone): no tokenizer can read that."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        msg = f"not valid Unicode text: a lone surrogate \\u{ord(text[err.start]):04x} at character {err.start + 1}"
        return [Issue("invalid_encoding", msg, line, path)]
    return []


def _check_tools(tools: Any, line: int, path: str) -> list[Issue]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [Issue("data_type", f"tools must be a list, not {_type(tools)}", line, path)]
    issues = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict):
            issues.append(Issue("data_type", "each tool must be an object", line, f"{path}[{i}]"))
        elif tool.get("type", "function") != "function":
            issues.append(Issue("data_type", "only function tools are supported", line, f"{path}[{i}].type"))
        elif not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            issues.append(Issue("data_type", "a tool needs function.name", line, f"{path}[{i}].function.name"))
    return issues


def _check_tool_calls(calls: Any, line: int, path: str) -> list[Issue]:
    """Each call as OpenAI writes it: {"id"?, "type": "function", "function": {"name", "arguments"}},
    arguments a JSON string. The calls are what the assistant turn teaches, so a malformed one would
    teach the model to write it."""
    if not isinstance(calls, list):
        return [Issue("data_type", "tool_calls must be a list", line, path)]
    issues = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            issues.append(Issue("data_type", 'a tool call must be {"type": "function", "function": {"name", '
                                '"arguments"}}', line, f"{path}[{i}].function"))
        elif not (isinstance(fn.get("name"), str) and fn["name"]):
            issues.append(Issue("data_type", "a tool call needs function.name", line, f"{path}[{i}].function.name"))
        elif not isinstance(fn.get("arguments"), str):
            issues.append(Issue("data_type", "function.arguments must be a string (JSON text, as OpenAI sends it)",
                                line, f"{path}[{i}].function.arguments"))
    return issues


def _check_messages(messages: Any, line: int, path: str, roles: tuple[str, ...] = ROLES) -> list[Issue]:
    if messages is None or messages == []:
        return [Issue("missing_messages_list", f"{path} is missing or empty", line, path)]
    if not isinstance(messages, list):
        return [Issue("data_type", f"{path} must be a list of messages, not {_type(messages)}", line, path)]
    return [issue for i, m in enumerate(messages) for issue in check_message(m, line, f"{path}[{i}]", roles)]


def check_message(msg: Any, line: int, path: str, roles: tuple[str, ...] = ROLES) -> list[Issue]:
    """Issues with one OpenAI-style message dict; `path` names it in the file, e.g. messages[2]."""
    if not isinstance(msg, dict):
        return [Issue("data_type", f"a message must be an object, not {_type(msg)}", line, path)]
    allowed = ", ".join(MESSAGE_KEYS)
    issues = [
        Issue("message_unrecognized_key", f"unrecognized key {k!r}; allowed: {allowed}", line, f"{path}.{k}")
        for k in msg
        if k not in MESSAGE_KEYS and k != "function_call"
    ]
    if "function_call" in msg:
        hint = ('OpenAI\'s deprecated function_call; write it as tool_calls: [{"type": "function", '
                '"function": {"name": ..., "arguments": ...}}]')
        issues.append(Issue("message_unrecognized_key", hint, line, f"{path}.function_call"))
    if "role" not in msg:
        issues.append(Issue("message_missing_key", "message has no role", line, f"{path}.role"))
    elif not isinstance(msg["role"], str) or msg["role"] not in roles:
        msg_text = f"role {msg['role']!r} is not one of {', '.join(roles)}"
        issues.append(Issue("unrecognized_role", msg_text, line, f"{path}.role"))
    issues += _check_content(msg, line, path)
    issues += _check_weight(msg, line, path)
    if msg.get("tool_calls") is not None:
        issues += _check_tool_calls(msg["tool_calls"], line, f"{path}.tool_calls")
    if "name" in msg and not isinstance(msg["name"], str):
        issues.append(Issue("data_type", "name must be a string", line, f"{path}.name"))
    return issues


def _check_content(msg: dict, line: int, path: str) -> list[Issue]:
    # An assistant turn that only calls tools legitimately has no content (null or absent).
    calls = bool(msg.get("tool_calls")) or bool(msg.get("function_call"))
    if "content" not in msg:
        return [] if calls else [Issue("message_missing_key", "message has no content", line, f"{path}.content")]
    content = msg["content"]
    if isinstance(content, list):
        bad = [i for i, p in enumerate(content) if not _is_text_part(p)]
        if bad:
            msg_text = 'content parts must be {"type": "text", "text": "..."} (text models read text only)'
            return [Issue("data_type", msg_text, line, f"{path}.content[{i}]") for i in bad]
        content = "".join(p["text"] for p in content)
    elif content is not None and not isinstance(content, str):
        return [Issue("data_type", f"content must be a string, not {_type(content)}", line, f"{path}.content")]
    if not calls and not (content or "").strip():
        return [Issue("missing_content", "message content is empty", line, f"{path}.content")]
    return _check_unicode(content or "", line, f"{path}.content")


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _check_weight(msg: dict, line: int, path: str) -> list[Issue]:
    if "weight" not in msg:
        return []
    weight = msg["weight"]
    if msg.get("role") != "assistant":
        return [Issue("invalid_weight", "weight is only allowed on assistant messages", line, f"{path}.weight")]
    if type(weight) is not int or weight not in (0, 1):  # not isinstance: true/1.0 would slip through
        return [Issue("invalid_weight", f"weight must be 0 or 1, not {weight!r}", line, f"{path}.weight")]
    return []


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


# --- TXT ------------------------------------------------------------------------------------------


def _parse_txt(lines: list[str]) -> Parsed:
    if any(MARKER.match(text) for text in lines):
        return _parse_instruction_txt(lines)
    docs = _blocks(lines)
    examples = [Example("text", text="\n".join(doc), line=start) for start, doc in docs]
    return Parsed("raw_txt", examples, [], len(examples))


def _blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """Blank-line-separated blocks as (first line number, lines)."""
    blocks: list[tuple[int, list[str]]] = []
    previous_blank = True
    for n, text in enumerate(lines, 1):
        if text.strip():
            if previous_blank:
                blocks.append((n, []))
            blocks[-1][1].append(text)
        previous_blank = not text.strip()
    return blocks


def _parse_instruction_txt(lines: list[str]) -> Parsed:
    conversations, issues = _split_conversations(lines)
    examples = []
    for turns in conversations:
        example, found = _conversation_example(turns)
        issues += found
        if not found:
            examples.append(example)
    return Parsed("instruction_txt", examples, issues, len(conversations))


Turn = tuple[str, int, list[str]]  # (role, line of its marker, content lines)


def _split_conversations(lines: list[str]) -> tuple[list[list[Turn]], list[Issue]]:
    conversations: list[list[Turn]] = []
    issues: list[Issue] = []
    previous_blank = True
    for n, line in enumerate(lines, 1):
        # "###Human: q ###Assistant: a" on one line is a question and its answer
        for text in INLINE_ANSWER.split(line, maxsplit=1) if MARKER.match(line) else [line]:
            marker = MARKER.match(text)
            if marker:
                role = "user" if marker.group(1).lower() == "human" else "assistant"
                if not conversations or (role == "user" and previous_blank):
                    conversations.append([])
                conversations[-1].append((role, n, [marker.group(2)]))
            elif conversations:
                conversations[-1][-1][2].append(text)
            elif text.strip() and not issues:
                msg = "text before the first ###Human: marker; every turn must start with ###Human: or ###Assistant:"
                issues.append(Issue("data_type", msg, n))
            previous_blank = not text.strip()
    return conversations, issues


def _conversation_example(turns: list[Turn]) -> tuple[Example, list[Issue]]:
    messages, issues = [], []
    for role, n, content in turns:
        text = "\n".join(content).strip()
        if not text:
            marker = "###Human" if role == "user" else "###Assistant"
            issues.append(Issue("missing_content", "turn is empty", n, marker))
        messages.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        msg = "conversation has no ###Assistant: turn"
        issues.append(Issue("example_missing_assistant_message", msg, turns[0][1], "###Assistant"))
    elif messages[0]["role"] == "assistant":
        issues.append(_starts_with_answer(turns[0][1], "###Assistant"))
    return Example("chat", messages, line=turns[0][1]), issues
