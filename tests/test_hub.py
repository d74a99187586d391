"""Push a zoo to a loopback Hub and load it back with the unmodified huggingface_hub client.

Every test talks HTTP to ``tests/hub_server.py`` on 127.0.0.1; assertions about what was sent or
fetched read the server's request log, so "lazy" and "resumed" are measured, not assumed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from zoo_factory import TOKEN, tree_bytes, write_test_zoo

import vitzoo
from vitzoo.hub import (
    HubError,
    HubSource,
    PushInProgressError,
    ZooFileNotFoundError,
    ZooIndexMismatchError,
    ZooRepoNotFoundError,
    ZooRevisionNotFoundError,
    push,
    verify_zoo,
)

pytest_plugins = ["conftest_hub"]  # fixtures: hub, lfs_hub, hf_cache, make_zoo

REPO = "vitzoo-test/tiny-zoo"
META = {"index.parquet", "zoo.json", "recipe.yaml", "README.md"}


def _remote(server, revision: str = "main") -> dict[str, bytes]:
    files = server.files_at(REPO, revision)
    files.pop(".gitattributes", None)  # created by the Hub with the repo, not part of the zoo
    return files


def _pushable(zoo: Path, exclude_models: list[str] = ()) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(zoo).items()
            if not any(k.startswith(f"models/{m}/") for m in exclude_models)}


def test_push_then_download_is_byte_identical(hub, hf_cache, make_zoo):
    zoo = make_zoo(n_models=3, n_unfinished=1)
    result = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert result.tag == "v1" and result.partial
    assert len(result.pushed_models) == 3 and len(result.unfinished_models) == 1
    assert "1 unfinished models" in str(result)
    unfinished = result.unfinished_models
    assert _remote(hub) == _pushable(zoo, unfinished)
    assert not any(".partial" in p for p in hub.files_at(REPO))
    assert {t.name for t in _api(hub).list_repo_refs(REPO).tags} == {"v1"}

    src = HubSource(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)
    assert src.resolved_revision == result.commit
    assert sorted(p.name for p in src.snapshot_dir.iterdir()) == sorted(META)  # nothing else eagerly
    for rel, data in _pushable(zoo, unfinished).items():
        assert src.local_path(rel).read_bytes() == data, rel
    with pytest.raises(ZooFileNotFoundError):
        src.local_path(f"models/{unfinished[0]}/run.json")


def _api(server):
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.endpoint, token=TOKEN)


def test_load_at_tag_branch_and_sha(hub, hf_cache, make_zoo):
    zoo = make_zoo(n_models=2)
    first = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    write_test_zoo(zoo, n_models=4)  # two more models finished: a new zoo version
    second = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    again = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)  # unchanged: same commit, same tag
    assert (first.tag, second.tag, again.tag) == ("v1", "v2", "v2") and not again.changed
    dev = push(zoo, REPO, revision="dev", tag="dev-snapshot", token=TOKEN, endpoint=hub.endpoint)
    assert dev.revision == "dev" and dev.tag == "dev-snapshot"

    kw = {"endpoint": hub.endpoint, "cache_dir": hf_cache}
    assert len(vitzoo.load(REPO, revision="v1", **kw)) == 2
    assert len(vitzoo.load(REPO, revision=first.commit, **kw)) == 2
    assert len(vitzoo.load(REPO, revision="v2", **kw)) == 4
    assert len(vitzoo.load(REPO, revision="dev", **kw)) == 4
    z = vitzoo.load(REPO, **kw)
    assert len(z) == 4 and z.source.resolved_revision == second.commit
    assert _remote(hub, "v1")["index.parquet"] == _remote(hub, first.commit)["index.parquet"]


def test_filtered_load_fetches_only_selected_models(hub, hf_cache, make_zoo):
    zoo = make_zoo(n_models=4)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    hub.clear_log()
    z = vitzoo.load(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)
    assert set(hub.downloaded(REPO)) == META  # the index and cards first, no weights
    ids = z.model_ids()
    sub = z.filter(model_id=ids[1], epochs=(0, 1))
    sd = sub.state_dict(ids[1], epoch=1)
    sd_final = z.state_dict(ids[1])
    assert sd["fc1.weight"].shape == (8, 4) and sd_final.keys() == sd.keys()
    fetched = set(hub.downloaded(REPO)) - META
    # the selected model's weights (and its small config.json, for the module order), nothing of any other model
    assert fetched - {f"models/{ids[1]}/config.json"} == {f"models/{ids[1]}/checkpoints.safetensors",
                                                          f"models/{ids[1]}/model.safetensors"}
    # a second load comes from the cache: no file content downloaded again
    hub.clear_log()
    z2 = vitzoo.load(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)
    z2.state_dict(ids[1], epoch=1)
    assert hub.downloaded(REPO) == []


def test_works_offline_from_cache(hub, hf_cache, make_zoo):
    zoo = make_zoo(n_models=2)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    for rev in ("v1", None):  # the cache maps each revision name it has seen to a commit
        z = vitzoo.load(REPO, revision=rev, endpoint=hub.endpoint, cache_dir=hf_cache)
    ids = z.model_ids()
    z.state_dict(ids[0])
    hub.clear_log()
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: check in a fresh interpreter.
    code = textwrap.dedent(f"""
        import vitzoo
        from vitzoo.hub import ZooFileNotFoundError
        for rev in ("v1", None):
            z = vitzoo.load({REPO!r}, revision=rev, endpoint={hub.endpoint!r}, cache_dir={str(hf_cache)!r})
            assert len(z) == 2
            z.state_dict({ids[0]!r})
        try:
            z.state_dict({ids[1]!r})
        except ZooFileNotFoundError as e:
            print("OFFLINE-MISS", e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OFFLINE-MISS" in out.stdout and "offline" in out.stdout
    assert hub.requests == []


def test_resume_after_failed_commit_resends_nothing_uploaded(lfs_hub, hf_cache, make_zoo):
    hub = lfs_hub
    zoo = make_zoo(n_models=3)
    hub.fail("POST", r"/commit/main$", status=500, message="simulated crash before commit")
    with pytest.raises(HubError, match="simulated crash"):
        push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)  # renders cards + plots, then uploads
    lfs_files = {p for p in tree_bytes(zoo) if p.endswith((".safetensors", ".parquet", ".png"))}
    first = hub.uploaded_lfs()
    assert len(first) == len(lfs_files)  # every LFS object reached the server before the crash
    hub.clear_log()
    result = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.uploaded_lfs() == []  # resumed: no LFS byte sent twice
    assert _remote(hub) == _pushable(zoo)
    assert result.tag == "v1"
    assert len(hub.committed_paths(REPO)) == 1  # one commit for the whole zoo (Xet off)


