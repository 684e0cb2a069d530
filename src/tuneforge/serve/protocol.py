"""Request and response shapes of every endpoint, field for field as OpenAI's API reference and the
`openai` SDK's types (openai/types/file_object.py, fine_tuning/*.py, chat/*.py, completion.py).

Declaring them as pydantic models gives request validation (a wrong type is a 422 with the field
named) and a faithful /openapi.json. Range checks that OpenAI answers with 400 live in the handlers.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]

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
    expires_at: Optional[int] = None
    status_details: Optional[str] = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- fine-tuning ------------------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    batch_size: Union[Auto, int, None] = None
    learning_rate_multiplier: Union[Auto, float, None] = None
    n_epochs: Union[Auto, int, None] = None


class DpoHyperparameters(Hyperparameters):
    beta: Union[Auto, float, None] = None


class SupervisedMethod(BaseModel):
    hyperparameters: Optional[Hyperparameters] = None


class DpoMethod(BaseModel):
    hyperparameters: Optional[DpoHyperparameters] = None


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Optional[SupervisedMethod] = None
    dpo: Optional[DpoMethod] = None
    reinforcement: Optional[dict[str, Any]] = None


class JobCreate(BaseModel):
    model: str
    training_file: str
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    suffix: Optional[str] = None
    validation_file: Optional[str] = None
    seed: Optional[int] = None
    metadata: Optional[dict[str, str]] = None
    integrations: Optional[list[dict[str, Any]]] = None


class JobError(BaseModel):
    code: str
    message: str
    param: Optional[str] = None


JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: Optional[JobError] = None
    fine_tuned_model: Optional[str] = None
    finished_at: Optional[int] = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: Optional[int] = None
    training_file: str
    validation_file: Optional[str] = None
    estimated_finish: Optional[int] = None
    integrations: Optional[list[dict[str, Any]]] = None
    metadata: Optional[dict[str, str]] = None
    method: Optional[Method] = None


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
    data: Optional[dict[str, Any]] = None
    type: Optional[Literal["message", "metrics"]] = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool = False


class CheckpointMetrics(BaseModel):
    full_valid_loss: Optional[float] = None
    full_valid_mean_token_accuracy: Optional[float] = None
    step: Optional[float] = None
    train_loss: Optional[float] = None
    train_mean_token_accuracy: Optional[float] = None
    valid_loss: Optional[float] = None
    valid_mean_token_accuracy: Optional[float] = None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


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
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = None


class SamplingParams(BaseModel):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Union[bool, int, None] = None
    user: Optional[str] = None


class ChatRequest(SamplingParams):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    top_logprobs: Optional[int] = None
    metadata: Optional[dict[str, str]] = None


class CompletionRequest(SamplingParams):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
    logprobs: Optional[dict[str, Any]] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: Optional[dict[str, Any]] = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None
