"""Request and response bodies: OpenAI's shapes, llama.cpp's /tokenize, the seed's /predict.

These pydantic models are both the validation (a bad field is a 400 naming it)
and the published `/openapi.json` that clients and the fuzzing tests read, so the
bounds here are the API's documented bounds. Unknown request fields are ignored,
as OpenAI-compatible servers do, because SDKs add new fields faster than servers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Largest `n`-like fan-out and list lengths we accept; bigger is a 400, not an OOM.
MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingFields(_Request):
    """Sampling fields shared by chat and text completions (OpenAI plus common extensions)."""

    model: str | None = Field(None, description="served model name; omitted means the one served")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings")
    n: int = Field(1, ge=1, le=1, description="only 1 choice per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class StreamOptions(_Request):
    include_usage: bool = False


class ChatMessage(_Request):
    """One chat turn; content parts other than text are refused (text-only models)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]] | None) -> str | None:
        if value is None or isinstance(value, str):
            return value
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"part {i} has type {kind!r}; only text parts are supported by this model"
                )
            texts.append(part["text"])
        return "".join(texts)

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (no None fields)."""
        return self.model_dump(exclude_none=True)


class ResponseFormat(_Request):
    type: Literal["text"] = Field("text", description="only plain text output is supported")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(..., description="text, or token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS_COMPLETION)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("token list must not be empty")
        return value


# ---- responses ---------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modeldeploy"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error shape every non-2xx answer carries."""

    error: ErrorDetail


# ---- llama.cpp-style tokenizer endpoints ---------------------------------------


class TokenizeRequest(_Request):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(_Request):
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    content: str


class ApplyTemplateRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True


class ApplyTemplateResponse(BaseModel):
    prompt: str


# ---- the seed's /predict API ---------------------------------------------------


class _PredictParams(_Request):
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)


class PredictRequest(_PredictParams):
    input: str | list[int] = Field(..., description="prompt text, or token ids")


class PredictBatchRequest(_PredictParams):
    inputs: list[str | list[int]] = Field(..., min_length=1)


class PredictResponse(BaseModel):
    output: str
    latency_ms: float
    tokens: int


class PredictBatchResponse(BaseModel):
    output: list[str]
    latency_ms: float
    tokens: int


# ---- probes and model info -----------------------------------------------------


class HealthResponse(BaseModel):
    status: str
    model: str
    uptime_secs: float


class ReadyResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    phase_secs: float
    uptime_secs: float
    progress: dict[str, Any] | None = None
    reason: str | None = None


SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