def test_resume_after_interrupted_lfs_uploads(lfs_hub, hf_cache, make_zoo):
    hub = lfs_hub
    zoo = make_zoo(n_models=3)
    hub.fail("PUT", r"/__lfs/upload/", status=403, times=2, message="simulated network loss")
    with pytest.raises(HubError):
        push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    done_before = set(hub.uploaded_lfs())
    hub.clear_log()
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    resent = set(hub.uploaded_lfs())
    assert done_before and resent  # the interruption really happened mid-way
    assert not (done_before & resent), "an object finished before the interruption was sent again"
    assert _remote(hub) == _pushable(zoo)


def test_repush_of_growing_zoo_sends_only_new_files(hub, hf_cache, make_zoo):
    zoo = make_zoo(n_models=2, n_unfinished=2)
    first = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    old = first.pushed_models
    write_test_zoo(zoo, n_models=4)  # the two unfinished runs finish
    hub.clear_log()
    second = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert not second.partial and second.tag == "v2"
    sent = [p for commit in hub.committed_paths(REPO) for p in commit]
    assert sent and not any(p.startswith(tuple(f"models/{m}/" for m in old)) for p in sent), sent
    assert {p.split("/")[1] for p in sent if p.startswith("models/")} == set(first.unfinished_models)
    assert _remote(hub) == _pushable(zoo)


def test_refuses_zoo_whose_index_does_not_match(hub, make_zoo):
    zoo = make_zoo(n_models=2)
    ids = sorted(p.name for p in (zoo / "models").iterdir())
    target = zoo / "models" / ids[0] / "checkpoints.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different sha256
    target.write_bytes(bytes(data))
    with pytest.raises(ZooIndexMismatchError, match=f"models/{ids[0]}/checkpoints.safetensors.*sha256"):
        push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    (zoo / "models" / ids[1] / "model.safetensors").unlink()
    with pytest.raises(ZooIndexMismatchError, match=f"models/{ids[1]}/model.safetensors.*missing"):
        verify_zoo(zoo)
    assert hub.requests == []  # refused before any network traffic


def test_unknown_repo_revision_and_file(hub, hf_cache, make_zoo):
    push(make_zoo(n_models=1), REPO, token=TOKEN, endpoint=hub.endpoint)
    kw = {"endpoint": hub.endpoint, "cache_dir": hf_cache}
    with pytest.raises(ZooRepoNotFoundError, match="vitzoo-test/nope"):
        vitzoo.load("vitzoo-test/nope", **kw)
    with pytest.raises(ZooRevisionNotFoundError, match="'v9'"):
        vitzoo.load(REPO, revision="v9", **kw)
    with pytest.raises(ZooFileNotFoundError, match="no/such.file"):
        HubSource(REPO, **kw).local_path("no/such.file")


