"""Slug names: one short, readable, filesystem-safe directory name per model choice.

The slug names the (source, revision, quant) triple. The operator computes it to
report `status.slug` and the pod computes it to find its slug directory, so it
must be a pure function of the user's input (no filesystem, no network, no torch)
and stable across versions. A short hash of the normalized triple keeps two
different choices apart even when their readable parts collide or are truncated.
The result is also a valid Kubernetes label value (at most 63 characters,
alphanumeric at both ends), so it can label the objects that use it.
"""

from __future__ import annotations

import hashlib
import json
import re

from modeldeploy.server.sources import Source, effective_revision

#: Kubernetes label values are limited to 63 characters; slugs fit in one.
MAX_SLUG_LENGTH = 63
_HASH_CHARS = 8
_SEP = "--"
_UNSAFE = re.compile(r"[^a-z0-9._]+")


def _clean(text: str) -> str:
    """Lower-case, runs of anything but [a-z0-9._] become one '-', no leading/trailing junk."""
    return _UNSAFE.sub("-", text.lower()).strip("-._")


def _readable_parts(source: Source, revision: str | None, quant: str | None) -> list[str]:
    if source.scheme == "hf":
        assert source.repo_id is not None
        org, repo = source.repo_id.split("/")
        parts = [org, repo, revision or ""]
    elif source.scheme == "file":
        assert source.path is not None
        tail = [p for p in source.path.split("/") if p][-2:]
        parts = tail or ["root"]
    else:
        assert source.claim is not None
        parts = [source.claim, *[p for p in (source.path or "").split("/") if p][-1:]]
    if quant:
        parts.append(quant)
    return [c for c in (_clean(p) for p in parts) if c]


def slug_key(source: Source, revision: str | None, quant: str | None) -> str:
    """The normalized triple the slug hashes (JSON, so no separator can be smuggled in)."""
    rev = effective_revision(source, revision)
    return json.dumps(
        [
            source.canonical.lower() if source.scheme == "hf" else source.canonical,
            rev,
            quant and quant.lower(),
        ],
        separators=(",", ":"),
    )


def slug_for(source: Source, revision: str | None = None, quant: str | None = None) -> str:
    """The slug for a parsed source; `revision` overrides the source's @REV (hf:// only).

    Example: `hf://Qwen/Qwen2.5-0.5B-Instruct` -> `qwen--qwen2.5-0.5b-instruct--main--<hash8>`.
    """
    rev = effective_revision(source, revision)
    digest = hashlib.sha256(slug_key(source, revision, quant).encode()).hexdigest()[:_HASH_CHARS]
    readable = _SEP.join(_readable_parts(source, rev, quant))
    budget = MAX_SLUG_LENGTH - len(_SEP) - _HASH_CHARS
    if len(readable) > budget:
        readable = readable[:budget].rstrip("-._")
    return f"{readable}{_SEP}{digest}" if readable else digest
