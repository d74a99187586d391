"""``data.source: hf:<org/name>`` end to end: the real loading code against a loopback Hub.

A small image dataset (PNG ``img`` column, ClassLabel ``fine_label``) is uploaded with the
unmodified ``HfApi`` client to ``tests/hub_server.py`` (a dataset repo, parquet files in LFS), then
``vitzoo.data.sources.load_splits`` and ``vitzoo generate`` read it through
``datasets.load_dataset`` in a subprocess whose ``HF_ENDPOINT`` is the server (``datasets`` reads
it at import time). Nothing in vitzoo is patched. The subprocess refuses DNS for any host other
than 127.0.0.1/localhost and reports what it refused: ``datasets`` asks its dataset viewer at
``datasets-server.<endpoint host>`` for exported infos and treats the failure as "no export".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest_hub import LOOPBACK_ONLY
from hub_server import HubServer
from zoo_factory import TOKEN

DS = "vitzoo-test/tiny-images"
"""Dataset card with ``configs`` (default: train/test; ``small``: the test file as its only split)."""
BARE = "vitzoo-test/bare-layout"
"""No README: splits from the standard ``data/<split>-xxxxx-of-xxxxx.parquet`` names."""
NAMES = ["red", "green", "blue"]
N_TRAIN_V1, N_TRAIN_V2, N_TEST = 32, 40, 12
TRAIN_FILE, TEST_FILE = "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"

CARD = """\
---
configs:
- config_name: default
  default: true
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: small
  data_files:
  - split: train
    path: data/test-*
dataset_info:
  features:
  - name: img
    dtype: image
  - name: fine_label
    dtype:
      class_label:
        names:
          '0': red
          '1': green
          '2': blue
---
# tiny-images

