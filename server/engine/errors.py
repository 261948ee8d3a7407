"""Typed errors of the engine, so the HTTP layer maps each to one status without parsing text.

`UserInputError` subclasses are the caller's fault (HTTP 400); the others are the
server's state (capacity, memory, a broken device) and map to 429/503.
"""

from __future__ import annotations

from modeldeploy.server.errors import ModeldeployError, UserInputError


class PromptTooLongError(UserInputError):
    """The prompt does not fit: longer than --max-prompt-tokens or the context window."""

    def __init__(self, prompt_tokens: int, limit: int, what: str) -> None:
        super().__init__(f"prompt has {prompt_tokens} tokens but the {what} is {limit} tokens")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class ChatTemplateError(UserInputError):
    """The chat template failed to render these messages (named template, reason)."""


class NoChatTemplateError(UserInputError):
    """The model ships no chat template, so chat requests cannot be served (completions can)."""


class InvalidSamplingParamsError(UserInputError):
    """A sampling parameter is out of its range."""


class EngineError(ModeldeployError):
    """A server-side condition that refuses or ends a request (not the caller's fault)."""


class InsufficientMemoryError(EngineError):
    """Not enough free device memory to admit this request now (HTTP 503)."""


class ModelPoisonedError(EngineError):
    """A device step failed; the model state is unknown and must be reloaded (HTTP 503)."""


class EngineOverloadedError(EngineError):
    """Too many requests already wait for a slot (HTTP 429)."""


class EngineClosedError(EngineError):
    """The engine was shut down; no new requests are accepted (HTTP 503)."""
