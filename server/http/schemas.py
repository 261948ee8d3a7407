"""Request and response bodies: OpenAI's shapes, llama.cpp's /tokenize, the seed's /predict.

These pydantic models are both the validation (a bad field is a 400 naming it)
and the published `/openapi.json` that clients and the fuzzing tests read, so the
bounds here are the API's documented bounds. Unknown request fields are ignored,
as OpenAI-compatible servers do, because SDKs add new fields faster than servers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

#: Largest `n`-like fan-out and list lengths we accept; bigger is a 400, not an OOM.
MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
#: Tokens /predict generates when the request does not say.
PREDICT_MAX_TOKENS = 128


def _integral(value: Any) -> Any:
    """JSON Schema's `integer` includes 2.0; strict pydantic would refuse it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(ge: int | None = None, le: int | None = None) -> Any:
    """An integer as JSON Schema means it (3 and 3.0, never true or "3"), with bounds.

    The bounds sit inside the annotation, before the validator, so /openapi.json shows
    them as `minimum`/`maximum`.
    """
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


Count = _int(ge=1)
OnlyOne = _int(ge=1, le=1)
TopK = _int(ge=-1)
#: +-(2**53 - 1): exactly representable as a JSON number in every client and validator.
Seed = _int(ge=-(2**53 - 1), le=2**53 - 1)
ChatTopLogprobs = _int(ge=0, le=MAX_TOP_LOGPROBS_CHAT)
LogprobCount = _int(ge=0, le=MAX_LOGPROBS_COMPLETION)
#: A token id; the upper bound (the vocabulary) is added to /openapi.json once loaded.
TokenId = _int(ge=0)
#: A non-empty prompt text.
Text = Annotated[str, Field(min_length=1)]
#: A non-empty list of token ids.
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
#: A stop sequence (never empty: an empty one would stop before the first token).
StopText = Annotated[str, Field(min_length=1)]


class _Request(BaseModel):
    # strict: JSON `true` is not the integer 1 and "5" is not a number, as the schema says
    model_config = ConfigDict(extra="ignore", strict=True)


class SamplingFields(_Request):
    """Sampling fields shared by chat and text completions (OpenAI plus common extensions)."""

    model: str | None = Field(None, description="served model name; omitted means the one served")
    max_tokens: Count | None = Field(None, description="most tokens to generate")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: TopK | None = Field(None, description="0 or -1 disables")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description="a stop string or up to 16 of them"
    )
    n: OnlyOne = Field(1, description="only 1 choice per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        return [value] if isinstance(value, str) else value


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    """A content part; only text exists for the text-only models this server runs."""

    type: Literal["text"] = Field(..., description="only text parts are supported")
    text: str


class ChatMessage(_Request):
    """One chat turn: content as a string or as text parts (joined)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: `content` always a string, no None fields."""
        out = self.model_dump(exclude_none=True)
        out["content"] = self.text
        return out


class ResponseFormat(_Request):
    type: Literal["text"] = Field("text", description="only plain text output is supported")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: ChatTopLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: Text | TokenIds = Field(..., description="text, or token ids")
    logprobs: LogprobCount | None = None
    echo: bool = False
    best_of: OnlyOne | None = None


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
    tokens: list[TokenId]


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
    max_tokens: Count | None = Field(
        None, description=f"default {PREDICT_MAX_TOKENS}, at most the context length"
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop: list[StopText] | None = Field(None, max_length=MAX_STOP_SEQUENCES)


class PredictRequest(_PredictParams):
    input: Text | TokenIds = Field(..., description="prompt text, or token ids")


class PredictBatchRequest(_PredictParams):
    inputs: list[Text | TokenIds] = Field(..., min_length=1)


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
