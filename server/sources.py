"""Model sources: parse the SOURCE a user gives, and resolve it to files on disk.

A source names where a model lives (`/abs/path`, `file:///abs/path`,
`hf://ORG/REPO[@REV]`, `pvc://CLAIM/PATH`). Parsing is pure and cheap because the
operator parses sources too, in an image without torch or huggingface_hub.
Resolving fetches what is needed (only for `hf://`) and answers three questions
the harvest asks: which snapshot directories hold the model's sibling files,
which files are the weights, and which path the formats layer should open.

huggingface_hub is imported lazily, and its settings (endpoint, offline mode,
cache, token) are read from the environment at call time and passed explicitly:
the library freezes them at import, which would make a long-lived process (and
the tests) ignore later changes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from modeldeploy.server.errors import SourceError

log = logging.getLogger("modeldeploy.sources")

Scheme = Literal["file", "hf", "pvc"]

ACCEPTED_FORMS = "/abs/path, file:///abs/path, hf://ORG/REPO[@REVISION], pvc://CLAIM/PATH"

#: Names ending in these are weights: never harvested, never downloaded unless selected.
#: The one deny-list; harvest re-exports it as `harvest.WEIGHT_SUFFIXES`.
WEIGHT_SUFFIXES: tuple[str, ...] = (
    ".safetensors",
    ".bin",
    ".gguf",
    ".onnx",
    ".tflite",
    ".h5",
    ".pt",
    ".pth",
    ".msgpack",
)

#: The revision an hf:// source without @REV means (the Hub's default branch).
DEFAULT_REVISION = "main"

_HF_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PVC_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_GGUF_SPLIT = re.compile(
    r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE
)
_GGUF_REPO_SUFFIX = "-gguf"
_BASE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_TRUE = {"1", "true", "yes", "on"}


def is_weight_file(name: str) -> bool:
    """True when `name` (a file name or repo path) is a weight file by its suffix."""
    return name.lower().endswith(WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE. `raw` is the text the user gave; the other fields depend on `scheme`.

    file: `path` is the absolute, normalized local path.
    hf:   `repo_id` is ORG/REPO, `revision` the @REV part or None.
    pvc:  `claim` is the PersistentVolumeClaim name, `path` the path inside it ("" = its root).
    """

    scheme: Scheme
    raw: str
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    claim: str | None = None

    @property
    def canonical(self) -> str:
        """One spelling per source (revision excluded), what slugs are derived from."""
        if self.scheme == "file":
            return f"file://{self.path}"
        if self.scheme == "hf":
            return f"hf://{self.repo_id}"
        return f"pvc://{self.claim}/{self.path}".rstrip("/")


def _bad(text: str, reason: str) -> SourceError:
    return SourceError(f"invalid model source {text!r}: {reason} (accepted: {ACCEPTED_FORMS})")


def parse_source(text: str) -> Source:
    """Parse a SOURCE string; raise SourceError naming it and the accepted forms."""
    raw = text
    text = text.strip()
    if not text:
        raise _bad(raw, "empty")
    if text.startswith("/"):
        return Source(scheme="file", raw=raw, path=os.path.normpath(text))
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _bad(raw, "relative paths are not accepted; give an absolute path or a URI")
    scheme = scheme.lower()
    if scheme == "file":
        if not rest.startswith("/"):
            raise _bad(raw, "file:// needs an absolute path (file:///abs/path)")
        return Source(scheme="file", raw=raw, path=os.path.normpath(rest))
    if scheme == "hf":
        return _parse_hf(raw, rest)
    if scheme == "pvc":
        return _parse_pvc(raw, rest)
    raise _bad(raw, f"unknown scheme {scheme + '://'!r}")


def _parse_hf(raw: str, rest: str) -> Source:
    repo, at, revision = rest.partition("@")
    parts = repo.strip("/").split("/")
    if len(parts) != 2 or not all(_HF_SEGMENT.match(p) and ".." not in p for p in parts):
        raise _bad(raw, "hf:// needs ORG/REPO (letters, digits, '.', '_', '-')")
    if at and (not revision or ".." in revision or any(c.isspace() for c in revision)):
        raise _bad(raw, "the @REVISION part is empty or malformed")
    return Source(scheme="hf", raw=raw, repo_id="/".join(parts), revision=revision or None)


