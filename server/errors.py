"""The error types every layer raises, so each front end maps them one way.

The CLI turns a `UserInputError` into exit code 2 with one line on stderr, and the
HTTP layer turns it into a 4xx in the OpenAI error shape; anything else is a
failure of ours (exit 1, HTTP 5xx). Keeping the split in one place is what lets us
promise "never a traceback or a 500 for user input".
"""

from __future__ import annotations


class ModeldeployError(Exception):
    """Base of every error modeldeploy raises on purpose."""


class UserInputError(ModeldeployError):
    """The input (a source, a file, a flag, a request) is wrong; the message says why.

    Messages name the thing (path, field, source) and the reason in one line.
    """


class SourceError(UserInputError):
    """A model source cannot be parsed, found or fetched."""


class FormatError(UserInputError):
    """A model file is of an unknown or unsupported format, or is corrupt/hostile."""


class UnsupportedArchitectureError(FormatError):
    """The model's architecture is not one the engine implements."""
