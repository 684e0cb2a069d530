"""Stored chat completions back into training data: only answers that ended by themselves."""

from __future__ import annotations

import json

from tuneforge.monitor.stored import training_examples
from tuneforge.serve import stored
from tuneforge.serve.protocol import AssistantMessage, ChatChoice, ChatCompletion
from tuneforge.store.database import new_id, session


def keep(question: str, answer: str | None, finish_reason: str, tool_calls: list | None = None) -> None:
    """A completion kept as the server keeps one with `store: true`."""
    done = ChatCompletion(id=new_id("chatcmpl-"), created=0, model="tiny-llama", choices=[
        ChatChoice(index=0, message=AssistantMessage(content=answer, tool_calls=tool_calls), finish_reason=finish_reason)])
    with session() as s:
        stored.keep(s, "default", [{"role": "user", "content": question}], done, None)


def test_a_completion_cut_off_by_max_tokens_is_no_training_example():
    keep("What is 2+2?", "Four.", "stop")
    keep("Tell me a story.", "Once upon a", "length")
    with session() as s:
        examples = training_examples(s)
    assert examples == [{"messages": [{"role": "user", "content": "What is 2+2?"},
                                      {"role": "assistant", "content": "Four."}]}]


def test_an_answer_that_called_a_tool_is_a_training_example_with_its_call(tmp_path):
    from tuneforge.data.validate import validate_file

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    keep("Weather in Paris?", None, "tool_calls", [call])
    with session() as s:
        (example,) = training_examples(s)
    assert example["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    path = tmp_path / "stored.jsonl"
    path.write_text(json.dumps(example) + "\n")
    assert not validate_file(path, min_examples=1).errors  # what `tuneforge data validate` and a job take
