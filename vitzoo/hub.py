"""Publish a zoo folder to the Hugging Face Hub and read one back lazily.

A zoo folder *is* the Hub repository (docs/zoo-format.md), so publishing is an upload of the folder
with the official client, guarded by three rules that keep the Hub copy trustworthy:

* the index is checked against the files before anything is sent (a missing file or a wrong sha256
  would otherwise be published and only discovered by a user's loader);
* only finished models go up (``run.json`` present and indexed), never ``.partial/`` training state;
* each pushed version is tagged, so users can pin ``revision="v3"`` and get exactly that zoo.

Resume is the client's: ``upload_folder`` asks the server for the oid of every file it is about to
send and drops the ones already committed; LFS objects already on the server are not re-sent (the
LFS batch answer has no upload action for them); with Xet the upload is split into several commits
and already-uploaded chunks are deduplicated. Re-running :func:`push` after an interruption
therefore only sends what is missing.

With ``index_dataset`` (``vitzoo push --index-dataset [org/name-index]``) the zoo's index is also
published as a companion *dataset* repo (default ``<repo>-index``): ``index.parquet`` (and
``analysis.parquet`` when present) with a dataset card whose ``configs:`` metadata lets the Hub's
table viewer and ``datasets.load_dataset`` find them (:mod:`vitzoo.index_card`). The zoo's
``zoo.json`` records it under ``index_dataset`` (so the zoo card can link it) before the zoo is
uploaded; the dataset is uploaded after the zoo, its card names the zoo commit, and it gets the zoo's
version tag.

Downloading goes through :class:`HubSource`: the small zoo-level files first (one
``snapshot_download`` pinned to a commit sha), model files when the reader asks, so a filtered load
never fetches the other models' weights: one file at a time for single reads, or a whole view in one
parallel ``snapshot_download`` (:meth:`HubSource.local_paths`, behind ``Zoo.download``); everything
lands in the standard HF cache and works with ``HF_HUB_OFFLINE=1`` afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from vitzoo.errors import VitzooError

logger = logging.getLogger(__name__)

ZOO_META_FILES: tuple[str, ...] = ("index.parquet", "zoo.json", "recipe.yaml", "README.md")
"""Zoo-level files fetched eagerly by :class:`HubSource` (everything else is lazy)."""

PUSH_IGNORE_PATTERNS: tuple[str, ...] = (
    ".partial/*", "*/.partial/*", "*.tmp", "*/.*.tmp", ".vitzoo-*", "*/.vitzoo-*", ".cache/*", ".git/*",
)
"""Never uploaded: training state of unfinished runs, temporary files of atomic writes, our lock."""

INDEX_DATASET_KEY = "index_dataset"
"""Key of zoo.json that records the zoo's index dataset (``{"repo_id", "url", "config", "split", "files"}``)."""
INDEX_DATASET_SUFFIX = "-index"
"""The default index dataset of zoo ``org/name`` is ``org/name-index``."""

_LOCK_NAME = ".vitzoo-push.lock"
_LOCK_PID_NAME = ".vitzoo-push.pid"
_VERSION_TAG = re.compile(r"^v(\d+)$")


# ============================================================================ errors
class HubError(VitzooError, RuntimeError):
    """Base class of vitzoo's Hub errors (messages never contain a token)."""


class ZooIndexMismatchError(HubError, ValueError):
    """The zoo's index.parquet disagrees with its files: pushing it would publish a broken zoo."""


class PushInProgressError(HubError):
    """Another process is pushing this zoo folder (only one process pushes)."""


class ZooRepoNotFoundError(HubError, LookupError):
    """The repo does not exist (or is private and the token, if any, cannot see it)."""


class ZooRevisionNotFoundError(HubError, LookupError):
    """The repo exists but the branch, tag or commit does not."""


class ZooFileNotFoundError(HubError, FileNotFoundError, LookupError):
    """A file is not in the repo at that revision, or not cached while offline."""


def _library() -> dict[str, str]:
    """``library_name``/``library_version`` for every client call (the Hub's user agent names vitzoo)."""
    try:
        from importlib.metadata import version

        v = version("vitzoo")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source tree)
        v = "unknown"
    return {"library_name": "vitzoo", "library_version": v}


