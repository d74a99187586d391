"""Download cross-check against olah, an independent, real Hub server implementation.

Our own test server (tests/hub_server.py) could share a misunderstanding with vitzoo. olah serves
local git repositories the way the Hub does (``offline = true`` + ``mirrors-path`` holding
``models/<org>/<name>`` repos on branch ``main``), so a zoo committed there with git + git-lfs and
read back through ``vitzoo.load`` with the unmodified client checks the download side against
someone else's reading of the protocol.

Known olah limits this test stays clear of: non-LFS *binary* files of 121-149 bytes are mangled (all
our binaries are LFS); ``/api/models/<repo>`` without a revision only answers from its upstream
cache (HubSource always asks for an explicit revision); LFS objects are read from the work tree's
``.git/lfs/objects`` (non-bare repos here, so no ``.git -> .`` link is needed).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from zoo_factory import tree_bytes, write_test_zoo

import vitzoo
from vitzoo.hub import HubSource, ZooRepoNotFoundError, ZooRevisionNotFoundError, verify_zoo

OLAH_CLI = Path(sys.executable).with_name("olah-cli")
REPO = "vitzoo-test/olah-zoo"
LFS_PATTERNS = ("*.safetensors", "*.parquet", "*.png")

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not OLAH_CLI.exists(),
    reason="olah is not installed in this environment (pip install olah) or git is missing: "
           "the cross-check against an independent Hub implementation cannot run",
)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=vitzoo", "-c", "user.email=vitzoo@localhost", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout


def _has_git_lfs() -> bool:
    return subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0


def _commit_zoo(repo: Path, zoo: Path, message: str) -> str:
    """Commit the pushable files of ``zoo`` (what ``vitzoo push`` would send) into ``repo``.

    With git-lfs the files go through its clean filter; without it, the same layout is written by
    hand (pointer file in git, object under ``.git/lfs/objects/aa/bb/<oid>``), which is all olah reads.
    """
    contents = verify_zoo(zoo)
    skip = tuple(f"models/{m}/" for m in contents.unfinished_models + contents.unindexed_models)
    lfs = _has_git_lfs()
    for rel, data in tree_bytes(zoo).items():
        if rel.startswith(skip):
            continue
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not lfs and any(Path(rel).match(p) for p in LFS_PATTERNS):
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()
        target.write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD").strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def olah(tmp_path_factory: pytest.TempPathFactory):
    """olah on 127.0.0.1 serving one zoo repo: v1 (2 models, tag + branch ``v1-branch``), main (3 models)."""
    base = tmp_path_factory.mktemp("olah")
    zoo = write_test_zoo(base / "zoo", n_models=2, n_unfinished=1)
    repo = base / "mirrors" / "models" / REPO
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    if _has_git_lfs():
        _git(repo, "lfs", "install", "--local")
        _git(repo, "lfs", "track", *LFS_PATTERNS)
    else:
        (repo / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n"
                                                     for p in LFS_PATTERNS))
    v1 = _commit_zoo(repo, zoo, "zoo v1")
    _git(repo, "tag", "v1")
    _git(repo, "branch", "v1-branch")
    write_test_zoo(zoo, n_models=3)  # the unfinished run finishes
    v2 = _commit_zoo(repo, zoo, "zoo v2")
    port = _free_port()
    config = base / "olah.toml"
    config.write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{base / 'cache'}"
mirrors-path = ["{base / 'mirrors'}"]
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"

[accessibility]
offline = true
""")
    log = open(base / "olah.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen([str(OLAH_CLI), "-c", str(config)], cwd=base, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"olah did not start: {(base / 'olah.log').read_text()[-2000:]}")
            time.sleep(0.3)
    try:
        yield {"endpoint": f"http://127.0.0.1:{port}", "zoo": zoo, "v1": v1, "v2": v2, "base": base}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_load_through_olah_is_byte_identical(olah, tmp_path):
    src = HubSource(REPO, endpoint=olah["endpoint"], cache_dir=tmp_path / "cache")
    assert src.resolved_revision == olah["v2"]
    zoo_files = tree_bytes(olah["zoo"])
    for rel, data in zoo_files.items():
        assert src.local_path(rel).read_bytes() == data, rel
    local = vitzoo.load(olah["zoo"])
    remote = vitzoo.load(REPO, endpoint=olah["endpoint"], cache_dir=tmp_path / "cache")
    assert remote.model_ids() == local.model_ids() and len(remote) == 3
    mid = local.model_ids()[0]
    for key, tensor in local.state_dict(mid, epoch=1).items():
        assert remote.state_dict(mid, epoch=1)[key].equal(tensor)


@pytest.mark.parametrize("revision", ["v1", "v1-branch", "sha"])
def test_revisions_through_olah(olah, tmp_path, revision):
    rev = olah["v1"] if revision == "sha" else revision
    z = vitzoo.load(REPO, revision=rev, endpoint=olah["endpoint"], cache_dir=tmp_path / "cache")
    assert len(z) == 2 and z.source.resolved_revision == olah["v1"]
    z.state_dict(z.model_ids()[1])


def test_filtered_load_through_olah_fetches_one_model(olah, tmp_path):
    cache = tmp_path / "cache"
    z = vitzoo.load(REPO, endpoint=olah["endpoint"], cache_dir=cache)
    chosen = z.model_ids()[2]
    z.filter(model_id=chosen).state_dict(chosen, epoch=0)
    snapshot = z.source.snapshot_dir
    fetched = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    # the chosen state's file (and the model's small config.json, for the module order), nothing else
    assert fetched - {f"models/{chosen}/config.json"} == {"index.parquet", "zoo.json", "recipe.yaml", "README.md",
                                                          f"models/{chosen}/checkpoints.safetensors"}


def test_errors_through_olah(olah, tmp_path):
    # olah answers an unknown revision of a mirrored repo with 401 RepoNotFound (the Hub: 404
    # RevisionNotFound), so either of our two lookup errors is a correct, clear answer here.
    with pytest.raises((ZooRepoNotFoundError, ZooRevisionNotFoundError), match="no-such-tag|olah-zoo"):
        vitzoo.load(REPO, revision="no-such-tag", endpoint=olah["endpoint"], cache_dir=tmp_path / "c")
    with pytest.raises(ZooRepoNotFoundError):
        vitzoo.load("vitzoo-test/absent", endpoint=olah["endpoint"], cache_dir=tmp_path / "c")