A few dozen 8x8 PNGs for vitzoo's tests.
"""

# Runs in the subprocess. Refuses name resolution for anything but the loopback (nothing leaves the
# machine whatever `datasets` tries) and records it; then either loads the given DataConfigs or runs
# the vitzoo CLI.
DRIVER = LOOPBACK_ONLY + textwrap.dedent('''\
    import hashlib, json, sys


    if sys.argv[1] == "cli":
        from vitzoo.cli import main
        rc = main(sys.argv[2:])
        print("BLOCKED=" + json.dumps(blocked))
        raise SystemExit(rc)

    import numpy as np
    from vitzoo.data.sources import load_splits
    from vitzoo.recipe import DataConfig

    def digest(ds):
        return [hashlib.sha1(np.asarray(r["image"]).tobytes()).hexdigest()[:12] + f":{r['label']}" for r in ds]

    out = {}
    for name, cfg in json.loads(sys.argv[2]).items():
        try:
            s = load_splits(DataConfig(**cfg))
        except Exception as e:
            out[name] = {"error": type(e).__name__, "message": str(e)}
            continue
        out[name] = {"sizes": [len(s.train), len(s.val), None if s.test is None else len(s.test)],
                     "label_names": s.label_names, "name": s.name,
                     "columns": s.train.column_names, "image_mode": s.train[0]["image"].mode,
                     "train": digest(s.train), "val": digest(s.val),
                     "test": None if s.test is None else digest(s.test)}
    print("RESULT=" + json.dumps({"cases": out, "blocked": blocked}))
''')


@dataclass
class HubDataset:
    hub: HubServer
    local: Path
    """The v1 files as uploaded (``data/train-...parquet``, ``data/test-...parquet``)."""
    v1_sha: str
    main_sha: str


def _make_split(n: int, seed: int):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = [i % len(NAMES) for i in range(n)]
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB") for _ in labels]
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"img": imgs, "fine_label": labels}, features=feats)


@pytest.fixture(scope="module")
def hub_dataset(tmp_path_factory) -> HubDataset:
    """A loopback Hub holding DS (tag v1: 32 train images; main: 40) and BARE, uploaded by HfApi."""
    from huggingface_hub import HfApi

    root = tmp_path_factory.mktemp("hf-dataset")
    v1, v2 = root / "v1", root / "v2"
    (v1 / "data").mkdir(parents=True)
    (v2 / "data").mkdir(parents=True)
    _make_split(N_TRAIN_V1, 1).to_parquet(v1 / TRAIN_FILE)
    _make_split(N_TEST, 2).to_parquet(v1 / TEST_FILE)
    _make_split(N_TRAIN_V2, 3).to_parquet(v2 / TRAIN_FILE)
    with pytest.MonkeyPatch.context() as mp:
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # LFS mode: no Xet CAS here
        hub = HubServer(lfs_mode=True, tokens={TOKEN: "tester"}, require_auth=True).start()
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        for repo in (DS, BARE):
            url = api.create_repo(repo, repo_type="dataset")
            assert url.repo_type == "dataset" and url.repo_id == repo
        api.upload_folder(folder_path=v1, repo_id=BARE, repo_type="dataset")
        (v1 / "README.md").write_text(CARD)
        v1_sha = api.upload_folder(folder_path=v1, repo_id=DS, repo_type="dataset").oid
        api.create_tag(DS, tag="v1", repo_type="dataset")
        main_sha = api.upload_file(path_or_fileobj=v2 / TRAIN_FILE, path_in_repo=TRAIN_FILE, repo_id=DS,
                                   repo_type="dataset").oid
    assert hub.repo(DS, repo_type="dataset").tags["v1"] == v1_sha != main_sha
    assert set(hub.files_at(DS, "v1", repo_type="dataset")) == {".gitattributes", "README.md", TRAIN_FILE, TEST_FILE}
    assert hub.repo(DS, repo_type="dataset").commits[main_sha].files[TRAIN_FILE].lfs  # parquet went through LFS
    assert DS not in hub.state.repos  # the dataset namespace is separate from models'
    yield HubDataset(hub, v1, v1_sha, main_sha)
    hub.stop()


def _env(hub: HubServer, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home / "hf-home"), HF_DATASETS_CACHE=str(home / "datasets"),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_UPDATE_DOWNLOAD_COUNTS="0",
               OMP_NUM_THREADS="1")
    return env


def _drive(hub: HubServer, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    driver = home / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run([sys.executable, str(driver), *args], env=_env(hub, home), capture_output=True,
                          text=True, timeout=120)


def _load(hub: HubServer, home: Path, cases: dict[str, dict]) -> tuple[dict[str, dict], list[str]]:
    proc = _drive(hub, home, "load", json.dumps(cases))
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT="))
    result = json.loads(line[len("RESULT="):])
    return result["cases"], result["blocked"]


def _hf(**kw) -> dict:
    return {"source": f"hf:{DS}", "image_column": "img", "label_column": "fine_label", "val_fraction": 0.25, **kw}


def _only_viewer_was_refused(blocked: list[str]) -> None:
    # `datasets` derives its dataset-viewer host from HF_ENDPOINT; anything else would be a leak.
    assert set(blocked) <= {"datasets-server.127.0.0.1"}, blocked


def test_load_splits_from_hub_dataset(hub_dataset: HubDataset, tmp_path: Path) -> None:
    hub = hub_dataset.hub
    hub.clear_log()
    cases = {
        "hub": _hf(),
        "hub_again": _hf(),  # served from the datasets cache: the same carve
        "local": {**_hf(), "source": f"parquet:{hub_dataset.local / 'data'}"},  # the same bytes, read locally
        "bare": {**_hf(), "source": f"hf:{BARE}"},
        "small": _hf(config="small", test_split=None),
        "v1": _hf(revision="v1"),
        "v1_sha": _hf(revision=hub_dataset.v1_sha),
        "main_sha": _hf(revision=hub_dataset.main_sha),
    }
    res, blocked = _load(hub, tmp_path, cases)
    errors = {k: v for k, v in res.items() if "error" in v}
    assert not errors, errors
    _only_viewer_was_refused(blocked)

    hub_ = res["hub"]
    n_val = -(-N_TRAIN_V2 // 4)  # train_test_split rounds the test share up
    assert hub_["sizes"] == [N_TRAIN_V2 - n_val, n_val, N_TEST]
    assert hub_["label_names"] == NAMES and hub_["name"] == DS
    assert hub_["columns"] == ["image", "label"] and hub_["image_mode"] == "RGB"
    assert res["hub_again"] == hub_
    # Deterministic carve: the Hub copy splits exactly like the same files read from disk.
    v1 = res["v1"]
    assert v1["sizes"] == [N_TRAIN_V1 - N_TRAIN_V1 // 4, N_TRAIN_V1 // 4, N_TEST]
    local = res["local"]
    assert {k: v1[k] for k in ("sizes", "label_names", "train", "val", "test")} == \
        {k: local[k] for k in ("sizes", "label_names", "train", "val", "test")}
    # Pins: tag and commit sha agree; main moved on; a card-less repo with the standard layout loads too.
    assert res["v1_sha"] == v1 and res["main_sha"] == hub_
    assert set(hub_["train"] + hub_["val"]).isdisjoint(v1["train"] + v1["val"]) and hub_["test"] == v1["test"]
    assert {k: res["bare"][k] for k in ("sizes", "train", "val", "test", "label_names")} == \
        {k: v1[k] for k in ("sizes", "train", "val", "test", "label_names")}
    assert res["bare"]["name"] == BARE
    # A named config: `small` has the test file as its only split.
    assert res["small"]["sizes"] == [N_TEST - N_TEST // 4, N_TEST // 4, None]
    assert sorted(res["small"]["train"] + res["small"]["val"]) == sorted(v1["test"])

    # What went over the wire: each distinct file content once. The hub cache stores blobs by ETag, so
    # README.md and the test file (unchanged between v1 and main) are fetched once for both revisions.
    got = hub.downloaded(DS, repo_type="dataset")
    assert sorted(got) == sorted(["README.md", TEST_FILE, TRAIN_FILE, TRAIN_FILE]), got
    assert sorted(hub.downloaded(BARE, repo_type="dataset")) == [TEST_FILE, TRAIN_FILE]
    assert not [r.path for r in hub.requests if r.path.startswith("/api/models/")]
    assert all(r.status < 500 for r in hub.requests)


def test_missing_column_split_repo_and_revision_are_clear_errors(hub_dataset: HubDataset, tmp_path: Path) -> None:
    res, blocked = _load(hub_dataset.hub, tmp_path, {
        "label": _hf(label_column="coarse_label"),
        "image": _hf(image_column="image"),
        "test_split": _hf(test_split="validation"),
        "val_split": _hf(val_split="valid"),
        "config": _hf(config="nope"),
        "repo": _hf(source="hf:vitzoo-test/no-such-dataset"),
        "revision": _hf(revision="v9"),
    })
    _only_viewer_was_refused(blocked)
    for case, key, needle in (("label", "data.label_column", "'coarse_label'"),
                              ("image", "data.image_column", "'image'"),
                              ("test_split", "data.test_split", "'validation'"),
                              ("val_split", "data.val_split", "'valid'")):
        err = res[case]
        assert err.get("error") == "DataError", (case, err)
        assert err["message"].startswith(key) and needle in err["message"], err
        assert f"hf:{DS}" in err["message"]
    assert "has: img, fine_label" in res["label"]["message"]
    assert "has: train, test" in res["test_split"]["message"]
    # Not vitzoo's own errors (they come from `datasets`), but they name what is wrong.
    assert "nope" in res["config"]["message"] and "small" in res["config"]["message"], res["config"]
    for case, needle in (("repo", "vitzoo-test/no-such-dataset"), ("revision", "v9"), ("config", "nope")):
        assert res[case]["error"] == "DataError" and res[case]["message"].startswith("data.source:"), res[case]
        assert needle in res[case]["message"], res[case]


def _recipe(path: Path, **data) -> Path:
    recipe = {
        "name": "hf-tiny", "seed": 0,
        "stages": {"pretrain": {
            "data": {"source": f"hf:{DS}", "image_column": "img", "label_column": "fine_label",
                     "val_fraction": 0.25, "revision": "v1", **data},
            "model": {"variant": "micro", "img_size": 16},
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "epochs": 1, "batch_size": 16,
            "grid": {"objective": ["supervised"]},
            "seeds": {"init": [0]},
        }},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_generate_trains_on_a_hub_dataset(hub_dataset: HubDataset, tmp_path: Path) -> None:
    hub = hub_dataset.hub
    hub.clear_log()
    out = tmp_path / "zoo"
    proc = _drive(hub, tmp_path, "cli", "generate", str(_recipe(tmp_path / "hf.yaml")), "--out", str(out),
                  "--no-progress")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _only_viewer_was_refused(json.loads(proc.stdout.split("BLOCKED=")[-1].splitlines()[0]))
    runs = [json.loads(p.read_text()) for p in out.glob("models/*/run.json")]
    assert len(runs) == 1
    run = runs[0]
    assert run["dataset"] == DS and run["num_classes"] == len(NAMES)
    assert run["config"]["data"]["revision"] == "v1"
    assert sorted(hub.downloaded(DS, repo_type="dataset")) == ["README.md", TEST_FILE, TRAIN_FILE]
    # Every request resolved the tag to the pinned commit: nothing of main was read.
    commits = {r.path.split("/resolve/")[1].split("/")[0] for r in hub.requests if "/resolve/" in r.path}
    assert commits <= {"v1", hub_dataset.v1_sha}, commits

    import vitzoo

    zoo = vitzoo.load(out)
    assert len(zoo) == 1


def test_generate_names_the_missing_column(hub_dataset: HubDataset, tmp_path: Path) -> None:
    proc = _drive(hub_dataset.hub, tmp_path, "cli", "generate",
                  str(_recipe(tmp_path / "bad.yaml", label_column="label")), "--out", str(tmp_path / "z"),
                  "--no-progress")
    assert proc.returncode == 3, proc.stderr[-4000:]  # a data error (vitzoo.errors.EXIT_CODES)
    assert "data.label_column: column 'label' not in hf:vitzoo-test/tiny-images:train" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_revision_pin_is_never_silently_replaced(hub_dataset: HubDataset, tmp_path: Path) -> None:
    """A pinned commit yields that commit's data or an error, never another revision's data.

    The loaded split's cache directory is named after the commit it was built from
    (``<cache>/<org>___<name>/<config>/0.0.0/<commit>/``); vitzoo checks it after loading (sources._check_pin).
    """
    hub = hub_dataset.hub
    res, _ = _load(hub, tmp_path, {"v1": _hf(revision="v1")})  # the cache now holds v1 only
    pinned = _hf(revision=hub_dataset.main_sha)
    # The Hub refuses for a moment (403; a 5xx or a refused connection does the same after ~25 s of retries).
    hub.fail("HEAD", rf"^/datasets/{DS}/resolve/", status=403, times=1000)
    try:
        during_outage, _ = _load(hub, tmp_path, {"main": pinned})
    finally:
        with hub.state.lock:
            hub.state.failures.clear()
    env = _env(hub, tmp_path)
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), "load", json.dumps({"main": pinned})],
                          env=env, capture_output=True, text=True, timeout=120)
    offline = json.loads(proc.stdout.split("RESULT=")[-1])["cases"]
    for got in (during_outage["main"], offline["main"]):
        assert "error" in got or got["train"] + got["val"] != res["v1"]["train"] + res["v1"]["val"], \
            "a pin on main's commit was answered with v1's data"