def _scrub(text: str, token: str | None) -> str:
    """Remove a token from a message: the client's errors quote URLs and headers, never trust them."""
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


@contextlib.contextmanager
def _scrubbed(token: str | None, what: str) -> Iterator[None]:
    """Re-raise any client error as a :class:`HubError` whose message cannot leak the token."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:  # noqa: BLE001 - we re-raise with context, scrubbed
        raise HubError(f"{what} failed: {_scrub(f'{type(err).__name__}: {err}', token)}") from None


# ============================================================================ index checks
@dataclasses.dataclass
class ZooContents:
    """What a zoo folder holds, as far as publishing is concerned."""

    indexed_models: list[str]
    """Models in index.parquet (all have run.json): these are pushed."""
    unfinished_models: list[str]
    """Model folders without run.json: still training, not pushed."""
    unindexed_models: list[str]
    """Model folders with run.json that are not in the index (index older than the run): not pushed."""
    files: list[str]
    """Every file index.parquet references (relative paths)."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_zoo(zoo_dir: str | os.PathLike[str], *, check_hashes: bool = True, workers: int = 4) -> ZooContents:
    """Check that index.parquet matches the files; return what a push would send.

    Raises :class:`ZooIndexMismatchError` naming the first offending file: a file the index
    references that is missing, has another size or another sha256, or an indexed model without
    ``run.json``. Hashing reads every weight file once (in threads: hashlib releases the GIL).
    """
    import pandas as pd

    root = Path(zoo_dir)
    index_path = root / "index.parquet"
    if not index_path.is_file():
        raise ZooIndexMismatchError(f"{root} has no index.parquet: not a finished zoo folder")
    index = pd.read_parquet(index_path, columns=None)
    for col in ("model_id", "file", "sha256", "size"):
        if col not in index.columns:
            raise ZooIndexMismatchError(f"{index_path}: column {col!r} is missing")
    files = index.drop_duplicates("file")[["file", "sha256", "size", "model_id"]]
    indexed = sorted(set(index["model_id"].astype(str)))
    for model_id in indexed:
        if not (root / "models" / model_id / "run.json").is_file():
            raise ZooIndexMismatchError(
                f"index.parquet lists model {model_id!r} but models/{model_id}/run.json is missing")
    problems: list[str] = []
    to_hash: list[tuple[str, str]] = []
    for rel, sha, size in zip(files["file"], files["sha256"], files["size"], strict=True):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in index.parquet but missing")
        elif size is not None and not pd.isna(size) and path.stat().st_size != int(size):
            problems.append(f"{rel}: size {path.stat().st_size} != {int(size)} in index.parquet")
        else:
            to_hash.append((rel, str(sha)))
    if check_hashes and not problems:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            digests = list(pool.map(lambda item: _sha256_file(root / item[0]), to_hash))
        for (rel, expected), got in zip(to_hash, digests, strict=True):
            if got != expected:
                problems.append(f"{rel}: sha256 {got[:12]}... != {expected[:12]}... in index.parquet")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ZooIndexMismatchError(f"refusing to push {root}: index does not match its files: {problems[0]}{more}")
    folders = sorted(p.name for p in (root / "models").iterdir() if p.is_dir()) if (root / "models").is_dir() else []
    indexed_set = set(indexed)
    unfinished = [m for m in folders if not (root / "models" / m / "run.json").is_file()]
    unindexed = [m for m in folders if m not in indexed_set and m not in unfinished]
    return ZooContents(indexed, unfinished, unindexed, sorted(files["file"]))


