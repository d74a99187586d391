"""Weight-space views (vitzoo.zoo.weights) on the real tiny zoo: batches, splits, tokens, layer stats.

The tiny zoo (conftest ``tiny_zoo``) has 4 fine-tuned micro ViTs (6 classes) and 2 pre-trained ones
(a supervised one with a 10-class head, a SimCLR one without head), 3 states each: so it holds three
parameter layouts, which is exactly what the mixed-architecture checks need.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import vitzoo
from vitzoo.zoo import weights as W
from vitzoo.zoo.weights import WeightSpaceError


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return vitzoo.load(tiny_zoo)


@pytest.fixture(scope="module")
def ft(zoo):
    """The fine-tuned models: one architecture (4 models x 3 states)."""
    view = zoo.filter(stage="finetune")
    assert len(view) == 4 and len(view.index) == 12
    return view


# ---------------------------------------------------------------- parameter order and batches
def test_param_layout_is_the_state_dict_order(zoo, ft):
    mid = ft.model_ids()[0]
    lay = zoo.param_layout(mid)
    assert list(lay.names) == zoo.param_order(mid)
    assert lay.names[:3] == ("cls_token", "pos_embed", "patch_embed.proj.weight")
    assert lay.names[-2:] == ("head.weight", "head.bias")
    sd = zoo.state_dict(mid)
    assert lay.shapes == tuple(tuple(sd[n].shape) for n in lay.names)
    assert lay.n_params == sum(t.numel() for t in sd.values())
    assert lay.offsets[1] == sd["cls_token"].numel()
    # flatten == Zoo.weights, and unflatten restores the exact state dict
    flat = lay.flatten(sd)
    assert torch.equal(flat, zoo.weights(mid))
    back = lay.unflatten(flat)
    assert list(back) == list(lay.names)
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)


def test_weights_batch_matches_per_state_vectors(zoo, ft):
    batch, rows = ft.weights_batch()
    n_params = zoo.param_layout(ft.model_ids()[0]).n_params
    assert batch.shape == (12, n_params) and batch.dtype == torch.float32
    assert list(rows["model_id"]) == list(ft.index["model_id"]) and list(rows["epoch"]) == list(ft.index["epoch"])
    for i, r in rows.iterrows():
        assert torch.equal(batch[i], zoo.weights(r["model_id"], int(r["epoch"])))
    # the states of a model really differ (no row reused); epoch 0 of the full and the LoRA fine-tune
    # of one parent may coincide (same parent, same head init), so compare within models only
    for mid in ft.model_ids():
        mine = batch[torch.tensor((rows["model_id"] == mid).to_numpy())]
        assert len({tuple(b.tolist()) for b in mine}) == 3


def test_weights_batch_inputs_and_order(zoo, ft):
    mid_a, mid_b = ft.model_ids()[:2]
    pairs = [(mid_b, 2), (mid_a, 0), (mid_b, 0)]
    batch, rows = zoo.weights_batch(pairs)
    assert [(r.model_id, r.epoch) for r in rows.itertuples()] == pairs
    for i, (m, e) in enumerate(pairs):
        assert torch.equal(batch[i], zoo.weights(m, e))
    via_view, rows_v = zoo.weights_batch(ft)  # a view passed as the states
    assert torch.equal(via_view, ft.weights_batch()[0]) and len(rows_v) == 12
    df = ft.index.iloc[::-1]
    batch2, rows2 = zoo.weights_batch(df)
    assert list(rows2["epoch"]) == list(df["epoch"])
    assert torch.equal(batch2, ft.weights_batch()[0].flip(0))
    # a selection of tensors, in parameter order
    sub, _ = ft.weights_batch(layers=["head.*", "cls_token"])
    lay = zoo.param_layout(mid_a)
    full = ft.weights_batch()[0]
    i_cls, i_hw = lay.names.index("cls_token"), lay.names.index("head.weight")
    want = torch.cat([full[:, lay.offsets[i_cls]:lay.offsets[i_cls] + lay.numels[i_cls]],
                      full[:, lay.offsets[i_hw]:]], dim=1)
    assert torch.equal(sub, want)


def test_weights_batch_opens_each_file_once(ft, monkeypatch):
    view = ft.filter()  # a fresh view: no sha256 verified yet
    opened, reads = [], []
    real = W.safetensors.safe_open

    class Counting:
        def __init__(self, path, fw):
            opened.append(path)
            self.path = path
            self.f = real(path, fw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def keys(self):
            return self.f.keys()

        def get_slice(self, k):
            return self.f.get_slice(k)

        def get_tensor(self, k):
            reads.append((self.path, k))
            return self.f.get_tensor(k)

    monkeypatch.setattr(W.safetensors, "safe_open", Counting)
    batch, rows = view.weights_batch()
    assert sorted(opened) == sorted({str(view.source.local_path(f)) for f in rows["file"]})  # 8 files, once each
    assert len(opened) == 8
    n_tensors = len(view.param_layout(view.model_ids()[0]).names)
    assert len(reads) == len(set(reads)) == 12 * n_tensors


def test_mixed_architectures_are_refused(zoo):
    with pytest.raises(WeightSpaceError) as err:
        zoo.weights_batch()
    msg = str(err.value)
    assert "3 parameter layouts" in msg
    assert "head.weight: shape (6, 32) vs (10, 32)" in msg
    assert "only in the first: ['head.bias', 'head.weight']" in msg
    assert "zoo.filter" in msg
    with pytest.raises(WeightSpaceError):
        zoo.torch_dataset("train", seed=0)
    # tensors every layout shares can be batched across the whole zoo
    batch, rows = zoo.weights_batch(layers="blocks.*")
    assert batch.shape[0] == 18 and len(rows) == 18
    with pytest.raises(WeightSpaceError, match="match no tensor"):
        zoo.weights_batch(layers="nope.*")


# ---------------------------------------------------------------- splits and datasets
def test_split_sizes():
    assert W.split_sizes(100) == [70, 15, 15]
    assert W.split_sizes(20) == [14, 3, 3]
    assert W.split_sizes(6) == [4, 1, 1]
    assert W.split_sizes(4) == [2, 1, 1]
    for n in range(60):
        sizes = W.split_sizes(n)
        assert sum(sizes) == n and min(sizes) >= 0
        if n >= 3:
            assert min(sizes) >= 1
        assert abs(sizes[0] - 0.7 * n) <= 1.5
    with pytest.raises(WeightSpaceError):
        W.split_sizes(10, (0.5, 0.2, 0.2))


def _synthetic_index(n_models: int, states: int = 3, parents: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(n_models):
        parent = f"pretrain-{i % parents:04d}" if parents else None
        for e in range(states):
            rows.append({"model_id": f"finetune-{i:04d}", "epoch": e, "parent_id": parent})
    for j in range(parents):
        rows.append({"model_id": f"pretrain-{j:04d}", "epoch": 0, "parent_id": None})
    return pd.DataFrame(rows)


def test_split_models_by_model_disjoint_sized_deterministic():
    idx = _synthetic_index(100)
    s0 = W.split_models(idx, seed=0)
    assert [len(s0[k]) for k in ("train", "val", "test")] == [70, 15, 15]
    assert set(s0["train"]) | set(s0["val"]) | set(s0["test"]) == set(idx["model_id"])
    assert not (set(s0["train"]) & set(s0["val"]) or set(s0["train"]) & set(s0["test"])
                or set(s0["val"]) & set(s0["test"]))
    assert W.split_models(idx, seed=0) == s0  # same seed, same split
    assert W.split_models(idx.sample(frac=1.0, random_state=3), seed=0) == s0  # row order does not matter
    s1 = W.split_models(idx, seed=1)
    assert s1["test"] != s0["test"] and sorted(s1["train"] + s1["val"] + s1["test"]) == sorted(set(idx["model_id"]))
    s = W.split_models(idx, seed=0, fractions=(0.8, 0.1, 0.1))
    assert [len(s[k]) for k in ("train", "val", "test")] == [80, 10, 10]


def test_split_models_by_lineage():
    idx = _synthetic_index(40, parents=10)  # 10 lineages: a pre-trained model + 4 fine-tuned from it
    s = W.split_models(idx, seed=0, group="lineage")
    where = {m: k for k, ms in s.items() for m in ms}
    assert len(where) == 50
    for mid, pid in idx[["model_id", "parent_id"]].drop_duplicates().itertuples(index=False):
        if isinstance(pid, str):
            assert where[mid] == where[pid]
    assert [len(s[k]) for k in ("train", "val", "test")] == [35, 10, 5]  # 7/2/1 lineages of 5 models
    with pytest.raises(WeightSpaceError):
        W.split_models(idx, group="nope")


def test_torch_dataset_splits_by_model(zoo, ft):
    dss = {s: ft.torch_dataset(s, seed=0, properties=("test_acc", "finetune.mode", "gen_gap")) for s in W.SPLITS}
    assert [len(dss[s].models) for s in W.SPLITS] == [2, 1, 1]  # 4 models -> 2/1/1
    assert [len(dss[s]) for s in W.SPLITS] == [6, 3, 3]  # every state of a model in the model's split
    models = {s: set(dss[s].index["model_id"]) for s in W.SPLITS}
    assert all(models[s] == set(dss[s].models) for s in W.SPLITS)
    assert not (models["train"] & models["val"] or models["train"] & models["test"] or models["val"] & models["test"])
    seen = pd.concat([dss[s].index for s in W.SPLITS])
    assert sorted(zip(seen["model_id"], seen["epoch"], strict=True)) == sorted(
        zip(ft.index["model_id"], ft.index["epoch"], strict=True))
    assert ft.split_models(seed=0) == {s: dss[s].models for s in W.SPLITS}
    # deterministic
    again = ft.torch_dataset("test", seed=0)
    assert again.models == dss["test"].models
    # samples: the state's weights and its properties
    ds = dss["train"]
    assert ds.categories == {"finetune.mode": ["full", "lora"]}
    for i in range(len(ds)):
        w, y = ds[i]
        r = ds.index.iloc[i]
        assert torch.equal(w, zoo.weights(r["model_id"], int(r["epoch"])))
        assert y.shape == (3,) and y.dtype == torch.float32
        assert y[0].item() == pytest.approx(r["test_acc"])
        assert y[1].item() == ["full", "lora"].index(r["finetune.mode"])
        assert y[2].item() == pytest.approx(r["train_acc"] - r["test_acc"])
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, ds.layout.n_params) and yb.shape == (4, 3)


def test_torch_dataset_options(ft):
    train = ft.torch_dataset("train", seed=0)
    final = ft.torch_dataset("train", seed=0, epochs="final")
    assert final.models == train.models and len(final) == len(train.models)
    assert bool(final.index["final"].all())
    first_two = ft.torch_dataset("train", seed=0, epochs=(0, 1))
    assert len(first_two) == 2 * len(train.models) and set(first_two.index["epoch"]) == {0, 1}
    head = ft.torch_dataset("train", seed=0, layers="head.*")
    assert head.layout.names == ("head.weight", "head.bias") and head[0][0].shape == (6 * 32 + 6,)
    tok = ft.torch_dataset("train", seed=0, token_size=16)
    x, y = tok[2]
    assert x.shape == (tok.token_layout.n_tokens, 16) and torch.equal(y, train[2][1])
    assert torch.equal(tok.token_layout.detokenize_flat(x), train[2][0])
    lazy = ft.torch_dataset("train", seed=0, preload=False)
    assert lazy.weights is None and len(lazy) == len(train)
    for i in range(len(lazy)):
        assert torch.equal(lazy[i][0], train[i][0]) and torch.equal(lazy[i][1], train[i][1])
    with pytest.raises(WeightSpaceError):
        ft.torch_dataset("holdout")
    with pytest.raises(WeightSpaceError, match="property"):
        ft.torch_dataset("train", properties=("no_such_column",))


# ---------------------------------------------------------------- tokens
@pytest.mark.parametrize("token_size", [16, 7, 64])
def test_tokens_round_trip_exact(zoo, ft, token_size):
    mid = ft.model_ids()[1]
    ref = zoo.state_dict(mid, 1)
    tokens, positions, mask = zoo.tokens(mid, 1, token_size=token_size)
    n_params = sum(t.numel() for t in ref.values())
    assert tokens.shape[1] == token_size and mask.shape == tokens.shape and positions.shape == (len(tokens), 3)
    assert int(mask.sum()) == n_params
    assert bool((tokens[~mask] == 0).all())
    # positions are unique
    assert len({tuple(p) for p in positions.tolist()}) == len(tokens)
    back = zoo.detokenize(mid, tokens, epoch=1)
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) and back[k].dtype == ref[k].dtype for k in ref)
    # tokens in any order, with their positions
    perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))
    back2 = zoo.detokenize(mid, tokens[perm], positions[perm], epoch=1)
    assert all(torch.equal(back2[k], ref[k]) for k in ref)
    with pytest.raises(WeightSpaceError):
        zoo.detokenize(mid, tokens[1:], positions[1:], epoch=1)


def test_token_structure(zoo, ft):
    t = 16
    mid = ft.model_ids()[0]
    sd = zoo.state_dict(mid)
    tokens, positions, mask = zoo.tokens(mid, token_size=t)
    tl = zoo.token_layout(mid, token_size=t)
    names = [n for layer in tl.layers for n in layer]
    assert sorted(names) == sorted(sd)  # every tensor kept exactly once (cls token, pos embed, norms...)
    expect_tokens = sum(r * math.ceil(n / t) for r, n in zip(tl.rows, tl.row_len, strict=True))
    assert len(tokens) == tl.n_tokens == expect_tokens
    by_name = {layer[0]: (i, tl.rows[i], tl.row_len[i], layer) for i, layer in enumerate(tl.layers)}
    assert by_name["cls_token"][1:3] == (1, 32)
    assert by_name["pos_embed"][1:3] == (17, 32)
    assert by_name["blocks.0.norm1.weight"][1:] == (1, 32, ("blocks.0.norm1.weight",))
    assert by_name["blocks.0.norm1.bias"][1:3] == (1, 32)
    assert by_name["patch_embed.proj.weight"][1:] == (32, 3 * 4 * 4 + 1, ("patch_embed.proj.weight",
                                                                          "patch_embed.proj.bias"))
    assert by_name["head.weight"][1:3] == (6, 33)
    # a (layer, row): weight row then bias, cut into zero-padded tokens
    li = by_name["blocks.1.attn.qkv.weight"][0]
    for r in (0, 57, 95):
        sel = (positions[:, 0] == li) & (positions[:, 1] == r)
        assert positions[sel, 2].tolist() == [0, 1, 2]
        row = torch.cat([sd["blocks.1.attn.qkv.weight"][r], sd["blocks.1.attn.qkv.bias"][r:r + 1]])
        assert torch.equal(tokens[sel].reshape(-1)[:33], row)
        assert mask[sel].reshape(-1).tolist() == [True] * 33 + [False] * 15
    li = by_name["pos_embed"][0]
    sel = (positions[:, 0] == li) & (positions[:, 1] == 16)
    assert torch.equal(tokens[sel].reshape(-1), sd["pos_embed"][0, 16])
    # layer indices follow parameter order, starting at 0
    assert positions[0].tolist() == [0, 0, 0] and positions[-1, 0].item() == len(tl.layers) - 1


def test_tokens_batch(zoo, ft):
    tokens, positions, mask, rows = ft.tokens_batch(token_size=32)
    assert tokens.shape[0] == 12 and tokens.shape[2] == 32
    for i in (0, 5, 11):
        r = rows.iloc[i]
        t1, p1, m1 = zoo.tokens(r["model_id"], int(r["epoch"]), token_size=32)
        assert torch.equal(tokens[i], t1) and torch.equal(positions, p1) and torch.equal(mask, m1)
    tl = zoo.token_layout(ft.model_ids()[0], token_size=32)
    flat = tl.detokenize_flat(tokens)
    assert torch.equal(flat, ft.weights_batch()[0])


def test_tokenize_any_state_dict_with_buffers():
    """BatchNorm buffers (int64 num_batches_tracked, a 0-d tensor), conv and a 1x1 linear round-trip."""
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 1))
    net[1].num_batches_tracked += 7
    sd = net.state_dict()
    tokens, positions, mask, tl = W.tokenize_state(sd, token_size=8)
    assert int(mask.sum()) == sum(t.numel() for t in sd.values())
    assert ("1.num_batches_tracked",) in tl.layers and ("3.weight", "3.bias") in tl.layers
    back = tl.detokenize(tokens)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)


# ---------------------------------------------------------------- layer statistics
def test_layer_stats(zoo, ft):
    wide = ft.layer_stats()
    lay = zoo.param_layout(ft.model_ids()[0])
    stats = ["mean", "var", "p0", "p25", "p50", "p75", "p100"]
    assert wide.shape == (12, 2 + len(lay.names) * len(stats))
    assert list(wide.columns[:4]) == ["model_id", "epoch", "cls_token:mean", "cls_token:var"]
    assert list(zip(wide["model_id"], wide["epoch"], strict=True)) == list(
        zip(ft.index["model_id"], ft.index["epoch"], strict=True))
    r = wide.iloc[4]
    x = zoo.state_dict(r["model_id"], int(r["epoch"]))["blocks.0.attn.qkv.weight"].double().numpy().ravel()
    want = [x.mean(), x.var(), *np.percentile(x, [0, 25, 50, 75, 100])]
    got = [r[f"blocks.0.attn.qkv.weight:{s}"] for s in stats]
    assert np.allclose(got, want, rtol=1e-12, atol=0)
    assert r["blocks.0.attn.qkv.weight:p0"] == x.min() and r["blocks.0.attn.qkv.weight:p100"] == x.max()
    long = ft.layer_stats(long=True, layers=["head.*"])
    assert len(long) == 12 * 2 and list(long["kind"][:2]) == ["weight", "bias"]
    assert list(long["numel"][:2]) == [6 * 32, 6]
    # mixed architectures are allowed here: missing tensors are NaN
    allz = zoo.layer_stats(layers="head.*", percentiles=(50,))
    assert list(allz.columns) == ["model_id", "epoch", "head.weight:mean", "head.weight:var", "head.weight:p50",
                                  "head.bias:mean", "head.bias:var", "head.bias:p50"]
    no_head = allz["model_id"] == zoo.filter(**{"objective.name": "simclr"}).model_ids()[0]
    assert len(allz) == 18 and no_head.sum() == 3 and allz.loc[no_head, "head.weight:mean"].isna().all()
    assert allz.loc[~no_head, "head.weight:mean"].notna().all()


def test_batch_refuses_a_corrupted_file(tiny_zoo, tmp_path):
    import shutil

    from vitzoo.zoo.reader import ZooError

    root = tmp_path / "z"
    shutil.copytree(tiny_zoo, root)
    view = vitzoo.load(root).filter(stage="finetune")
    path = root / view.index["file"].iloc[0]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a weight byte, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(ZooError, match="sha256"):
        view.weights_batch()
    with pytest.raises(ZooError, match="sha256"):
        view.layer_stats()