def _parse_pvc(raw: str, rest: str) -> Source:
    claim, _, path = rest.partition("/")
    if not _PVC_CLAIM.match(claim) or len(claim) > 253:
        raise _bad(raw, "pvc:// needs a claim name (lowercase letters, digits, '-', '.')")
    norm = PurePosixPath("/", path).as_posix()
    if ".." in PurePosixPath(path).parts:
        raise _bad(raw, "the path inside the claim must not contain '..'")
    return Source(scheme="pvc", raw=raw, claim=claim, path=norm.lstrip("/"))


def effective_revision(source: Source, revision: str | None) -> str | None:
    """The revision a resolve uses: `--revision`, else the source's @REV, else the default.

    Only hf:// sources have revisions; a conflicting pair is refused rather than
    silently picking one.
    """
    if source.scheme != "hf":
        return None
    if revision and source.revision and revision != source.revision:
        raise SourceError(
            f"{source.raw}: --revision {revision!r} conflicts with @{source.revision} in the source"
        )
    return revision or source.revision or DEFAULT_REVISION


# --------------------------------------------------------------------------------------
# GGUF file selection (shared by hf:// listings and local directories)


def select_gguf(names: Sequence[str], quant: str | None, where: str) -> list[str]:
    """Pick the GGUF file(s) to load among `names`: one file, or the parts of one split file.

    `quant` matches case-insensitively as a substring of the name. Without a quant a
    single GGUF (or single split set) is taken; otherwise the choice is ambiguous.
    Raises SourceError listing what is available when none or several match.
    """
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if not ggufs:
        raise SourceError(f"{where}: no .gguf file to select")
    matches = [n for n in ggufs if quant.lower() in n.lower()] if quant else ggufs
    groups = _gguf_groups(matches)
    if len(groups) == 1:
        return groups[0]
    available = ", ".join(ggufs)
    if not groups:
        raise SourceError(
            f"{where}: no .gguf file matches --quant {quant!r} (available: {available})"
        )
    reason = f"--quant {quant!r} matches several" if quant else "several .gguf files; pass --quant"
    raise SourceError(f"{where}: {reason} (available: {available})")


def _gguf_groups(names: Iterable[str]) -> list[list[str]]:
    """Group split GGUF parts (`x-00001-of-00003.gguf`) together; others stand alone."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        m = _GGUF_SPLIT.match(name)
        key = f"{m['stem']}-of-{m['count']}".lower() if m else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# --------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class SnapshotDir:
    """A directory whose top-level non-weight files are harvested.

    `root` bounds where its entries may point: canonical link targets must lie under
    `path` or under `root` (the hub cache for hf:// snapshots, whose files are
    symlinks into blobs/).
    """

    path: Path
    root: Path


@dataclass(frozen=True)
class Resolved:
    """What a source resolved to on this machine."""

    source: Source
    ref: str | None  # the revision asked for (hf:// only: --revision, @REV or "main")
    revision: str | None  # the commit it resolved to (hf:// only)
    quant: str | None
    snapshot_dirs: tuple[SnapshotDir, ...]
    weight_files: tuple[Path, ...]
    model_path: Path
    notes: tuple[str, ...] = field(default=())


def resolve(
    source: Source | str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    quant: str | None = None,
) -> Resolved:
    """Make the model's files present locally (fetching hf:// as needed) and describe them."""
    src = parse_source(source) if isinstance(source, str) else source
    if src.scheme == "file":
        if revision:
            raise SourceError(f"{src.raw}: --revision applies only to hf:// sources")
        return _resolve_local(src, quant)
    if src.scheme == "hf":
        return _resolve_hf(src, cache_dir=cache_dir, revision=revision, quant=quant)
    raise SourceError(
        f"{src.raw}: pvc:// sources are mounted by the operator; inside the pod give the "
        "mounted path instead"
    )


def _resolve_local(src: Source, quant: str | None) -> Resolved:
    assert src.path is not None
    path = Path(src.path)
    if not path.exists():
        raise SourceError(f"{src.raw}: no such file or directory")
    if path.is_dir():
        names = sorted(e.name for e in os.scandir(path) if e.is_file())
        model_path, weights = _local_dir_model(path, names, quant, src.raw)
        snapshot = path
    else:
        name = path.name.lower()
        if quant:
            raise SourceError(f"{src.raw}: --quant selects among the .gguf files of a directory")
        if name.endswith(".safetensors.index.json"):
            weights = tuple(path.parent / n for n in _index_shards(path))
        elif name.endswith((".gguf", ".safetensors")):
            weights = (path,)
        else:
            raise SourceError(
                f"{src.raw}: not a model file (expected a directory, .gguf, .safetensors or "
                "*.safetensors.index.json)"
            )
        model_path, snapshot = path, path.parent
    real = snapshot.resolve()
    return Resolved(
        source=src,
        ref=None,
        revision=None,
        quant=quant,
        snapshot_dirs=(SnapshotDir(path=snapshot, root=real),),
        weight_files=tuple(weights),
        model_path=model_path,
    )


