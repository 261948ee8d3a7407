"""Engine logprob entries -> OpenAI logprobs, in the chat and the legacy completions layout.

The engine reports, per generated token, `{"token", "token_id", "logprob", "bytes",
"top_logprobs": [...]}` (the model's raw distribution). Chat clients get exactly
OpenAI's `content[]` entries (token text, logprob, UTF-8 bytes so split characters
can be rebuilt, alternatives); legacy completions get parallel lists with
`text_offset` into the returned text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: OpenAI reports impossible tokens as -9999.0; JSON has no -inf.
FLOOR = -9999.0


def _finite(value: Any) -> float:
    if value is None or value != value or float(value) < FLOOR:
        return FLOOR
    return float(value)


def _entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    token = str(raw.get("token", ""))
    return {
        "token": token,
        "logprob": _finite(raw.get("logprob")),
        "bytes": list(raw.get("bytes") or token.encode("utf-8")),
    }


def chat_logprobs(entries: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`."""
    content = []
    for raw in entries or ():
        item = _entry(raw)
        item["top_logprobs"] = [_entry(top) for top in raw.get("top_logprobs") or ()]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    entries: Iterable[Mapping[str, Any]] | None, text_offset: int
) -> dict[str, Any]:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` (parallel lists)."""
    out: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = text_offset
    for raw in entries or ():
        token = str(raw.get("token", ""))
        out["tokens"].append(token)
        out["token_logprobs"].append(_finite(raw.get("logprob")))
        tops = {
            str(t.get("token", "")): _finite(t.get("logprob"))
            for t in raw.get("top_logprobs") or ()
        }
        out["top_logprobs"].append(tops or None)
        out["text_offset"].append(offset)
        offset += len(token)
    return out
