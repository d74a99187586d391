"""``Zoo.download(view)``: a filtered view in one parallel ``snapshot_download``, each file hashed once.

Against the loopback Hub (``tests/hub_server.py``) with the unmodified client: the number of
``snapshot_download`` calls is counted by wrapping the client's own function, what was fetched is
read from the server's request log, and hashing is counted by wrapping the reader's sha256.
"""

from __future__ import annotations

import pytest
import torch
from zoo_factory import TOKEN

import vitzoo
from vitzoo.errors import ZooError
from vitzoo.hub import ZooFileNotFoundError, push

pytest_plugins = ["conftest_hub"]  # fixtures: hub, lfs_hub, hf_cache, make_zoo

REPO = "vitzoo-test/tiny-zoo"


@pytest.fixture(autouse=True)
def _test_mlp_order(monkeypatch):
    """The test zoo's tiny tensors belong to no vitzoo architecture: flat vectors use their names' order."""
    from vitzoo.zoo import weights

    monkeypatch.setattr(weights, "param_order", lambda zoo, model_id: ["fc1.bias", "fc1.weight", "head.bias",
                                                                       "head.weight"])


@pytest.fixture
def counted(monkeypatch):
    """Counts of ``huggingface_hub.snapshot_download`` / ``hf_hub_download`` calls made by vitzoo, and
    of files hashed by the reader (the real functions still run)."""
    import huggingface_hub

    import vitzoo.zoo.reader as reader

    calls = {"snapshot": [], "single": [], "hashed": []}
    real_snapshot, real_single, real_sha = (huggingface_hub.snapshot_download, huggingface_hub.hf_hub_download,
                                            reader.sha256_file)

    def snapshot(*args, **kwargs):
        calls["snapshot"].append(kwargs)
        return real_snapshot(*args, **kwargs)

    def single(*args, **kwargs):
        calls["single"].append(args[1] if len(args) > 1 else kwargs.get("filename"))
        return real_single(*args, **kwargs)

    def sha(path, *args, **kwargs):
        calls["hashed"].append(str(path))
        return real_sha(path, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", single)
    monkeypatch.setattr(reader, "sha256_file", sha)
    return calls


def test_view_downloads_in_one_snapshot_call_and_hashes_once(lfs_hub, hf_cache, make_zoo, counted):
    hub = lfs_hub
    zoo = make_zoo(n_models=5)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    z = vitzoo.load(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)
    ids = z.model_ids()
    view = z.filter(model_id=ids[1:4])  # 3 of the 5 models, every saved state
    counted["snapshot"].clear()
    hub.clear_log()

    root = z.download(view, max_workers=4)

    assert len(counted["snapshot"]) == 1 and counted["single"] == []  # the whole view in one call
    call = counted["snapshot"][0]
    assert call["revision"] == z.source.resolved_revision and call["max_workers"] == 4
    want = {f"models/{m}/{f}" for m in ids[1:4]
            for f in ("model.safetensors", "checkpoints.safetensors", "config.json", "run.json")}
    assert set(call["allow_patterns"]) == want
    assert sorted(hub.downloaded(REPO)) == sorted(want)  # exactly those files, each once, nothing of other models
    assert all((root / rel).is_file() for rel in want)
    weight_files = {r for r in want if r.endswith(".safetensors")}
    assert len(counted["hashed"]) == len(weight_files)  # each weight file hashed once, after the download

    hub.clear_log()
    flat, rows = view.weights_batch()  # every state of the view: no request, no second hash
    assert flat.shape[0] == len(view.index) == 9 and set(rows["model_id"]) == set(ids[1:4])
    for m in ids[1:4]:
        z.state_dict(m, epoch=1)  # the parent Zoo shares what its views verified
    assert hub.requests == [] and len(counted["hashed"]) == len(weight_files)

    assert z.download(view) == root and len(counted["snapshot"]) == 1  # all cached: not even a snapshot call


def test_batch_of_a_hub_view_fetches_in_one_call(hub, hf_cache, make_zoo, counted):
    """weights_batch/layer_stats on a Hub view download through Zoo.download, not file by file."""
    zoo = make_zoo(n_models=3)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    z = vitzoo.load(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)
    counted["snapshot"].clear()
    view = z.filter(final=True)
    flat, _ = view.weights_batch()
    assert len(counted["snapshot"]) == 1 and counted["single"] == []
    stats = view.layer_stats()
    assert len(stats) == 3 and len(counted["snapshot"]) == 1
    assert len(counted["hashed"]) == 3  # the three model.safetensors, once each
    local = vitzoo.load(zoo).filter(final=True).weights_batch()[0]
    assert torch.equal(flat, local)


def test_corrupted_download_is_reported_naming_the_file(lfs_hub, hf_cache, make_zoo):
    hub = lfs_hub
    zoo = make_zoo(n_models=3)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    z = vitzoo.load(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)
    ids = z.model_ids()
    bad = f"models/{ids[2]}/checkpoints.safetensors"
    sha = z.index.loc[z.index["file"] == bad, "sha256"].iloc[0]
    blob = bytearray(hub.state.blobs[sha])
    blob[-1] ^= 0xFF  # the storage hands out other bytes of the same size: the client cannot tell
    hub.state.blobs[sha] = bytes(blob)

    with pytest.raises(ZooError, match=f"1 of 6 downloaded files do not match the index: {bad}: sha256") as err:
        z.download(max_workers=3)
    assert "corrupt" in str(err.value) and "delete it to download it again" in str(err.value)
    assert f"models/{ids[0]}/" not in str(err.value)
    z.state_dict(ids[0])  # the good files were verified and stay usable
    with pytest.raises(ZooError, match=bad):  # the bad one is never used
        z.state_dict(ids[2], epoch=0)
    with pytest.raises(ZooError, match=bad):  # nor verified by a later call
        z.filter(model_id=ids[2]).download()


def test_missing_file_and_local_zoo(hub, hf_cache, make_zoo, counted):
    zoo = make_zoo(n_models=2)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)
    z = vitzoo.load(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)
    with pytest.raises(ZooFileNotFoundError, match="models/nope/x.safetensors is not in zoo"):
        z.source.local_paths(["models/nope/x.safetensors", "zoo.json"])

    local = vitzoo.load(zoo)  # a folder: nothing to fetch, the files are verified all the same
    counted["hashed"].clear()
    assert local.download(max_workers=2) == zoo
    assert len(counted["hashed"]) == 4 and local.filter(final=True).download() == zoo
    assert len(counted["hashed"]) == 4
    target = zoo / "models" / local.model_ids()[0] / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ZooError, match=f"models/{local.model_ids()[0]}/model.safetensors: sha256"):
        vitzoo.load(zoo).download()
    with pytest.raises(ZooError, match="another zoo"):
        local.download(z)
