"""SimCLR: the positive pair is two augmented views of one image (the reference code used one view)."""

from __future__ import annotations

import torch

from vitzoo.data.pipeline import DataCache, preprocessing_for, train_loader
from vitzoo.recipe import AugConfig, DataConfig
from vitzoo.train.objectives import info_nce, positive_index


def test_loader_yields_two_different_views_of_the_same_image() -> None:
    cfg = DataConfig(source="builtin:digits", max_train_samples=64)
    cache = DataCache()
    pp = preprocessing_for(cfg, 16)
    loader, sampler = train_loader(cache, cfg, pp, AugConfig(level="light"), batch_size=16, data_seed=0, views=2)
    sampler.set_epoch(1)
    (v1, v2), labels, idx = next(iter(loader))
    assert v1.shape == v2.shape == (16, 3, 16, 16)
    assert not torch.equal(v1, v2), "two independent augmentations"
    assert torch.equal(labels, cache.eval_tensors(cfg, "train", pp)[1][idx])

    # The pair is built from one image: a transform that keeps the pixels and adds a random tag
    # shows both views carry the same source and differ only by their own randomness.
    ds = loader.dataset
    ds.transform = lambda img: (torch.tensor(list(img.getdata()), dtype=torch.float32).flatten(), torch.rand(1))
    for i in range(8):
        (a, ta), (b, tb) = ds[i][0]
        assert torch.equal(a, b) and not torch.equal(ta, tb)
        assert ds[i][2] == i


def test_positive_index_pairs_the_two_views() -> None:
    assert positive_index(3).tolist() == [3, 4, 5, 0, 1, 2]


def test_info_nce_prefers_matching_views() -> None:
    torch.manual_seed(0)
    z1 = torch.randn(32, 16)
    aligned = info_nce(z1, z1 + 0.01 * torch.randn(32, 16), temperature=0.1)
    shuffled = info_nce(z1, z1[torch.randperm(32)], temperature=0.1)
    assert aligned < 0.1 < shuffled