# ============================================================================ push
@dataclasses.dataclass
class PushResult:
    """What :func:`push` did; ``str(result)`` is the one-paragraph summary the CLI prints."""

    repo_id: str
    revision: str
    commit: str
    """Head of ``revision`` after the push."""
    previous_commit: str | None
    """Head before the push (``None`` for a new branch); equal to ``commit`` when nothing changed."""
    tag: str | None
    pushed_models: list[str]
    unfinished_models: list[str]
    unindexed_models: list[str]
    url: str
    index_dataset: IndexDatasetResult | None = None
    """What was pushed to the index dataset, when ``index_dataset`` was asked for."""

    @property
    def partial(self) -> bool:
        """True when some model folders were left out (zoo still being generated)."""
        return bool(self.unfinished_models or self.unindexed_models)

    @property
    def changed(self) -> bool:
        return self.commit != self.previous_commit

    def __str__(self) -> str:
        lines = [f"pushed {len(self.pushed_models)} finished models to {self.repo_id}@{self.revision} "
                 f"(commit {self.commit[:10]}{', tag ' + self.tag if self.tag else ''}"
                 f"{'' if self.changed else ', nothing changed'})"]
        if self.unfinished_models:
            lines.append(f"not pushed: {len(self.unfinished_models)} unfinished models (no run.json yet): "
                         + ", ".join(self.unfinished_models[:5]) + (" ..." if len(self.unfinished_models) > 5 else ""))
        if self.unindexed_models:
            lines.append(f"not pushed: {len(self.unindexed_models)} finished models missing from index.parquet "
                         "(rebuild the index to include them): " + ", ".join(self.unindexed_models[:5]))
        if self.index_dataset is not None:
            lines.append(str(self.index_dataset))
        return "\n".join(lines)


@dataclasses.dataclass
class IndexDatasetResult:
    """What :func:`push` sent to the index dataset repo."""

    repo_id: str
    revision: str
    commit: str
    previous_commit: str | None
    tag: str | None
    files: list[str]
    """Files of the dataset repo written by this push (README.md and the tables)."""
    rows: int
    url: str

    @property
    def changed(self) -> bool:
        return self.commit != self.previous_commit

    def __str__(self) -> str:
        return (f"index dataset {self.repo_id}@{self.revision}: {self.rows} rows in "
                f"{', '.join(f for f in self.files if f != 'README.md')} (commit {self.commit[:10]}"
                f"{', tag ' + self.tag if self.tag else ''}{'' if self.changed else ', nothing changed'})")


def default_index_dataset(repo_id: str) -> str:
    """The default index dataset of a zoo repo: ``org/name`` → ``org/name-index``."""
    return f"{repo_id}{INDEX_DATASET_SUFFIX}"


def _record_index_dataset(root: Path, dataset_id: str, url: str) -> bool:
    """Write the index dataset into zoo.json (before the cards are rendered); True when zoo.json changed."""
    from vitzoo.index_card import SPLIT, tables_of
    from vitzoo.zoo.io import write_json

    path = root / "zoo.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    tables = tables_of(root)
    entry = {"repo_id": dataset_id, "repo_type": "dataset", "url": url, "config": tables[0].config,
             "split": SPLIT, "files": [t.path for t in tables]}
    if info.get(INDEX_DATASET_KEY) == entry:
        return False
    info[INDEX_DATASET_KEY] = entry
    write_json(path, info)
    logger.info("zoo.json: index dataset %s recorded", dataset_id)
    return True


