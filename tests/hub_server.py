"""A small, real Hugging Face Hub look-alike on 127.0.0.1 for driving the *unmodified* client.

Why it exists: there is no internet here, and mocking ``huggingface_hub`` would test our mocks, not
the client. This server implements the subset of the Hub's HTTP API that ``HfApi.create_repo``,
``upload_folder``/``create_commit`` (preupload, NDJSON commit, LFS batch + basic PUT + verify),
``list_repo_tree``/``repo_info``/``list_repo_refs``/``list_repo_commits``/``get_paths_info``,
``create_tag``/``create_branch`` and ``hf_hub_download``/``snapshot_download`` (resolve with the
Hub's headers, LFS redirects and ranges) actually call in huggingface_hub 2.4, with the same JSON
shapes and error headers (``X-Error-Code``) so the client raises its own typed errors.

It is a real store: commits get content-derived shas, branches and tags point at commits, file
bytes are stored content-addressed (sha256), and every request is logged so tests can assert
exactly what was uploaded or downloaded.

Dataset repos (``repo_type="dataset"``) are served too, as far as ``datasets.load_dataset("org/name")``
needs: the same API under ``/api/datasets/...``, LFS batch under ``/datasets/{repo}.git/...`` and
downloads under ``/datasets/{repo}/resolve/...``. A model and a dataset may share an id; test helpers
take ``repo_type="dataset"`` to address the dataset one.

Modes: ``lfs_mode=False`` answers "regular" to every preupload (git blobs in the commit payload);
``lfs_mode=True`` answers "lfs" for binary weight/data files (the Hub's default ``.gitattributes``
patterns) or anything over ``lfs_threshold`` bytes. Run the client with ``HF_HUB_DISABLE_XET=1``
(or ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``) in LFS mode: the server has no Xet CAS.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import hashlib
import json
import re
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.parquet", "*.arrow", "*.png",
                "*.jpg", "*.npy", "*.npz", "*.h5", "*.onnx", "*.zip", "*.tar", "*.gz", "*.pkl", "*checkpoints")

DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as ``oid`` / ``ETag`` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


REPO_TYPES = {"models": "model", "datasets": "dataset"}
"""URL segment (``/api/<segment>/...``) → ``repo_type``."""


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    """Key of a repo in :attr:`HubState.repos`: the id for models, ``datasets/<id>`` for datasets."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def url_prefix(repo_type: str) -> str:
    """The Hub's URL prefix of a repo type: ``""`` for models, ``"datasets/"`` for datasets."""
    return "" if repo_type == "model" else f"{repo_type}s/"


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of a commit's tree. ``sha256`` addresses its bytes in :attr:`HubState.blobs`."""

    sha256: str
    size: int
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    def git_oid(self, blobs: dict[str, bytes]) -> str:
        return git_blob_oid(self.pointer if self.lfs else blobs[self.sha256])

    def etag(self, blobs: dict[str, bytes]) -> str:
        """The Hub's ETag: git sha1 for regular files, sha256 of the content for LFS files."""
        return self.sha256 if self.lfs else self.git_oid(blobs)


@dataclasses.dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    message: str
    date: str
    operations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """What the commit request carried (``{"key": ..., "path": ...}``): lets tests see what was re-sent."""


@dataclasses.dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    repo_type: str = "model"
    """``model`` or ``dataset``."""

    def resolve(self, revision: str) -> str | None:
        """Branch, tag or full commit sha → commit sha (the Hub also accepts ``refs/heads/x``)."""
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix) and revision[len(prefix):] in table:
                return table[revision[len(prefix):]]
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        return None


@dataclasses.dataclass
class LoggedRequest:
    method: str
    path: str
    """URL path, percent-decoded."""
    query: dict[str, list[str]]
    status: int = 0
    body_size: int = 0
    authorized: bool = False
    """Whether a valid token came with it (the token itself is never logged)."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FailureRule:
    """Answer ``status`` instead of serving, ``times`` times, for requests matching method + path regex."""

    method: str
    path_regex: str
    status: int
    times: int
    message: str = "Injected failure"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class HubState:
    """Everything the server knows; one lock serialises mutations (the Hub is consistent per repo)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.lfs_objects: set[str] = set()
        self.requests: list[LoggedRequest] = []
        self.failures: list[FailureRule] = []
        self._counter = 0

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str,
                   message: str, operations: list[dict[str, Any]] | None = None) -> Commit:
        with self.lock:
            self._counter += 1
            tree = json.dumps(sorted((p, e.sha256, e.lfs) for p, e in files.items()))
            sha = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{tree}\n{title}\n{self._counter}".encode()).hexdigest()
            commit = Commit(sha=sha, parent=parent, files=dict(files), title=title, message=message,
                            date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                            operations=operations or [])
            repo.commits[sha] = commit
            return commit

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        with self.lock:
            self.blobs.setdefault(sha, data)
        return sha


