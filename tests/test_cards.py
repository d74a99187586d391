"""Zoo and model cards: rendered from the index, Hub-valid metadata, deterministic, pushable."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from huggingface_hub import ModelCard
from zoo_factory import TOKEN, write_test_zoo

from vitzoo.cards import model_card, render_zoo_cards, zoo_card
from vitzoo.hub import push

pytest_plugins = ["conftest_hub"]


def test_zoo_card_matches_index(make_zoo):
    zoo = make_zoo(n_models=3, n_unfinished=1)
    written = render_zoo_cards(zoo, repo_id="org/tiny")
    index = pd.read_parquet(zoo / "index.parquet")
    finals = index[index["final"]]
    card = ModelCard.load(zoo / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "vitzoo"
    assert "model-zoo" in card.data.tags
    (result,) = card.data.eval_results
    assert result.metric_value == pytest.approx(finals["test_acc"].median())
    text = card.text
    assert f"| pretrain | 3 | {len(index)} | 3 | 0 |" in text
    assert "| pretrain | `optimizer.lr` | 0.0001, 0.001 |" in text
    assert 'vitzoo.load("org/tiny", revision="main")' in text and "@misc{" in text
    png = zoo / "plots" / "accuracy_pretrain.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(plots/accuracy_pretrain.png)" in text
    model_cards = {p.parent.name for p in written if p.parent.parent.name == "models"}
    assert model_cards == set(finals["model_id"])  # no card for the unfinished model


def test_model_card_metadata_and_curves(make_zoo):
    zoo = make_zoo(n_models=2)
    render_zoo_cards(zoo, repo_id="org/tiny")
    index = pd.read_parquet(zoo / "index.parquet")
    mid = index["model_id"].iloc[0]
    final = index[(index["model_id"] == mid) & index["final"]].iloc[0]
    card = ModelCard.load(zoo / "models" / mid / "README.md")
    accs = {r.dataset_split: r.metric_value for r in card.data.eval_results}
    assert accs == {"val": pytest.approx(final["val_acc"]), "test": pytest.approx(final["test_acc"])}
    assert card.data.base_model is None  # no parent, no external base
    assert card.data.to_dict()["vitzoo"]["model_id"] == mid
    assert "![training curves](training_curves.png)" in card.text
    assert (zoo / "models" / mid / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_finetuned_model_card_has_lineage(tmp_path):
    zoo = write_test_zoo(tmp_path / "zoo", n_models=1)
    parent = pd.read_parquet(zoo / "index.parquet")["model_id"].iloc[0]
    write_test_zoo(zoo, n_models=1, stage="finetune", seed0=10, parent_id=parent)
    index = pd.read_parquet(zoo / "index.parquet")
    child = index[index["stage"] == "finetune"]["model_id"].iloc[0]
    card = model_card(zoo, child, repo_id="org/tiny", plot=False)
    assert card.data.base_model == "org/tiny"
    assert card.data.to_dict()["vitzoo"]["parent_id"] == parent
    assert f"Fine-tuned from `{parent}`" in card.text
    zc = zoo_card(zoo, repo_id="org/tiny", plots=False)
    assert "| finetune | 1 |" in zc.text and "| pretrain | 1 |" in zc.text


def test_cards_are_deterministic_and_follow_the_index(make_zoo):
    zoo = make_zoo(n_models=2, n_unfinished=1)
    render_zoo_cards(zoo)
    first = {p: p.read_bytes() for p in [zoo / "README.md", zoo / "plots" / "accuracy_pretrain.png"]}
    render_zoo_cards(zoo)
    assert {p: p.read_bytes() for p in first} == first  # same data, same bytes: nothing to re-push
    write_test_zoo(zoo, n_models=3)
    render_zoo_cards(zoo)
    assert "| pretrain | 3 |" in (zoo / "README.md").read_text()


def test_custom_template_and_no_token_in_cards(make_zoo, tmp_path):
    zoo = make_zoo(n_models=1, zoo_info={"provenance": {"command": ["vitzoo", "generate", "--token", TOKEN]}})
    template = tmp_path / "mine.md"
    template.write_text("---\n{{ card_data }}\n---\n# My zoo {{ zoo_name }} with {{ n_models }} models\n")
    card = zoo_card(zoo, template=template, plots=False)
    assert card.text.strip() == f"# My zoo {zoo.name} with 1 models"
    default = zoo_card(zoo, plots=False)
    assert TOKEN not in str(default) and "hf_***" in str(default)


def test_cards_pass_hub_yaml_validation_and_push(hub, make_zoo):
    zoo = make_zoo(n_models=2)
    render_zoo_cards(zoo, repo_id="vitzoo-test/carded")
    result = push(zoo, "vitzoo-test/carded", token=TOKEN, endpoint=hub.endpoint)
    files = hub.files_at("vitzoo-test/carded", result.commit)
    assert "README.md" in files and "plots/accuracy_pretrain.png" in files
    assert sum(p.endswith("/README.md") for p in files) == 2
    meta = [r for r in hub.requests if r.path == "/api/validate-yaml"]
    assert meta and all(r.status == 200 for r in meta)
    assert json.loads((zoo / "zoo.json").read_text())["format_version"] == 1


def _as_vits(zoo):
    """Give a test zoo's models a ViT config.json (cards read it to decide which loaders work)."""
    from vitzoo.models import vit

    for folder in (zoo / "models").iterdir():
        cfg = json.loads((folder / "config.json").read_text())
        args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 4, "img_size": 16,
                "in_chans": 3}
        pcfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 3,
                "url": "https://example.org/imagenet.npz", "hf_hub_id": "timm/vit_tiny_patch16_224.augreg_in21k"}
        new = vit.config_json("vit_tiny_patch16_224", args, 3, ["a", "b", "c"], pcfg, 32, cfg["vitzoo"])
        assert "url" not in new["pretrained_cfg"] and new["vitzoo"]["architecture"] == "ViT-mu/4 at 16px"
        (folder / "config.json").write_text(json.dumps(new))
    return zoo