def _branch_head(api: object, repo_id: str, branch: str, repo_type: str = "model") -> str | None:
    """Head commit of ``branch`` (created from main when missing: then ``None``)."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.repo_info(repo_id, revision=branch, repo_type=repo_type).sha  # type: ignore[attr-defined]
    except RevisionNotFoundError:
        api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type=repo_type)  # type: ignore[attr-defined]
        return None


def _push_index_dataset(api: object, root: Path, dataset_id: str, url: str, *, branch: str, zoo_repo_id: str,
                        zoo_url: str, zoo_commit: str, zoo_tag: str | None,
                        commit_message: str | None) -> IndexDatasetResult:
    """Upload README.md + the tables to the index dataset; tag it like the zoo (never moving a tag)."""
    from vitzoo.index_card import index_dataset_card, tables_of
    from vitzoo.zoo.index import INDEX_FILE, LIST_FORMAT_VERSION, index_bytes, index_format, read_index

    previous = _branch_head(api, dataset_id, branch, "dataset")
    tables = tables_of(root)
    with tempfile.TemporaryDirectory(prefix="vitzoo-index-dataset-") as tmp:
        folder = Path(tmp)
        for t in tables:
            src = root / t.path
            if t.path == INDEX_FILE and int(index_format(src).get("format_version", 1)) < LIST_FORMAT_VERSION:
                # a format-1 index (JSON-string list columns): the dataset gets native lists all the same
                (folder / t.path).write_bytes(index_bytes(read_index(src), LIST_FORMAT_VERSION))
            else:
                shutil.copyfile(src, folder / t.path)
        card = index_dataset_card(root, dataset_id, zoo_repo_id=zoo_repo_id, zoo_url=zoo_url,
                                  zoo_revision=zoo_tag or branch, zoo_commit=zoo_commit,
                                  table_files={t.path: folder / t.path for t in tables})
        (folder / "README.md").write_text(str(card), encoding="utf-8")
        rows = len(read_index(folder / INDEX_FILE))
        files = ["README.md", *(t.path for t in tables)]
        logger.info("uploading the index (%d rows, %s) to dataset %s@%s", rows, ", ".join(files[1:]),
                    dataset_id, branch)
        info = api.upload_folder(  # type: ignore[attr-defined]
            repo_id=dataset_id, repo_type="dataset", folder_path=folder, revision=branch,
            commit_message=commit_message or f"vitzoo push: index of {zoo_repo_id} at {zoo_commit[:10]}",
            delete_patterns=["*.parquet"])  # a table the zoo no longer has leaves the dataset too
    commit = info.oid  # type: ignore[union-attr]
    tag_name: str | None = None
    if zoo_tag:
        tags = {t.name: t.target_commit for t in api.list_repo_refs(dataset_id, repo_type="dataset").tags}  # type: ignore[attr-defined]
        if zoo_tag not in tags:
            api.create_tag(dataset_id, tag=zoo_tag, revision=commit, repo_type="dataset",  # type: ignore[attr-defined]
                           tag_message=f"index of {zoo_repo_id} {zoo_tag}")
            tag_name = zoo_tag
        elif tags[zoo_tag] == commit:
            tag_name = zoo_tag
        else:
            logger.warning("index dataset %s: tag %s already points at %s, not at this upload %s; tags are never "
                           "moved, so this version of the index is untagged", dataset_id, zoo_tag,
                           tags[zoo_tag][:10], commit[:10])
    return IndexDatasetResult(repo_id=dataset_id, revision=branch, commit=commit, previous_commit=previous,
                              tag=tag_name, files=files, rows=rows, url=url)


@contextlib.contextmanager
def _push_lock(zoo_dir: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock in the zoo folder: a second concurrent push fails fast.

    ``filelock`` (flock on POSIX, ``msvcrt.locking`` on Windows) rather than ``fcntl``, so that
    importing this module works everywhere. The holder writes its pid beside the lock (the lock
    file itself cannot be written through a second handle on Windows) so the error can name it.
    Both files stay in the folder after a push (harmless; ``.vitzoo-*`` is never uploaded).
    """
    from filelock import FileLock, Timeout

    path = zoo_dir / _LOCK_NAME
    pid_path = zoo_dir / _LOCK_PID_NAME
    lock = FileLock(path, timeout=0)  # timeout=0: one try, no waiting
    try:
        lock.acquire()
    except Timeout:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f", held by pid {int(pid_path.read_text().strip())}"
        raise PushInProgressError(f"another process is pushing {zoo_dir} (lock {path}{holder}); "
                                  "wait for it to finish") from None
    try:
        with contextlib.suppress(OSError):
            pid_path.write_text(str(os.getpid()))
        logger.debug("push lock %s acquired", path)
        yield
    finally:
        lock.release()


def _next_version_tag(tags: dict[str, str], commit: str) -> str:
    """``vN``: reuse the tag already on ``commit`` (re-push of an unchanged zoo), else one more than the last."""
    for name, target in tags.items():
        if target == commit and _VERSION_TAG.match(name):
            return name
    numbers = [int(m.group(1)) for name in tags if (m := _VERSION_TAG.match(name))]
    return f"v{max(numbers, default=0) + 1}"