class HubServer:
    """Threaded Hub look-alike; use as a context manager or call :meth:`start`/:meth:`stop`.

    ``tokens`` maps valid tokens to user names. When ``require_auth`` is true, every write needs a
    valid token and private repos are invisible without one (the Hub answers 401 → the client's
    ``RepositoryNotFoundError``).
    """

    def __init__(self, *, lfs_mode: bool = False, lfs_threshold: int = 10 * 1024 * 1024,
                 tokens: dict[str, str] | None = None, require_auth: bool = False, page_size: int = 1000,
                 redirect_lfs: bool = True) -> None:
        self.state = HubState()
        self.lfs_mode = lfs_mode
        self.lfs_threshold = lfs_threshold
        self.tokens = dict(tokens or {})
        self.require_auth = require_auth
        self.page_size = page_size
        self.redirect_lfs = redirect_lfs
        self._httpd: ThreadingHTTPServer | None = None
        self._cdn: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (_Handler,), {"hub": self})
        # A second port plays the CDN that LFS downloads are redirected to: another origin, so the
        # client does not follow the redirect on HEAD and drops the token on GET, as with the Hub.
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        for name, httpd in (("hub-server", self._httpd), ("hub-cdn", self._cdn)):
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, name=name, daemon=True).start()
        return self

    def stop(self) -> None:
        for httpd in (self._httpd, self._cdn):
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
        self._httpd = self._cdn = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        assert self._cdn is not None, "server not started"
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    # ----------------------------------------------------------------- test helpers
    @property
    def requests(self) -> list[LoggedRequest]:
        with self.state.lock:
            return list(self.state.requests)

    def clear_log(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def fail(self, method: str, path_regex: str, status: int = 500, times: int = 1,
             message: str = "Injected failure") -> None:
        """Make the next ``times`` matching requests fail with ``status`` (to interrupt an upload)."""
        with self.state.lock:
            self.state.failures.append(FailureRule(method.upper(), path_regex, status, times, message))

    def counts(self) -> Counter[tuple[str, str]]:
        """How many times each (method, path) was requested: ``hub.counts()["GET", "/org/z/resolve/main/x"]``."""
        return Counter((r.method, r.path) for r in self.requests)

    def downloaded(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Paths of files whose *content* was served (GET, not HEAD) from ``repo_id``, in order."""
        return [r.extra["file"] for r in self.requests
                if r.method == "GET" and r.extra.get("repo") == repo_id and "file" in r.extra
                and r.extra.get("repo_type", "model") == repo_type and 200 <= r.status < 300]

    def uploaded_lfs(self) -> list[str]:
        """sha256 of every LFS object whose bytes were PUT (successfully), in order."""
        return [r.extra["oid"] for r in self.requests if r.method == "PUT" and "oid" in r.extra
                and 200 <= r.status < 300]

    def committed_paths(self, repo_id: str, repo_type: str = "model") -> list[list[str]]:
        """Per commit request that succeeded: the paths it carried (regular and LFS)."""
        return [r.extra["paths"] for r in self.requests
                if r.extra.get("repo") == repo_id and "paths" in r.extra
                and r.extra.get("repo_type", "model") == repo_type and 200 <= r.status < 300]

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.repos[repo_key(repo_id, repo_type)]

    def files_at(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision`` with its bytes (direct, bypassing HTTP)."""
        repo = self.state.repos[repo_key(repo_id, repo_type)]
        sha = repo.resolve(revision)
        assert sha is not None, f"unknown revision {revision}"
        return {p: self.state.blobs[e.sha256] for p, e in repo.commits[sha].files.items()}

    def is_lfs_path(self, path: str, size: int) -> bool:
        if not self.lfs_mode:
            return False
        name = path.rsplit("/", 1)[-1]
        return size > self.lfs_threshold or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


# ===================================================================== request handling
_Route = tuple[str, re.Pattern[str], str]
_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
_ROUTES: list[_Route] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("DELETE", re.compile(r"^/api/repos/delete$"), "delete_repo"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/refs$"), "refs"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)$"), "paths_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/commits/(?P<rev>[^/]+)$"), "commits"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/tag/(?P<rev>[^/]+)$"), "create_tag"),
    ("DELETE", re.compile(rf"^/api/models/{_REPO}/tag/(?P<rev>[^/]+)$"), "delete_tag"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("DELETE", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "delete_branch"),
    ("GET", re.compile(rf"^/api/models/{_REPO}$"), "repo_info"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/__lfs/upload/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("POST", re.compile(r"^/__lfs/verify$"), "lfs_verify"),
    ("GET", re.compile(r"^/__cdn/(?P<oid>[0-9a-f]{64})/(?P<repo>[^/]+/[^/]+|[^/]+)/(?P<path>.+)$"), "cdn"),
    ("HEAD", re.compile(r"^/__cdn/(?P<oid>[0-9a-f]{64})/(?P<repo>[^/]+/[^/]+|[^/]+)/(?P<path>.+)$"), "cdn"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def _typed_route(route: _Route) -> _Route:
    """The same route for dataset repos: ``/api/models/`` → ``/api/datasets/``, ``/{repo}`` → ``/datasets/{repo}``."""
    method, pattern, name = route
    src = pattern.pattern
    if src.startswith("^/api/models/"):
        src = "^/api/(?P<kind>datasets)/" + src[len("^/api/models/"):]
    elif src.startswith("^/__cdn/"):
        src = "^/__cdn-(?P<kind>datasets)/" + src[len("^/__cdn/"):]
    elif src.startswith(f"^/{_REPO}"):
        src = "^/(?P<kind>datasets)/" + src[2:]
    else:
        raise AssertionError(f"route {name} is not per-repo")
    return method, re.compile(src), name


# Dataset routes: exactly the model ones under the Hub's dataset prefixes (no overlap with them).
_ROUTES += [_typed_route(r) for r in _ROUTES if "?P<repo>" in r[1].pattern]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the bound subclass
    protocol_version = "HTTP/1.1"
    repo_type = "model"
    """The repo type of the request being served (set per request by the dispatcher)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr access log
        pass

    # Every method goes through one dispatcher.
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return self.hub.tokens.get(auth[7:].strip())
        return None

    def _bad_token(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.lower().startswith("bearer ") and self._user() is None and bool(self.hub.tokens)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        raw_path = split.path
        entry = LoggedRequest(method=method, path=path, query=parse_qs(split.query))
        entry.authorized = self._user() is not None
        body = b"" if method in ("GET", "HEAD") else self._read_body()
        entry.body_size = len(body)
        with self.hub.state.lock:
            self.hub.state.requests.append(entry)
        try:
            with self.hub.state.lock:
                for rule in self.hub.state.failures:
                    if rule.times > 0 and rule.method == method and re.search(rule.path_regex, path):
                        rule.times -= 1
                        raise HubError(rule.status, rule.message)
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(raw_path)  # revisions arrive quoted with safe="": split first
                if route_method == method and match:
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    self.repo_type = REPO_TYPES[groups.pop("kind", None) or "models"]
                    if self.repo_type != "model":
                        entry.extra["repo_type"] = self.repo_type
                    getattr(self, f"_h_{name}")(entry, body, **groups)
                    return
            raise HubError(404, f"Not found: {method} {path}")
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._send_json(entry, err.status, {"error": err.message, **err.extra}, headers=headers, head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            entry.status = 499

    def _send(self, entry: LoggedRequest, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None, head: bool = False, length: int | None = None) -> None:
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _send_json(self, entry: LoggedRequest, status: int, obj: Any, headers: dict[str, str] | None = None,
                   head: bool = False) -> None:
        self._send(entry, status, json.dumps(obj).encode(), headers=headers, head=head)

    # ------------------------------------------------------------- access control
    def _need_write(self) -> None:
        if self._bad_token():
            raise HubError(401, INVALID_CREDENTIALS)
        if self.hub.require_auth and self._user() is None:
            raise HubError(401, "You must be authenticated to write")

    def _repo(self, repo_id: str | None, write: bool = False) -> Repo:
        if self._bad_token():
            raise HubError(401, INVALID_CREDENTIALS)
        if write:
            self._need_write()
        repo = self.hub.state.repos.get(repo_key(repo_id or "", self.repo_type))
        if repo is None or (repo.private and self._user() is None and self.hub.require_auth):
            # The Hub answers 401 for unknown repos to anonymous users, 404 with RepoNotFound otherwise.
            status = 401 if self._user() is None and self.hub.require_auth else 404
            raise HubError(status, "Repository not found", code="RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str | None) -> Commit:
        sha = repo.resolve(rev or "main")
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return repo.commits[sha]

    # ------------------------------------------------------------- repos
    def _h_whoami(self, entry: LoggedRequest, body: bytes) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        self._send_json(entry, 200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                                     "auth": {"type": "access_token",
                                              "accessToken": {"displayName": "test", "role": "write"}}})

    def _h_validate_yaml(self, entry: LoggedRequest, body: bytes) -> None:
        """upload_folder validates README.md's YAML header here before hashing anything."""
        import yaml

        content = json.loads(body or b"{}").get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        errors = []
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        self._send_json(entry, 400 if errors else 200, {"errors": errors, "warnings": []})

    def _h_create_repo(self, entry: LoggedRequest, body: bytes) -> None:
        self._need_write()
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "dataset"):
            raise HubError(400, "only model and dataset repos are supported by this test server")
        org, name = payload.get("organization"), payload["name"]
        repo_id = f"{org}/{name}" if org else name
        key = repo_key(repo_id, repo_type)
        url = f"{self.hub.endpoint}/{url_prefix(repo_type)}{repo_id}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        state = self.hub.state
        with state.lock:
            if key in state.repos:
                # The Hub's 409 body carries the url: create_repo(exist_ok=True) reads it.
                raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
            repo = Repo(repo_id=repo_id, private=private, repo_type=repo_type)
            sha = state.store(DEFAULT_GITATTRIBUTES.encode())
            files = {".gitattributes": FileEntry(sha, len(DEFAULT_GITATTRIBUTES), False)}
            commit = state.new_commit(repo, None, files, "initial commit", "")
            repo.branches["main"] = commit.sha
            state.repos[key] = repo
        entry.extra["repo"] = repo_id
        if repo_type != "model":
            entry.extra["repo_type"] = repo_type
        self._send_json(entry, 200, {"url": url, "name": repo_id, "id": repo_id})

    def _h_delete_repo(self, entry: LoggedRequest, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        org, name = payload.get("organization"), payload["name"]
        repo_id = f"{org}/{name}" if org else name
        self.repo_type = payload.get("type") or "model"
        self._repo(repo_id, write=True)
        with self.hub.state.lock:
            del self.hub.state.repos[repo_key(repo_id, self.repo_type)]
        self._send(entry, 200, b"")

    def _h_repo_info(self, entry: LoggedRequest, body: bytes, repo: str, rev: str | None = None) -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev)
        entry.extra["repo"] = repo
        blobs = "blobs" in entry.query and entry.query["blobs"][0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                e = commit.files[path]
                sib.update(size=e.size, blobId=e.git_oid(self.hub.state.blobs))
                if e.lfs:
                    sib["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(e.pointer)}
            siblings.append(sib)
        org = repo.split("/")[0] if "/" in repo else None
        info = {
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "author": org,
            "sha": commit.sha, "lastModified": commit.date, "createdAt": r.commits[_root(r)].date,
            "private": r.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "library_name": None, "siblings": siblings,
        }
        if r.repo_type == "dataset":  # the Hub's dataset info has no modelId / library_name
            del info["modelId"], info["library_name"]
        self._send_json(entry, 200, info)

    def _h_refs(self, entry: LoggedRequest, body: bytes, repo: str) -> None:
        r = self._repo(repo)

        def refs(table: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(table.items())]

        self._send_json(entry, 200, {"branches": refs(r.branches, "heads"), "tags": refs(r.tags, "tags"),
                                     "converts": [], "pullRequests": []})

    def _h_commits(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        commit: Commit | None = self._commit(r, rev)
        items = []
        while commit is not None:
            items.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                          "date": commit.date, "authors": [{"user": "tester"}]})
            commit = r.commits.get(commit.parent) if commit.parent else None
        self._send_json(entry, 200, items)

    # ------------------------------------------------------------- tree
    def _entry_json(self, path: str, e: FileEntry) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": e.git_oid(self.hub.state.blobs), "size": e.size, "path": path}
        if e.lfs:
            out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(e.pointer)}
        return out

    def _h_tree(self, entry: LoggedRequest, body: bytes, repo: str, rev: str, path: str | None = None) -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev)
        entry.extra["repo"] = repo
        prefix = (path or "").strip("/")
        recursive = entry.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = prefix + "/" if prefix else ""
        if prefix and prefix in commit.files:  # the Hub lists a file path as itself
            items = [self._entry_json(prefix, commit.files[prefix])]
        else:
            dirs: set[str] = set()
            files: list[str] = []
            for p in commit.files:
                if not p.startswith(base):
                    continue
                rest = p[len(base):]
                parts = rest.split("/")
                for i in range(1, len(parts)):
                    if recursive or i == 1:
                        dirs.add(base + "/".join(parts[:i]))
                if recursive or len(parts) == 1:
                    files.append(p)
            if prefix and not files and not dirs:
                raise HubError(404, f"Entry not found: {prefix}", code="EntryNotFound",
                               headers={"X-Repo-Commit": commit.sha})
            items = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                     for d in sorted(dirs)]
            items += [self._entry_json(p, commit.files[p]) for p in sorted(files)]
        cursor = int(entry.query.get("cursor", ["0"])[0])
        page = items[cursor:cursor + self.hub.page_size]
        headers = {}
        if cursor + self.hub.page_size < len(items):
            q = f"recursive={str(recursive).lower()}&expand=false&cursor={cursor + self.hub.page_size}"
            url = f"{self.hub.endpoint}{urlsplit(self.path).path}?{q}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._send_json(entry, 200, page, headers=headers)

    def _h_paths_info(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._entry_json(p, commit.files[p]))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        self._send_json(entry, 200, out)

    # ------------------------------------------------------------- refs
    def _h_create_tag(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        tag = json.loads(body or b"{}")["tag"]
        with self.hub.state.lock:
            commit = self._commit(r, rev)
            if tag in r.tags:
                raise HubError(409, f"Tag {tag} already exists")
            r.tags[tag] = commit.sha
        self._send_json(entry, 200, {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": commit.sha})

    def _h_delete_tag(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        with self.hub.state.lock:
            if r.tags.pop(rev, None) is None:
                raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        self._send(entry, 200, b"")

    def _h_create_branch(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        start = json.loads(body or b"{}").get("startingPoint")
        with self.hub.state.lock:
            commit = self._commit(r, start or "main")
            if rev in r.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{rev}")
            r.branches[rev] = commit.sha
        self._send(entry, 200, b"{}")

    def _h_delete_branch(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        with self.hub.state.lock:
            if rev == "main" or r.branches.pop(rev, None) is None:
                raise HubError(400 if rev == "main" else 404, f"Cannot delete branch {rev}")
        self._send(entry, 200, b"")

    # ------------------------------------------------------------- uploads
    def _h_preupload(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        if "create_pr" in entry.query:
            raise HubError(400, "pull requests are not supported by this test server")
        commit = self._commit(r, rev)
        out = []
        for f in json.loads(body)["files"]:
            path, size = f["path"], int(f["size"])
            info: dict[str, Any] = {"path": path, "uploadMode": "lfs" if self.hub.is_lfs_path(path, size)
                                    else "regular", "shouldIgnore": False}
            existing = commit.files.get(path)
            if existing is not None:
                info["oid"] = existing.sha256 if existing.lfs else existing.git_oid(self.hub.state.blobs)
            out.append(info)
        entry.extra["repo"] = repo
        self._send_json(entry, 200, {"files": out, "commitOid": commit.sha})

    def _h_commit(self, entry: LoggedRequest, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        if "create_pr" in entry.query:
            raise HubError(400, "pull requests are not supported by this test server")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        state = self.hub.state
        with state.lock:
            if rev not in r.branches:
                # Committing to a tag or sha is refused; to an unknown branch is a RevisionNotFound.
                code = None if r.resolve(rev) else "RevisionNotFound"
                raise HubError(400 if code is None else 404, f"Invalid rev id: {rev}", code=code)
            head = r.commits[r.branches[rev]]
            if header.get("parentCommit") and header["parentCommit"] != head.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            ops: list[dict[str, Any]] = []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else value["content"].encode()
                    files[path] = FileEntry(state.store(data), len(data), False)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in state.lfs_objects:
                        raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
                    files[path] = FileEntry(oid, len(state.blobs[oid]), True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise HubError(400, f"unsupported commit operation {key}")
                ops.append({"key": key, "path": path})
            commit = state.new_commit(r, head.sha, files, header.get("summary", ""), header.get("description", ""),
                                      ops)
            r.branches[rev] = commit.sha
        entry.extra.update(repo=repo, paths=[o["path"] for o in ops])
        self._send_json(entry, 200, {"success": True, "commitOid": commit.sha,
                                     "commitUrl": f"{self.hub.endpoint}/{url_prefix(r.repo_type)}{repo}"
                                                  f"/commit/{commit.sha}",
                                     "hookOutput": ""})

    def _h_lfs_batch(self, entry: LoggedRequest, body: bytes, repo: str) -> None:
        self._repo(repo, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads go through this test server's batch endpoint")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.state.lfs_objects:
                item["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/__lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.endpoint}/__lfs/verify", "header": {}},
                }
            objects.append(item)
        entry.extra["repo"] = repo
        self._send(entry, 200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _h_lfs_put(self, entry: LoggedRequest, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"content does not match oid {oid}")
        state = self.hub.state
        state.store(body)
        with state.lock:
            state.lfs_objects.add(oid)
        entry.extra["oid"] = oid
        self._send(entry, 200, b"")

    def _h_lfs_verify(self, entry: LoggedRequest, body: bytes) -> None:
        payload = json.loads(body)
        if payload["oid"] not in self.hub.state.lfs_objects or \
                len(self.hub.state.blobs[payload["oid"]]) != int(payload["size"]):
            raise HubError(404, "object not found")
        self._send_json(entry, 200, {"message": "verified"})

    # ------------------------------------------------------------- downloads
    def _h_resolve(self, entry: LoggedRequest, body: bytes, repo: str, rev: str, path: str) -> None:
        head = entry.method == "HEAD"
        r = self._repo(repo)
        commit = self._commit(r, rev)
        entry.extra["repo"] = repo
        e = commit.files.get(path)
        if e is None:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound",
                           headers={"X-Repo-Commit": commit.sha})
        blobs = self.hub.state.blobs
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{e.git_oid(blobs)}"', "Accept-Ranges": "bytes"}
        if e.lfs:
            headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
            if self.hub.redirect_lfs:
                cdn = "__cdn" if r.repo_type == "model" else f"__cdn-{r.repo_type}s"
                headers["Location"] = f"{self.hub.cdn_endpoint}/{cdn}/{e.sha256}/{repo}/{quote(path)}"
                self._send(entry, 302, b"", headers=headers, head=head)
                return
            headers["ETag"] = f'"{e.sha256}"'
        entry.extra["file"] = path
        self._serve_bytes(entry, blobs[e.sha256], headers, head)

    def _h_cdn(self, entry: LoggedRequest, body: bytes, oid: str, repo: str, path: str) -> None:
        data = self.hub.state.blobs.get(oid)
        if data is None:
            raise HubError(404, "no such object")
        entry.extra.update(repo=repo, file=path)
        self._serve_bytes(entry, data, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"}, entry.method == "HEAD")

    def _serve_bytes(self, entry: LoggedRequest, data: bytes, headers: dict[str, str], head: bool) -> None:
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
            else:  # suffix range: the last N bytes
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            end = min(end, len(data) - 1)
            if start >= len(data) or start > end:
                self._send(entry, 416, b"", headers={"Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            part = data[start:end + 1]
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            entry.extra["range"] = (start, end)
            self._send(entry, 206, part, content_type="application/octet-stream", headers=headers, head=head)
            return
        self._send(entry, 200, data, content_type="application/octet-stream", headers=headers, head=head)


def _root(repo: Repo) -> str:
    """The first commit of a repo (for ``createdAt``)."""
    return next(iter(repo.commits))


def serve_forever(**kwargs: Any) -> None:  # pragma: no cover - manual debugging helper
    """``python tests/hub_server.py``: run a server in the foreground and print its endpoint."""
    with HubServer(**kwargs) as hub:
        print(hub.endpoint, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    serve_forever()