def _code_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("revision", [None, "v3"])
def test_cards_show_exact_load_snippets(make_zoo, revision):
    """Every card shows vitzoo, timm, transformers and pipeline code with the repo, subfolder and revision
    filled in (tests/test_hub_loading.py runs these very blocks against a Hub server)."""
    zoo = _as_vits(make_zoo(n_models=2))
    render_zoo_cards(zoo, repo_id="org/tiny", revision=revision, plots=False)
    rev = revision or "main"
    for mid in pd.read_parquet(zoo / "index.parquet")["model_id"].unique():
        text = (zoo / "models" / mid / "README.md").read_text()
        blocks = _code_blocks(text)
        assert len(blocks) == 4
        for code in blocks:
            compile(code, mid, "exec")  # valid Python as pasted
            assert f'revision="{rev}"' in code
        vz, tm, hf, pipe = blocks
        assert f'vitzoo.load("org/tiny", revision="{rev}")' in vz and f'zoo.model("{mid}")' in vz
        assert (f'snapshot_download("org/tiny", revision="{rev}", allow_patterns=[' in tm
                and f'"models/{mid}/config.json", "models/{mid}/model.safetensors"]' in tm
                and f'timm.create_model(f"local-dir:{{folder}}/models/{mid}", pretrained=True)' in tm)
        assert "import vitzoo" not in tm + hf + pipe  # ViTs load without vitzoo
        assert (f'AutoModelForImageClassification.from_pretrained("org/tiny", subfolder="models/{mid}",' in hf)
        assert (f'pipeline("image-classification", model="org/tiny", revision="{rev}",' in pipe
                and f'model_kwargs={{"subfolder": "models/{mid}"}}' in pipe)
    zoo_text = (zoo / "README.md").read_text()
    zoo_blocks = _code_blocks(zoo_text)
    assert len(zoo_blocks) == 4 and all(f'revision="{rev}"' in b for b in zoo_blocks)
    example = re.search(r"For example `([^`]+)`", zoo_text)[1]
    assert f'subfolder="models/{example}"' in zoo_blocks[2]


def test_cards_explain_models_timm_cannot_build(make_zoo):
    zoo = make_zoo(n_models=1)  # config.json architecture "vitzoo/test-mlp": not a timm model
    render_zoo_cards(zoo, repo_id="org/tiny", plots=False)
    (mid,) = pd.read_parquet(zoo / "index.parquet")["model_id"].unique()
    text = (zoo / "models" / mid / "README.md").read_text()
    assert len(_code_blocks(text)) == 1 and "timm.create_model" not in text
    assert "> timm and transformers cannot build this model" in text and "`vitzoo/test-mlp`" in text


def test_vit_zoos_carry_the_timm_tag_and_no_dead_package_link():
    import pandas as pd

    from vitzoo.cards import _has_vits

    assert _has_vits(pd.DataFrame({"model.variant": ["micro", None]}))
    assert not _has_vits(pd.DataFrame({"model.variant": ["cnn-s", "resnet18", "gpt2"]}))
    assert not _has_vits(pd.DataFrame({"stage": ["x"]}))
    from pathlib import Path

    template = (Path(__file__).parent.parent / "model_cards" / "zoo_card.md").read_text()
    assert "pypi.org/project/vitzoo" not in template  # vitzoo is not on PyPI: no link to a page that does not exist


def test_a_generated_vit_zoo_card_is_tagged_timm(tiny_zoo):
    from vitzoo.cards import zoo_card

    meta = str(zoo_card(tiny_zoo, plots=False)).split("---")[1]
    assert "- timm" in meta and "pipeline_tag: image-classification" in meta


def test_model_index_dataset_types_are_hub_ids():
    from vitzoo.cards import dataset_type

    assert dataset_type("hf:uoft-cs/cifar10") == "uoft-cs/cifar10"
    assert dataset_type("builtin:digits") == "vitzoo-builtin/digits"
    assert dataset_type("parquet:/data/my_set") == "my_set"
    assert dataset_type(None) == "unknown"


def test_generated_card_model_index_uses_the_dataset_id(tiny_zoo):
    from vitzoo.cards import zoo_card

    meta = str(zoo_card(tiny_zoo, plots=False)).split("---")[1]
    assert "type: vitzoo-builtin/" in meta and "type: builtin:" not in meta