def push(
    zoo_dir: str | os.PathLike[str],
    repo_id: str,
    revision: str | None = None,
    tag: str | Literal[False] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    *,
    check_hashes: bool = True,
    commit_message: str | None = None,
    cards: bool = True,
    index_dataset: str | bool | None = None,
) -> PushResult:
    """Upload a zoo folder to ``repo_id`` and tag the result.

    ``revision`` is the branch (default ``main``; created from ``main`` if missing). ``tag=None``
    tags the pushed commit ``vN`` (the tag already on it when nothing changed), a string uses that
    tag (an existing tag must already point at the pushed commit: tags are never moved), ``False``
    skips tagging. ``token=None`` uses the client's usual sources (``HF_TOKEN``, the saved login).
    ``cards=True`` re-renders the zoo and model cards from the index first (with this repo id in
    their load snippets), so the published cards cannot disagree with the published index.
    ``index_dataset``: also publish the index as a dataset repo (``True``: ``<repo_id>-index``, or
    the dataset id): created first and recorded in zoo.json (so the cards link it), uploaded after
    the zoo, on the same branch, tagged with the zoo's tag (see the module docstring).
    Re-running after an interruption sends only what is missing (see the module docstring).
    """
    from huggingface_hub import HfApi

    root = Path(zoo_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"zoo folder {root} does not exist")
    branch = revision or "main"
    dataset_id: str | None = None
    if index_dataset:
        dataset_id = default_index_dataset(repo_id) if index_dataset is True else str(index_dataset)
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", dataset_id):
            raise ValueError(f"index dataset {dataset_id!r}: expected a Hub repo id, org/name")
    with _push_lock(root):
        logger.info("checking %s: index.parquet against its files%s", root, " (sha256)" if check_hashes else "")
        contents = verify_zoo(root, check_hashes=check_hashes)
        logger.info("%d finished models to push (%d files indexed); %d unfinished and %d unindexed left out",
                    len(contents.indexed_models), len(contents.files), len(contents.unfinished_models),
                    len(contents.unindexed_models))
        api = HfApi(endpoint=endpoint, token=token, **_library())
        dataset_url = ""
        if dataset_id is not None:
            with _scrubbed(token, f"creating index dataset {dataset_id}"):
                dataset_url = str(api.create_repo(dataset_id, repo_type="dataset", private=private, exist_ok=True))
            _record_index_dataset(root, dataset_id, dataset_url)
        elif (root / "zoo.json").is_file():
            recorded = json.loads((root / "zoo.json").read_text()).get(INDEX_DATASET_KEY)
            if isinstance(recorded, dict) and recorded.get("repo_id"):
                logger.warning("zoo.json links the index dataset %s, which this push does not update "
                               "(push with --index-dataset to keep it in step with the index)", recorded["repo_id"])
        if cards:
            from vitzoo.cards import render_zoo_cards

            render_zoo_cards(root, repo_id=repo_id, revision=branch)  # the snippets load from this branch
        ignore = list(PUSH_IGNORE_PATTERNS) + [f"models/{m}/*" for m in
                                                contents.unfinished_models + contents.unindexed_models]
        with _scrubbed(token, f"push to {repo_id}"):
            url = str(api.create_repo(repo_id, private=private, exist_ok=True))
            previous = _branch_head(api, repo_id, branch)
            message = commit_message or (f"vitzoo push: {len(contents.indexed_models)} models"
                                         + (f" ({len(contents.unfinished_models)} unfinished not pushed)"
                                            if contents.unfinished_models else ""))
            logger.info("uploading %s to %s@%s (only files the Hub does not have yet are sent)",
                        root, repo_id, branch)
            with warnings.catch_warnings():
                # index.parquet in a model repo is by design (docs/zoo-format.md), not a mistaken dataset.
                warnings.filterwarnings("ignore", message=".*data file.*model repository", category=UserWarning)
                info = api.upload_folder(repo_id=repo_id, folder_path=root, revision=branch,
                                         commit_message=message, ignore_patterns=ignore)
            commit = info.oid  # type: ignore[union-attr]
            tag_name: str | None = None
            if tag is not False:
                tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
                tag_name = tag or _next_version_tag(tags, commit)
                if tag_name in tags and tags[tag_name] != commit:
                    raise HubError(f"tag {tag_name!r} already points at {tags[tag_name][:10]} on {repo_id}; "
                                   "tags are never moved: choose another tag")
                if tag_name not in tags:
                    api.create_tag(repo_id, tag=tag_name, revision=commit,
                                   tag_message=f"vitzoo zoo version {tag_name}")
                    logger.info("tagged %s as %s", commit[:10], tag_name)
        dataset_result = None
        if dataset_id is not None:
            with _scrubbed(token, f"push of the index to dataset {dataset_id} (the zoo itself was pushed: "
                                  f"{repo_id}@{commit[:10]}; re-run the push to retry)"):
                dataset_result = _push_index_dataset(api, root, dataset_id, dataset_url, branch=branch,
                                                     zoo_repo_id=repo_id, zoo_url=url, zoo_commit=commit,
                                                     zoo_tag=tag_name,
                                                     commit_message=None)
    result = PushResult(repo_id=repo_id, revision=branch, commit=commit, previous_commit=previous, tag=tag_name,
                        pushed_models=contents.indexed_models, unfinished_models=contents.unfinished_models,
                        unindexed_models=contents.unindexed_models, url=url, index_dataset=dataset_result)
    logger.debug("%s", result)  # the caller reports it (the CLI prints it on stdout)
    return result