def test_private_repo_and_token_never_leak(hub, hf_cache, make_zoo, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    zoo = make_zoo(n_models=1)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, private=True)
    with pytest.raises(ZooRepoNotFoundError):  # anonymous: the private repo is invisible
        HubSource(REPO, endpoint=hub.endpoint, cache_dir=hf_cache, token=False)
    src = HubSource(REPO, endpoint=hub.endpoint, cache_dir=hf_cache, token=TOKEN)
    assert src.local_path("index.parquet").is_file()
    bad = "hf_WrongTokenAlsoSecret9876543210zz"
    with pytest.raises(HubError) as info:
        push(zoo, "vitzoo-test/other", token=bad, endpoint=hub.endpoint)
    texts = [str(info.value), repr(info.value), caplog.text, *capsys.readouterr()]
    for text in texts:
        assert TOKEN not in text and bad not in text
    assert all(r.authorized for r in hub.requests if r.method in ("POST", "PUT") and r.status == 200
               and "/__lfs/" not in r.path)


def test_only_one_process_pushes(hub, make_zoo):
    from filelock import FileLock

    zoo = make_zoo(n_models=1)
    other = FileLock(zoo / ".vitzoo-push.lock", timeout=0)  # another lock object: what a second pusher holds
    other.acquire()
    try:
        with pytest.raises(PushInProgressError, match="another process is pushing"):
            push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    finally:
        other.release()
    assert not hub.requests, "refused before any request"
    assert push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint).tag == "v1"
    assert not {".vitzoo-push.lock", ".vitzoo-push.pid"} & set(hub.files_at(REPO))


def test_push_lock_held_by_another_process_fails_fast(hub, make_zoo):
    zoo = make_zoo(n_models=1)
    holder = textwrap.dedent(f"""
        import sys
        from vitzoo.hub import _push_lock
        from pathlib import Path
        with _push_lock(Path({str(zoo)!r})):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(PushInProgressError, match=f"held by pid {proc.pid}"):
            push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    finally:
        proc.communicate("done\n", timeout=60)
    assert proc.returncode == 0
    assert push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint).tag == "v1", "the lock is free once the holder ends"


def test_hub_module_imports_without_fcntl():
    """Windows has no fcntl: importing vitzoo, its Hub module and the CLI must not need it."""
    code = "import sys; sys.modules['fcntl'] = None\nimport vitzoo, vitzoo.hub, vitzoo.cli\nprint('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_cli_push(hub, make_zoo, monkeypatch, capsys):
    from vitzoo.cli import main

    zoo = make_zoo(n_models=1, n_unfinished=1)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual place for a token
    assert main(["push", str(zoo), REPO, "--tag", "first", "--endpoint", hub.endpoint]) == 0
    out = capsys.readouterr().out
    assert "tag first" in out and "1 unfinished" in out and TOKEN not in out
    (zoo / "index.parquet").unlink()
    assert main(["push", str(zoo), REPO, "--endpoint", hub.endpoint]) == 3  # a data error (vitzoo.errors.EXIT_CODES)
    assert "index.parquet" in capsys.readouterr().err


def test_server_resolve_headers_and_ranges(lfs_hub, make_zoo):
    """The server behaves like the Hub where the client relies on it (redirect, linked etag, ranges)."""
    hub = lfs_hub
    zoo = make_zoo(n_models=1)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    rel = next(p for p in tree_bytes(zoo) if p.endswith("model.safetensors"))
    data = (zoo / rel).read_bytes()
    head = _http("HEAD", f"{hub.endpoint}/{REPO}/resolve/main/{rel}")
    assert head.status == 302 and head.headers["X-Linked-Size"] == str(len(data))
    assert head.headers["X-Repo-Commit"] and head.headers["Location"].startswith(hub.cdn_endpoint)
    part = _http("GET", head.headers["Location"], {"Range": "bytes=8-15"})
    assert part.status == 206 and part.body == data[8:16]
    meta = _http("GET", f"{hub.endpoint}/{REPO}/resolve/main/zoo.json")
    assert json.loads(meta.body) == json.loads((zoo / "zoo.json").read_text())
    missing = _http("HEAD", f"{hub.endpoint}/{REPO}/resolve/main/nope")
    assert missing.status == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


class _Reply:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body


def _http(method: str, url: str, headers: dict[str, str] | None = None) -> _Reply:
    """One request without following redirects (the standard library only: tests import declared
    dependencies alone, and the test server's 302 is what is checked)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), headers=headers or {})
        r = conn.getresponse()
        return _Reply(r.status, r.headers, r.read())
    finally:
        conn.close()
