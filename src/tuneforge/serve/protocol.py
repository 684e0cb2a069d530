"""Request and response shapes of every endpoint, field for field as OpenAI's API reference and the
`openai` SDK's types (openai/types/file_object.py, fine_tuning/*.py, chat/*.py, completion.py).

Declaring them as pydantic models gives request validation (a wrong type is a 400 with the field
named) and a faithful /openapi.json. Range checks that OpenAI answers with 400 live in the handlers.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

Auto = Literal["auto"]
T = TypeVar("T")


class CursorPage(BaseModel, Generic[T]):
    """One page of an OpenAI list with cursor pagination (`after`): the ids of its first and last item."""

    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, items, has_more: bool):
        items = list(items)
        return cls(data=items, first_id=items[0].id if items else None, last_id=items[-1].id if items else None,
                   has_more=has_more)

# --- files ------------------------------------------------------------------------------------------

FilePurpose = Literal["assistants", "assistants_output", "batch", "batch_output", "fine-tune",
                      "fine-tune-results", "vision", "user_data"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


FileList = CursorPage[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Request(BaseModel):
    """A request body. A field it does not declare is an error that names it (400, code
    unknown_parameter, as OpenAI answers), never silently dropped: a parameter this server does not
    act on must not look as if it had been obeyed. OpenAI's parameters that it does not implement
    are declared, and refused by name where ignoring them would change the answer."""

    model_config = ConfigDict(extra="forbid")


# --- fine-tuning ------------------------------------------------------------------------------------


# Strict, as OpenAI is: JSON's true is not 1 epoch, "3" is not a number and "true" is not a boolean
# (pydantic's lax mode would take all three). An integer is a number: temperature 1 is fine.
Count = StrictInt
Number = StrictFloat | StrictInt
Flag = StrictBool


class Hyperparameters(Request):
    batch_size: Auto | Count | None = None
    learning_rate_multiplier: Auto | Number | None = None
    n_epochs: Auto | Count | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Auto | Number | None = None


class SupervisedMethod(Request):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(Request):
    hyperparameters: DpoHyperparameters | None = None


class Method(Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(Request):
    model: str
    training_file: str
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    validation_file: str | None = None
    seed: StrictInt | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: Method | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool = False


class CheckpointMetrics(BaseModel):
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


CheckpointList = CursorPage[Checkpoint]


# --- models -----------------------------------------------------------------------------------------


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# --- chat and completions ---------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. assistant `refusal`, `audio`: kept, not used

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(Request):
    include_usage: Flag | None = None
    include_obfuscation: Flag | None = None  # padding against length side channels; nothing to pad here


class SamplingParams(Request):
    model: str
    max_tokens: Count | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: Count | None = None
    stop: str | list[str] | None = None
    seed: Count | None = None
    stream: Flag | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    logprobs: Flag | Count | None = None
    user: str | None = None
    # OpenAI's routing and caching hints: nothing here to route or cache by, and no effect on the answer
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatRequest(SamplingParams):
    messages: list[ChatMessage]
    max_completion_tokens: Count | None = None
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: Flag | None = None  # false: one tool call at most per answer (chat._answer_calls)
    top_logprobs: Count | None = None
    metadata: dict[str, str] | None = None
    store: Flag | None = None  # keep the completion (stored completions: list, label, turn into training data)
    # refused unless they ask for what happens anyway (chat.refuse_unsupported)
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[Count] | list[list[Count]]  # text(s), or token ids (OpenAI takes both)
    echo: Flag | None = None
    suffix: str | None = None
    best_of: Count | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # the answer as calls of the request's tools (chat.tool_calls_in)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class StoredCompletion(ChatCompletion):
    """A completion kept with `store: true`, as OpenAI's stored-completions endpoints return it (their
    examples: the chat completion with `metadata`, and the request's `tools` and `tool_choice`, null
    when it gave none). The tools are what the model was shown: a training example made from the
    completion needs them (monitor.stored)."""

    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


StoredCompletionList = CursorPage[StoredCompletion]


class StoredMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # whatever else the request's message carried

    id: str
    role: str
    content: str | list[dict[str, Any]] | None = None


StoredMessageList = CursorPage[StoredMessage]


class StoredCompletionUpdate(Request):
    metadata: dict[str, str] | None


class StoredCompletionDeleted(BaseModel):
    id: str
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    deleted: bool = True


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: dict[str, Any] | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- responses (openai/types/responses/*.py) -------------------------------------------------------


class ResponseRequest(Request):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: Count | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stream: Flag | None = None
    store: Flag | None = None  # OpenAI keeps responses unless told not to
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    background: Flag | None = None
    include: list[str] | None = None
    top_logprobs: Count | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    stream_options: StreamOptions | None = None
    parallel_tool_calls: Flag | None = None  # no tools here: nothing to call in parallel
    max_tool_calls: Count | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None  # with include=["message.output_text.logprobs"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str = "auto"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    store: bool = True
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputItem(BaseModel):
    """A message of a response's input, as `GET /v1/responses/{id}/input_items` lists it."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    status: Literal["completed"] = "completed"
    content: list[dict[str, Any]]


InputItemList = CursorPage[InputItem]