def _local_dir_model(
    path: Path, names: list[str], quant: str | None, where: str
) -> tuple[Path, tuple[Path, ...]]:
    """The file in a model directory that the formats layer should open, and the weights."""
    lower = {n.lower(): n for n in names}
    indexes = [n for n in names if n.lower().endswith(".safetensors.index.json")]
    singles = [n for n in names if n.lower().endswith(".safetensors")]
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    if quant or (ggufs and not singles):
        if not ggufs:
            raise SourceError(f"{where}: --quant {quant!r} given but the directory has no .gguf")
        chosen = select_gguf(ggufs, quant, where)
        return path / chosen[0], tuple(path / n for n in chosen)
    if "model.safetensors.index.json" in lower or len(indexes) == 1:
        index = path / lower.get("model.safetensors.index.json", indexes[0])
        return index, tuple(path / n for n in _index_shards(index))
    if len(singles) == 1:
        return path / singles[0], (path / singles[0],)
    weights = tuple(path / n for n in names if is_weight_file(n))
    return path, weights


def _index_shards(index: Path) -> list[str]:
    """Shard file names a safetensors index refers to (only names, no paths, allowed)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SourceError(f"{index}: not a valid safetensors index ({exc})") from None
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise SourceError(f"{index}: shard name {shard!r} is not a plain file name")
    return shards


# --------------------------------------------------------------------------------------
# hf://


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """--cache-dir, else HF_HUB_CACHE, else HF_HOME/hub, else the library default."""
    if cache_dir:
        return Path(cache_dir).expanduser().absolute()
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(env)).expanduser().absolute()
    if env := os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(env)).expanduser().absolute() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).absolute()


def _offline() -> bool:
    return (
        os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    ).lower() in _TRUE


def _endpoint() -> str | None:
    return (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _check_names(repo_id: str, names: Iterable[str]) -> tuple[str, ...]:
    """Refuse hub file names that could escape the snapshot directory."""
    out = []
    for name in names:
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or ".." in parts:
            raise SourceError(f"hf://{repo_id}: the hub lists an unsafe file name {name!r}")
        out.append(name)
    return tuple(sorted(out))


def _list_repo(repo_id: str, revision: str, cache: Path) -> tuple[str, ...]:
    """The repo's files at `revision`, from the hub, or from the cached snapshot when offline."""
    if not _offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        api = HfApi(endpoint=_endpoint(), token=_token())
        try:
            info = api.model_info(repo_id, revision=revision)
        except GatedRepoError:
            raise SourceError(f"hf://{repo_id}: gated repository; set HF_TOKEN") from None
        except RevisionNotFoundError:
            raise SourceError(f"hf://{repo_id}: revision {revision!r} not found") from None
        except RepositoryNotFoundError:
            raise SourceError(
                f"hf://{repo_id}: repository not found (or private; set HF_TOKEN)"
            ) from None
        except Exception as exc:  # HfHubHTTPError, or the HTTP client's connection errors
            # Hub unreachable or failing: fall back to what the cache holds, as
            # snapshot_download itself does.
            reason = f"the hub is not reachable ({type(exc).__name__}: {exc})"
            log.warning(
                "hub unreachable, using the cache", extra={"repo": repo_id, "error": reason}
            )
            return _cached_listing(repo_id, revision, cache, reason)
        return _check_names(repo_id, [s.rfilename for s in info.siblings or []])
    return _cached_listing(repo_id, revision, cache, "HF_HUB_OFFLINE is set")


def _repo_storage(repo_id: str, cache: Path) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def _cached_listing(repo_id: str, revision: str, cache: Path, why: str) -> tuple[str, ...]:
    """The files of the cached snapshot `revision` (a ref name or a commit) points to."""
    storage = _repo_storage(repo_id, cache)
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / commit
    if ".." in PurePosixPath(commit).parts or not snapshot.is_dir():
        raise SourceError(f"hf://{repo_id}@{revision}: not in the cache {cache} and {why}")
    files = [
        Path(dirpath, f).relative_to(snapshot).as_posix()
        for dirpath, _dirs, filenames in os.walk(snapshot)
        for f in filenames
    ]
    return _check_names(repo_id, files)