# ============================================================================ download
class HubSource:
    """Read a zoo from the Hub: zoo-level files eagerly, model files lazily, all through the HF cache.

    The revision (branch, tag or sha; default ``main``) is resolved once to a commit sha
    (:attr:`resolved_revision`) and every later file comes from that commit, so a zoo never mixes
    two versions even if the branch moves while it is being read. ``local_path`` is the interface
    :mod:`vitzoo.zoo.reader` uses for local folders too.
    """

    def __init__(self, repo_id: str, revision: str | None = None, *, endpoint: str | None = None,
                 token: str | bool | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 local_files_only: bool = False) -> None:
        self.repo_id = repo_id
        self.revision = revision or "main"
        self.endpoint = endpoint
        self._token = token
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.local_files_only = local_files_only
        self.downloads: list[str] = []
        """Relative paths fetched through :meth:`local_path` (cache hits included), in order."""
        self.snapshot_dir = self._fetch_meta()
        self.resolved_revision: str = self.snapshot_dir.name
        self.root_hint: str = f"{repo_id}@{self.revision}"
        """Human-readable origin for messages and reprs (``org/name@rev``); not a filesystem path."""

    def __repr__(self) -> str:
        resolved = getattr(self, "resolved_revision", None)
        return f"HubSource({self.repo_id!r}, revision={self.revision!r} -> {(resolved or '?')[:10]})"

    def _where(self) -> str:
        return f"{self.repo_id}@{self.revision}" + (f" on {self.endpoint}" if self.endpoint else "")

    def _translate(self, err: Exception, relpath: str | None = None) -> HubError:
        """Map the client's errors to ours, with the repo, revision and file in the message."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        token = self._token if isinstance(self._token, str) else None
        if isinstance(err, RepositoryNotFoundError):
            return ZooRepoNotFoundError(f"zoo repo {self.repo_id!r} not found"
                                        + (f" on {self.endpoint}" if self.endpoint else "")
                                        + " (or it is private and no valid token was given)")
        if isinstance(err, RevisionNotFoundError):
            return ZooRevisionNotFoundError(f"revision {self.revision!r} not found in zoo repo {self.repo_id!r}")
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            what = f"{relpath} of " if relpath else ""
            return ZooFileNotFoundError(f"{what}{self._where()} is not in the local cache and the Hub cannot be "
                                        f"reached (offline?): {_scrub(str(err).splitlines()[0], token)}")
        if isinstance(err, EntryNotFoundError):
            return ZooFileNotFoundError(f"{relpath} is not in zoo {self._where()}")
        return HubError(f"reading {relpath or 'zoo'} from {self._where()} failed: "
                        f"{_scrub(f'{type(err).__name__}: {err}', token)}")

    def _fetch_meta(self) -> Path:
        from huggingface_hub import snapshot_download

        logger.debug("fetching %s from %s", ", ".join(ZOO_META_FILES), self._where())
        try:
            path = snapshot_download(self.repo_id, revision=self.revision, endpoint=self.endpoint,
                                     token=self._token, cache_dir=self.cache_dir,
                                     allow_patterns=list(ZOO_META_FILES), local_files_only=self.local_files_only,
                                     **_library())
        except Exception as err:  # noqa: BLE001 - translated
            raise self._translate(err) from None
        return Path(path)

    def local_path(self, relpath: str) -> Path:
        """Path of ``relpath`` in the local cache, downloading it (only it) if needed."""
        from huggingface_hub import hf_hub_download

        relpath = self._clean(relpath)
        self.downloads.append(relpath)
        cached = self.snapshot_dir / relpath
        if cached.is_file():  # the snapshot is immutable (pinned to a commit sha): no request needed
            return cached
        logger.debug("fetching %s from %s", relpath, self._where())
        try:
            path = hf_hub_download(self.repo_id, relpath, revision=self.resolved_revision, endpoint=self.endpoint,
                                   token=self._token, cache_dir=self.cache_dir,
                                   local_files_only=self.local_files_only, **_library())
        except Exception as err:  # noqa: BLE001 - translated
            raise self._translate(err, relpath) from None
        return Path(path)

    def local_paths(self, relpaths: Iterable[str], max_workers: int = 8) -> dict[str, Path]:
        """Local paths of many files, the missing ones fetched by one parallel ``snapshot_download``.

        The call is pinned to :attr:`resolved_revision` with ``allow_patterns`` = exactly the paths
        that are not in the local snapshot yet (glob characters escaped) and ``max_workers``
        downloads at a time. Raises :class:`ZooFileNotFoundError` naming the paths the zoo does not
        have at this revision (or, offline, that are not cached).
        """
        from huggingface_hub import snapshot_download

        rels = list(dict.fromkeys(self._clean(r) for r in relpaths))
        self.downloads.extend(rels)
        missing = [r for r in rels if not (self.snapshot_dir / r).is_file()]
        if missing:
            logger.info("downloading %d files of %s (%d already cached), %d at a time", len(missing), self._where(),
                        len(rels) - len(missing), max_workers)
            try:
                snapshot_download(self.repo_id, revision=self.resolved_revision, endpoint=self.endpoint,
                                  token=self._token, cache_dir=self.cache_dir,
                                  allow_patterns=[glob.escape(r) for r in missing], max_workers=max(1, max_workers),
                                  local_files_only=self.local_files_only, **_library())
            except Exception as err:  # noqa: BLE001 - translated
                raise self._translate(err, missing[0] if len(missing) == 1 else None) from None
        out = {r: self.snapshot_dir / r for r in rels}
        absent = [r for r, p in out.items() if not p.is_file()]
        if absent:
            more = f" (and {len(absent) - 1} more: {', '.join(absent[1:4])}{' ...' if len(absent) > 4 else ''})" \
                if len(absent) > 1 else ""
            raise ZooFileNotFoundError(f"{absent[0]}{more} is not in zoo {self._where()}")
        return out

    @staticmethod
    def _clean(relpath: str) -> str:
        relpath = relpath.replace(os.sep, "/").lstrip("/")
        if ".." in relpath.split("/"):
            raise ValueError(f"invalid path in zoo: {relpath}")
        return relpath

    def exists(self, relpath: str) -> bool:
        """Whether ``relpath`` is in the zoo at this revision (downloads it if it is)."""
        try:
            self.local_path(relpath)
        except ZooFileNotFoundError:
            return False
        return True


def is_repo_id(source: str | os.PathLike[str]) -> bool:
    """``org/name`` that is not an existing local path: how ``vitzoo.load`` tells a repo from a folder."""
    text = os.fspath(source)
    if Path(text).exists():
        return False
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))
