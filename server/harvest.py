"""The harvest: fill `<slug-root>/<slug>/` with symlinks to a model's non-weight files.

Consumers that open a model by directory (our server, `from_pretrained(slug_dir)`)
need config, tokenizer, chat template and every other small sibling file
(`preprocessor_config.json`, `special_tokens_map.json`, ...) in one place, while
the weights stay where the resolve put them. The slug directory holds:

1. typed slots (`config.json`, `tokenizer.json`, `tokenizer_config.json`,
   `generation_config.json`, `chat_template.*`), taken from the first snapshot
   directory that has them and never overwritten by a same-named sibling of a
   later snapshot (a `-GGUF` repo's config beats its base repo's);
2. every other regular top-level file of each snapshot directory except weights
   (`WEIGHT_SUFFIXES`); sub-directories are not walked.

Each entry is a symlink to the canonical (fully resolved) target, which must lie
inside its snapshot directory or the cache root. Regular files in the slug
directory are not ours (the server may write `config.json`/`tokenizer.json` derived
from GGUF metadata when the repo has none): they are left alone unless the model now
ships that file, which then wins. Links are (re)made atomically
(temporary link, then `os.replace`) on every run, so a reused slug directory never
keeps a stale target. The result record is removed first and written last,
atomically: a harvest killed at any point leaves no record (or, before it started
changing anything, the previous valid one), and a re-run completes it. Runs on the
same slug directory are serialized with an advisory lock (replicas sharing a volume
harvest at the same time).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modeldeploy.server.slug import slug_for
from modeldeploy.server.sources import (
    WEIGHT_SUFFIXES,
    Resolved,
    SnapshotDir,
    is_weight_file,
    parse_source,
    resolve,
)

__all__ = [
    "RECORD_NAME",
    "TYPED_SLOTS",
    "WEIGHT_SUFFIXES",
    "HarvestResult",
    "fill_slug_dir",
    "harvest",
    "is_typed_slot",
    "is_weight_file",
    "read_record",
]

log = logging.getLogger("modeldeploy.harvest")

#: Files with a fixed meaning to loaders; the first snapshot that has one owns it.
TYPED_SLOTS: tuple[str, ...] = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
_TYPED_PREFIX = "chat_template."

#: The result record; its presence (and agreement with the links) means "harvested".
RECORD_NAME = ".modeldeploy-harvest.json"
RECORD_VERSION = 1
_LOCK_NAME = ".modeldeploy-harvest.lock"
_TMP_MARK = ".modeldeploy-tmp-"


def is_typed_slot(name: str) -> bool:
    """True for the names loaders look up by name (config, tokenizer, chat template...)."""
    return name in TYPED_SLOTS or (
        name.startswith(_TYPED_PREFIX) and len(name) > len(_TYPED_PREFIX)
    )


def _is_ours(name: str) -> bool:
    return name in (RECORD_NAME, _LOCK_NAME) or name.startswith(_TMP_MARK)


@dataclass
class HarvestResult:
    """What a harvest produced; `to_dict()` is what `modeldeploy harvest` prints.

    `model_path` is what the formats layer opens (the .gguf, the
    *.safetensors.index.json, the single .safetensors, or the model directory).
    `linked_files` maps each slug-directory entry to its canonical target;
    `refused_files` lists entries not linked because they point outside their
    snapshot directory and the cache root.
    """

    slug: str
    slug_dir: str
    source: str
    revision: str | None
    quant: str | None
    snapshot_dirs: list[str]
    weight_files: list[str]
    model_path: str
    linked_files: dict[str, str]
    typed_slots: list[str]
    refused_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HarvestResult:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------
# Planning: which name links to which canonical target


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _plan(snapshots: Sequence[SnapshotDir]) -> tuple[dict[str, str], list[str], list[str]]:
    """Decide the slug directory's entries: (name -> canonical target, typed slots, refused).

    Typed slots are decided before any plain sibling, in snapshot order, so no
    sibling (same-named file of another snapshot) can take a typed slot's place.
    """
    candidates: list[list[tuple[str, str]]] = []  # per snapshot: (name, entry path)
    refused: list[str] = []
    for snap in snapshots:
        entries: list[tuple[str, str]] = []
        try:
            scan = sorted(os.scandir(snap.path), key=lambda e: e.name)
        except FileNotFoundError:
            log.info(
                "snapshot directory missing; nothing to harvest", extra={"dir": str(snap.path)}
            )
            candidates.append(entries)
            continue
        real_snap = os.path.realpath(snap.path)
        real_root = os.path.realpath(snap.root)
        for entry in scan:
            name = entry.name
            if _is_ours(name) or is_weight_file(name) or not entry.is_file():
                continue  # is_file follows symlinks: dangling links and directories drop out
            target = os.path.realpath(entry.path)
            if not (_within(target, real_snap) or _within(target, real_root)):
                log.warning(
                    "refusing a link target outside the snapshot and cache",
                    extra={"entry": entry.path, "target": target},
                )
                refused.append(name)
                continue
            entries.append((name, target))
        candidates.append(entries)

    plan: dict[str, str] = {}
    typed: list[str] = []
    for entries in candidates:
        for name, target in entries:
            if is_typed_slot(name) and name not in plan:
                plan[name] = target
                typed.append(name)
    for entries in candidates:
        for name, target in entries:
            plan.setdefault(name, target)
    return plan, sorted(typed), sorted(set(refused) - set(plan))


# --------------------------------------------------------------------------------------
# Applying the plan


@contextlib.contextmanager
def _locked(slug_dir: Path) -> Iterator[None]:
    fd = os.open(slug_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(name: str) -> str:
    return f"{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-{name}"


def _link(slug_dir: Path, name: str, target: str) -> bool:
    """Point slug_dir/name at target atomically; False when it already does."""
    dest = slug_dir / name
    with contextlib.suppress(OSError):
        if os.readlink(dest) == target:
            return False
    tmp = slug_dir / _tmp_name(name)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, dest)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _write_record(slug_dir: Path, payload: dict[str, Any]) -> None:
    tmp = slug_dir / _tmp_name(RECORD_NAME)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, slug_dir / RECORD_NAME)
    _fsync_dir(slug_dir)


def fill_slug_dir(
    resolved: Resolved, slug_root: str | os.PathLike[str], *, started: float | None = None
) -> HarvestResult:
    """Harvest an already-resolved source into `<slug_root>/<slug>/` (see the module doc).

    `started` (a time.monotonic() value) makes elapsed_s cover the resolve/fetch too.
    """
    start = time.monotonic() if started is None else started
    source = resolved.source
    slug = slug_for(source, resolved.ref, resolved.quant)
    slug_dir = Path(slug_root).absolute() / slug
    if slug_dir.is_symlink():
        # Never ours (we only make directories here): following a link planted on the shared
        # volume would write our links and record into its target. Replace it.
        log.warning(
            "slug directory is a symlink; replacing it",
            extra={"slug_dir": str(slug_dir), "target": os.readlink(slug_dir)},
        )
        os.unlink(slug_dir)
    slug_dir.mkdir(parents=True, exist_ok=True)
    with _locked(slug_dir):
        # The record goes first: from here until it is rewritten the directory is
        # "not harvested", whatever state a kill leaves it in.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slug_dir / RECORD_NAME)
        for entry in os.scandir(slug_dir):
            if entry.name.startswith(_TMP_MARK):
                os.unlink(entry.path)  # leftovers of a killed run
        plan, typed, refused = _plan(resolved.snapshot_dirs)
        changed = sum(_link(slug_dir, name, target) for name, target in plan.items())
        for entry in os.scandir(slug_dir):
            if entry.is_symlink() and entry.name not in plan and not _is_ours(entry.name):
                os.unlink(entry.path)  # a file the model no longer has
        _fsync_dir(slug_dir)
        result = HarvestResult(
            slug=slug,
            slug_dir=str(slug_dir),
            source=source.raw,
            revision=resolved.revision,
            quant=resolved.quant,
            snapshot_dirs=[str(s.path) for s in resolved.snapshot_dirs],
            weight_files=[str(w) for w in resolved.weight_files],
            model_path=str(resolved.model_path),
            linked_files=dict(sorted(plan.items())),
            typed_slots=typed,
            refused_files=refused,
            notes=list(resolved.notes),
            elapsed_s=round(time.monotonic() - start, 4),
        )
        _write_record(slug_dir, {"version": RECORD_VERSION, **result.to_dict()})
    log.info(
        "harvested",
        extra={"slug": slug, "files": len(plan), "changed": changed, "refused": len(refused)},
    )
    return result


def harvest(
    source: str,
    slug_root: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    quant: str | None = None,
) -> HarvestResult:
    """Resolve SOURCE (fetching hf:// as needed) and fill its slug directory."""
    start = time.monotonic()
    src = parse_source(source)
    resolved = resolve(src, cache_dir=cache_dir, revision=revision, quant=quant)
    return fill_slug_dir(resolved, slug_root, started=start)


def read_record(slug_dir: str | os.PathLike[str]) -> HarvestResult | None:
    """The harvest record of `slug_dir` if complete and still true, else None.

    "Still true": it names this directory's slug, and every entry it lists is a
    symlink in the directory pointing at the recorded, existing target. The server
    reports ready only once this returns a result.
    """
    slug_dir = Path(slug_dir)
    try:
        data = json.loads((slug_dir / RECORD_NAME).read_text(encoding="utf-8"))
        if data.get("version") != RECORD_VERSION or data.get("slug") != slug_dir.name:
            return None
        result = HarvestResult.from_dict(data)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    for name, target in result.linked_files.items():
        try:
            if os.readlink(slug_dir / name) != target or not os.path.exists(target):
                return None
        except OSError:
            return None
    return result