def _download(repo_id: str, revision: str, files: Sequence[str], cache: Path) -> Path:
    """snapshot_download exactly `files` (no pattern may pull more) and return the snapshot dir."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            allow_patterns=[glob.escape(f) for f in files],
            token=_token(),
            endpoint=_endpoint(),
            local_files_only=_offline(),
        )
    except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"hf://{repo_id}@{revision}: cannot fetch ({first})") from None
    except HfHubHTTPError as exc:
        raise SourceError(f"hf://{repo_id}@{revision}: hub error ({type(exc).__name__})") from None
    return Path(path)


def _resolve_hf(
    src: Source,
    *,
    cache_dir: str | os.PathLike[str] | None,
    revision: str | None,
    quant: str | None,
) -> Resolved:
    assert src.repo_id is not None
    rev = effective_revision(src, revision)
    assert rev is not None
    cache = hub_cache_dir(cache_dir)
    where = f"hf://{src.repo_id}@{rev}"
    listing = _list_repo(src.repo_id, rev, cache)
    top = [f for f in listing if "/" not in f]
    siblings = [f for f in top if not is_weight_file(f)]
    ggufs = [f for f in listing if f.lower().endswith(".gguf")]
    safetensors = [f for f in top if f.lower().endswith(".safetensors")]
    notes: list[str] = []

    if quant or (ggufs and not safetensors):
        if not ggufs:
            raise SourceError(f"{where}: --quant {quant!r} given but the repo has no .gguf files")
        weights = select_gguf(ggufs, quant, where)
        model_rel = weights[0]
    elif safetensors:
        weights = safetensors
        indexes = [f for f in siblings if f.lower().endswith(".safetensors.index.json")]
        if "model.safetensors.index.json" in siblings:
            model_rel = "model.safetensors.index.json"
        elif len(indexes) == 1:
            model_rel = indexes[0]
        elif len(safetensors) == 1:
            model_rel = safetensors[0]
        else:
            model_rel = ""
    else:
        raise SourceError(
            f"{where}: no .safetensors or .gguf weights in the repo "
            f"(files: {', '.join(listing) or 'none'})"
        )

    log.info(
        "fetching",
        extra={"repo": src.repo_id, "revision": rev, "files": len(weights) + len(siblings)},
    )
    # By branch/tag name, not the listed commit: snapshot_download then records the
    # name -> commit ref in the cache, which is what offline runs resolve through.
    snapshot = _download(src.repo_id, rev, sorted({*weights, *siblings}), cache)
    root = cache.resolve()
    snapshots = [SnapshotDir(path=snapshot, root=root)]

    if ggufs and model_rel.lower().endswith(".gguf") and "tokenizer.json" not in siblings:
        base = _base_repo(src.repo_id)
        if base is not None:
            base_dir = _base_tokenizer(base, cache)
            if base_dir is not None:
                snapshots.append(SnapshotDir(path=base_dir, root=root))
                notes.append(f"tokenizer files from hf://{base}")

    return Resolved(
        source=src,
        ref=rev,
        revision=snapshot.name,
        quant=quant,
        snapshot_dirs=tuple(snapshots),
        weight_files=tuple(snapshot / w for w in weights),
        model_path=snapshot / model_rel if model_rel else snapshot,
        notes=tuple(notes),
    )


def _base_repo(repo_id: str) -> str | None:
    """`org/Model-GGUF` -> `org/Model`; None for repos not named like a GGUF conversion."""
    if repo_id.lower().endswith(_GGUF_REPO_SUFFIX) and len(repo_id.split("/")[1]) > 5:
        return repo_id[: -len(_GGUF_REPO_SUFFIX)]
    return None


def _base_tokenizer(base: str, cache: Path) -> Path | None:
    """Fetch tokenizer.json/tokenizer_config.json of the base repo; None if it has none.

    Best effort: the GGUF embeds a tokenizer, so a missing or unreachable base repo
    is worth a warning, not a failure.
    """
    try:
        listing = _list_repo(base, DEFAULT_REVISION, cache)
    except SourceError as exc:
        log.warning("base repo for tokenizer files unavailable", extra={"error": str(exc)})
        return None
    wanted = [f for f in _BASE_TOKENIZER_FILES if f in listing]
    if not wanted:
        return None
    try:
        return _download(base, DEFAULT_REVISION, wanted, cache)
    except SourceError as exc:
        log.warning("base repo tokenizer files not fetched", extra={"error": str(exc)})
        return None
