"""Stored chat completions back into training data: only answers that ended by themselves."""

from __future__ import annotations

from tuneforge.monitor.stored import training_examples, write_jsonl
from tuneforge.serve import stored
from tuneforge.serve.protocol import AssistantMessage, ChatChoice, ChatCompletion, ChatRequest
from tuneforge.store.database import StoredCompletionRow, new_id, session

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def answered(answer: str | None, finish_reason: str, tool_calls: list | None = None) -> ChatCompletion:
    return ChatCompletion(id=new_id("chatcmpl-"), created=0, model="tiny-llama", choices=[
        ChatChoice(index=0, message=AssistantMessage(content=answer, tool_calls=tool_calls), finish_reason=finish_reason)])


def keep(question: str, answer: str | None, finish_reason: str, tool_calls: list | None = None,
         tools: list | None = None) -> None:
    """A completion kept as the server keeps one with `store: true`."""
    req = ChatRequest(model="tiny-llama", messages=[{"role": "user", "content": question}], tools=tools, store=True)
    with session() as s:
        stored.keep(s, "default", req, answered(answer, finish_reason, tool_calls))


def test_a_completion_cut_off_by_max_tokens_is_no_training_example():
    keep("What is 2+2?", "Four.", "stop")
    keep("Tell me a story.", "Once upon a", "length")
    with session() as s:
        examples = training_examples(s)
    assert examples == [{"messages": [{"role": "user", "content": "What is 2+2?"},
                                      {"role": "assistant", "content": "Four."}]}]


def test_an_answer_that_called_a_tool_is_a_training_example_with_its_call_and_the_tools_it_was_given(tmp_path):
    """The request's tools are the example's `tools` (OpenAI's chat fine-tuning format): the file
    validates, and the chat template shows the tools in the prompt the call answers, as the model was
    shown them when it answered. They were dropped: the example taught calling a tool never named."""
    from tuneforge.data.render import IGNORE, render_example
    from tuneforge.data.validate import load_examples
    from tuneforge.models.tiny import tiny_tokenizer

    keep("Weather in Paris?", None, "tool_calls", [CALL], tools=WEATHER)
    with session() as s:
        (example,) = training_examples(s)
    assert example["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert example["tools"] == WEATHER
    path = tmp_path / "stored.jsonl"
    write_jsonl([example], path)
    tokenizer = tiny_tokenizer()  # its template has no place for tools: one that has, as real models' do
    tokenizer.chat_template = "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}" + tokenizer.chat_template
    (loaded,) = load_examples(path, tokenizer, min_examples=1)  # what a job takes; DataError on any error
    rendered = render_example(loaded, tokenizer)
    prompt = tokenizer.decode([t for t, label in zip(rendered.input_ids, rendered.labels) if label == IGNORE])
    assert prompt.startswith("Tools: ") and '"description": "Current weather"' in prompt

    # a row as a server from before kept it (no tools or tool_choice in its JSON: the schema is as it
    # was) is read and exported as having none
    old = answered("Four.", "stop")
    row = StoredCompletionRow(id=old.id, project="default", model=old.model, completion=old.model_dump(),
                              messages=[{"role": "user", "content": "What is 2+2?"}])
    with session() as s:
        s.add(row)
        s.commit()
        assert training_examples(s)[1] == {"messages": [{"role": "user", "content": "What is 2+2?"},
                                                        {"role": "assistant", "content": "Four."}]}
    assert (stored._object(row).tools, stored._object(row).tool_choice) == (None, None)
