"""``vitzoo push --index-dataset``: the zoo's index as a dataset repo, and index.parquet format 2.

The dataset is pushed with the unmodified ``huggingface_hub`` client to the loopback Hub
(``tests/hub_server.py``) and read back with the real ``datasets.load_dataset`` in a subprocess
whose ``HF_ENDPOINT`` is the server: ``datasets`` copies ``HF_ENDPOINT`` into module constants
(``datasets.config.HF_ENDPOINT``, ``HUB_DATASETS_URL``) when it is imported, and the server's port is
only known once it runs, so an in-process ``load_dataset`` would need several constants of two
libraries patched; a fresh interpreter uses the library exactly as a user does
(as tests/test_hf_datasets.py does). The subprocess refuses DNS for anything but the loopback.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest_hub import LOOPBACK_ONLY
from zoo_factory import TOKEN, write_test_zoo

import vitzoo
from vitzoo.hub import HubError, push
from vitzoo.zoo.index import (
    LIST_FORMAT_VERSION,
    as_list,
    build_index,
    index_bytes,
    index_format,
    read_index,
    write_index,
)
from vitzoo.zoo.io import FORMAT_VERSION

pytest_plugins = ["conftest_hub"]  # fixtures: hub, lfs_hub, hf_cache, make_zoo

REPO = "vitzoo-test/tiny-zoo"
DS = "vitzoo-test/tiny-zoo-index"
LISTS = {"aug": {"ops": ["flip", "crop"]}, "model": {"variant": "tiny", "img_size": [16, 16]}}
"""Run config fields that are lists: list columns ``aug.ops`` (strings) and ``model.img_size`` (ints)."""

DRIVER = LOOPBACK_ONLY + textwrap.dedent('''\
    import json, sys


    import datasets

    out = {}
    for name, kwargs in json.loads(sys.argv[1]).items():
        ds = datasets.load_dataset(**kwargs)
        out[name] = {"rows": ds.to_dict(), "features": {k: repr(v) for k, v in
                     ds.features.items()}, "num_rows": ds.num_rows}
    print("RESULT=" + json.dumps({"cases": out, "blocked": blocked}, default=str))
''')


def _load_dataset(hub, home: Path, cases: dict[str, dict]) -> dict[str, dict]:
    """Run ``datasets.load_dataset(**kwargs)`` for each case in a fresh interpreter pointed at ``hub``."""
    driver = home / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home / "hf-home"), HF_DATASETS_CACHE=str(home / "datasets"),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_UPDATE_DOWNLOAD_COUNTS="0", HF_TOKEN=TOKEN,
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver), json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT="))[len("RESULT="):])
    # `datasets` asks its viewer at datasets-server.<endpoint host> for exported infos; nothing else may leak
    assert set(result["blocked"]) <= {"datasets-server.127.0.0.1"}, result["blocked"]
    return result["cases"]


def _same_rows(loaded: dict[str, list], index: pd.DataFrame) -> None:
    assert set(loaded) == set(index.columns)
    for col in ("model_id", "epoch", "file", "sha256", "final", "grid_factors", "aug.ops", "model.img_size"):
        assert [as_list(v) if col in ("grid_factors", "aug.ops", "model.img_size") else v
                for v in loaded[col]] == index[col].tolist(), col
    assert loaded["test_acc"] == pytest.approx(index["test_acc"].tolist())


def test_push_index_dataset_then_load_dataset(lfs_hub, hf_cache, make_zoo, tmp_path, monkeypatch, capsys):
    """The acceptance path: `vitzoo push --index-dataset`, then `datasets.load_dataset(<repo>-index)`."""
    from vitzoo.cli import main

    hub = lfs_hub
    zoo = make_zoo(n_models=3, config=LISTS)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(zoo), REPO, "--endpoint", hub.endpoint, "--index-dataset"]) == 0
    out = capsys.readouterr().out
    assert f"index dataset {DS}@main: 9 rows in index.parquet" in out and "tag v1" in out

    files = hub.files_at(DS, repo_type="dataset")
    assert set(files) == {".gitattributes", "README.md", "index.parquet"}
    assert hub.repo(DS, repo_type="dataset").commits[hub.repo(DS, repo_type="dataset").branches["main"]] \
        .files["index.parquet"].lfs  # a parquet file goes through LFS, as on the Hub
    published = pq.read_schema(io.BytesIO(files["index.parquet"]))
    assert str(published.field("grid_factors").type) == "list<element: string>"  # native lists, whatever the zoo's format
    if index_format(zoo / "index.parquet")["format_version"] >= LIST_FORMAT_VERSION:
        assert files["index.parquet"] == (zoo / "index.parquet").read_bytes()  # the zoo's own file, byte for byte
    assert hub.repo(DS, repo_type="dataset").tags["v1"] == hub.repo(DS, repo_type="dataset").branches["main"]

    from huggingface_hub import DatasetCard

    card = DatasetCard(files["README.md"].decode())
    assert card.data.configs == [{"config_name": "index", "data_files": [{"split": "train", "path": "index.parquet"}],
                                  "default": True}]
    zoo_commit = hub.repo(REPO).branches["main"]
    assert card.data.vitzoo == {"zoo": REPO, "zoo_revision": "v1", "zoo_commit": zoo_commit,
                                "index_format_version": 2}
    assert f"[{REPO}]({hub.endpoint}/{REPO})" in card.text  # linked back to the zoo repo
    assert f'load_dataset("{DS}", split="train")' in card.text

    # zoo.json records the dataset (pushed with the zoo, so the zoo card can link it)
    info = json.loads(hub.files_at(REPO)["zoo.json"])
    assert info["index_dataset"] == {"repo_id": DS, "repo_type": "dataset", "url": f"{hub.endpoint}/datasets/{DS}",
                                     "config": "index", "split": "train", "files": ["index.parquet"]}

    index = read_index(zoo / "index.parquet")
    loaded = _load_dataset(hub, tmp_path, {"default": {"path": DS, "split": "train"},
                                           "pinned": {"path": DS, "name": "index", "split": "train", "revision": "v1"}})
    for case in loaded.values():
        assert case["num_rows"] == len(index) == 9
        _same_rows(case["rows"], index)
        assert "List(Value('string'))" in case["features"]["grid_factors"]  # a native list, not a JSON string
        assert "List(Value('int64'))" in case["features"]["model.img_size"]


def test_repush_is_idempotent_and_named_dataset(hub, hf_cache, make_zoo, caplog):
    zoo = make_zoo(n_models=2)
    first = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset="vitzoo-test/browse")
    assert first.index_dataset.repo_id == "vitzoo-test/browse" and first.index_dataset.tag == "v1"
    again = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset="vitzoo-test/browse")
    assert not again.changed and not again.index_dataset.changed  # same zoo: same card, nothing committed
    assert "nothing changed" in str(again.index_dataset)

    write_test_zoo(zoo, n_models=3)  # one more model: zoo v2, and the dataset follows with tag v2
    third = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset="vitzoo-test/browse")
    assert third.tag == "v2" and third.index_dataset.tag == "v2" and third.index_dataset.rows == 9
    ds = hub.repo("vitzoo-test/browse", repo_type="dataset")
    assert set(ds.tags) == {"v1", "v2"} and ds.tags["v2"] == third.index_dataset.commit != ds.tags["v1"]
    assert len(read_index(io.BytesIO(hub.files_at("vitzoo-test/browse", "v1", repo_type="dataset")["index.parquet"]))) == 6

    caplog.set_level("WARNING", logger="vitzoo.hub")
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint)  # without the flag: zoo.json keeps the link, with a warning
    assert "does not update" in caplog.text and "vitzoo-test/browse" in caplog.text
    with pytest.raises(ValueError, match="org/name"):
        push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset="not a repo id")


def test_analysis_table_is_a_second_config(hub, hf_cache, make_zoo, tmp_path):
    zoo = make_zoo(n_models=2)
    index = read_index(zoo / "index.parquet")
    analysis = index[index["final"]][["model_id", "test_acc"]].assign(rank=[1, 2])
    analysis.to_parquet(zoo / "analysis.parquet", index=False)
    result = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset=True)
    assert result.index_dataset.files == ["README.md", "index.parquet", "analysis.parquet"]
    from huggingface_hub import DatasetCard

    card = DatasetCard(hub.files_at(DS, repo_type="dataset")["README.md"].decode())
    assert [c["config_name"] for c in card.data.configs] == ["index", "analysis"]
    loaded = _load_dataset(hub, tmp_path, {"analysis": {"path": DS, "name": "analysis", "split": "train"},
                                           "index": {"path": DS, "split": "train"}})
    assert loaded["analysis"]["rows"]["model_id"] == analysis["model_id"].tolist()
    assert loaded["index"]["num_rows"] == len(index)
    (zoo / "analysis.parquet").unlink()  # gone from the zoo: gone from the dataset, and from its card
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset=True)
    assert set(hub.files_at(DS, repo_type="dataset")) == {".gitattributes", "README.md", "index.parquet"}


def test_dataset_failure_after_zoo_push_is_reported_and_retried(hub, hf_cache, make_zoo):
    zoo = make_zoo(n_models=1)
    hub.fail("POST", rf"^/api/datasets/{DS}/commit/main$", status=400, message="simulated dataset outage")
    with pytest.raises(HubError, match="(?s)the zoo itself was pushed.*simulated dataset outage"):
        push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset=True)
    assert "index.parquet" in hub.files_at(REPO) and "index.parquet" not in hub.files_at(DS, repo_type="dataset")
    result = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset=True)  # the retry: zoo unchanged
    assert not result.changed and result.index_dataset.changed and result.index_dataset.tag == "v1"


# ---------------------------------------------------------------- index.parquet format 2
def test_list_columns_are_native_parquet_lists(make_zoo):
    zoo = make_zoo(n_models=2, config={**LISTS, "mixed": [1, "a"], "empty": []})
    from vitzoo.zoo.writer import RunWriter  # a field that is a list in one run and a scalar in another

    info = json.loads((zoo / "models" / "pretrain-0000000001" / "run.json").read_text())
    info["config"]["either"], other = 3, zoo / "models" / "pretrain-0000000000" / "run.json"
    (zoo / "models" / "pretrain-0000000001" / "run.json").write_text(json.dumps(info))
    info = json.loads(other.read_text())
    info["config"]["either"] = [1, 2]
    other.write_text(json.dumps(info))
    assert RunWriter(zoo, "pretrain-0000000000").is_finished()
    (zoo / "index.parquet").write_bytes(index_bytes(build_index(zoo), 2))  # format 2, whatever write_index writes
    schema = pq.read_schema(zoo / "index.parquet")
    assert str(schema.field("grid_factors").type) == "list<element: string>"
    assert str(schema.field("aug.ops").type) == "list<element: string>"
    assert str(schema.field("model.img_size").type) == "list<element: int64>"
    assert str(schema.field("empty").type) == "list<element: string>"  # not list<null>
    fmt = index_format(zoo / "index.parquet")
    assert fmt["format_version"] == 2
    assert fmt["json_columns"] == ["mixed", "either"]  # no single parquet type: JSON, and said so
    raw = pd.read_parquet(zoo / "index.parquet")  # any parquet reader sees lists (pandas: arrays)
    assert list(raw["aug.ops"].iloc[0]) == ["flip", "crop"]
    index = read_index(zoo / "index.parquet")  # vitzoo hands back Python lists everywhere
    assert index["grid_factors"].iloc[0] == ["optimizer.lr"] and index["model.img_size"].iloc[0] == [16, 16]
    assert index["mixed"].iloc[0] == [1, "a"] and index["empty"].iloc[0] == []
    assert index["either"].tolist() == ["[1, 2]"] * 3 + ["3"] * 3  # lists and scalars: every cell JSON
    z = vitzoo.load(zoo)
    assert z.index["aug.ops"].iloc[0] == ["flip", "crop"]
    assert len(z.filter(grid_factors="optimizer.lr")) == 2  # a scalar: rows whose list contains it
    assert len(z.filter(**{"model.img_size": [16, 16]})) == 2  # a list: rows with that list
    assert len(z.filter(**{"aug.ops": "rotate"})) == 0
    ds = z.to_dataset()
    assert ds[0]["aug.ops"] == ["flip", "crop"]


def _as_format_1(zoo: Path) -> None:
    """Rewrite index.parquet as vitzoo 0.1 did: list cells as JSON strings, no vitzoo metadata."""
    df = read_index(zoo / "index.parquet")
    for col in ("grid_factors", "aug.ops", "model.img_size"):
        df[col] = [json.dumps(v) for v in df[col]]
    df.to_parquet(zoo / "index.parquet", index=False)
    assert index_format(zoo / "index.parquet") == {"format_version": 1}


def test_format_1_zoo_still_reads_and_publishes_native_lists(hub, hf_cache, make_zoo, tmp_path):
    zoo = make_zoo(n_models=2, config=LISTS)
    new = read_index(zoo / "index.parquet")
    _as_format_1(zoo)
    assert pd.read_parquet(zoo / "index.parquet")["grid_factors"].iloc[0] == '["optimizer.lr"]'
    old = read_index(zoo / "index.parquet")
    for col in ("grid_factors", "aug.ops", "model.img_size"):
        assert old[col].tolist() == new[col].tolist(), col
    z = vitzoo.load(zoo)
    assert z.index["aug.ops"].iloc[0] == ["flip", "crop"] and len(z.filter(grid_factors="optimizer.lr")) == 2
    z.state_dict(z.model_ids()[0])  # weights read as before

    result = push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset=True)
    assert hub.files_at(REPO)["index.parquet"] == (zoo / "index.parquet").read_bytes()  # the zoo is not rewritten
    published = hub.files_at(DS, repo_type="dataset")["index.parquet"]
    schema = pq.read_schema(io.BytesIO(published))
    assert str(schema.field("grid_factors").type) == "list<element: string>"  # the dataset has native lists
    assert read_index(io.BytesIO(published))["aug.ops"].tolist() == new["aug.ops"].tolist()
    assert result.index_dataset.rows == len(new)
    remote = vitzoo.load(REPO, endpoint=hub.endpoint, cache_dir=hf_cache)  # the format-1 zoo from the Hub
    assert remote.index["model.img_size"].tolist() == new["model.img_size"].tolist()


def test_write_index_round_trip(make_zoo):
    zoo = make_zoo(n_models=2, config=LISTS)
    assert index_format(zoo / "index.parquet")["format_version"] == FORMAT_VERSION  # what write_index writes
    before = (zoo / "index.parquet").read_bytes()
    df = write_index(zoo)  # same runs: same bytes (re-pushing an unchanged zoo sends nothing)
    assert (zoo / "index.parquet").read_bytes() == before
    for version in (1, 2):  # both formats hold the same table
        back = read_index(io.BytesIO(index_bytes(df, version)))
        assert back.columns.tolist() == df.columns.tolist()
        for col in ("grid_factors", "aug.ops", "model.img_size", "test_acc", "sha256"):
            assert back[col].tolist() == df[col].tolist(), (version, col)


def test_zoo_card_links_the_index_dataset(hub, hf_cache, make_zoo):
    """Linked both ways: the zoo card (from zoo.json's index_dataset) links the dataset, whose card links the zoo."""
    zoo = make_zoo(n_models=1)
    push(zoo, REPO, token=TOKEN, endpoint=hub.endpoint, index_dataset=True)
    card = hub.files_at(REPO)["README.md"].decode()
    assert f"[{DS}]({hub.endpoint}/datasets/{DS})" in card
    assert f'datasets.load_dataset("{DS}", split="train")' in card
    assert f"[{REPO}]({hub.endpoint}/{REPO})" in hub.files_at(DS, repo_type="dataset")["README.md"].decode()
