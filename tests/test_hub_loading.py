"""Zoo models load from the Hub without vitzoo's loader: timm, transformers and the pipeline, as the cards say.

A zoo is pushed with ``vitzoo push`` to the loopback Hub server; a fresh interpreter (``HF_ENDPOINT`` at
that server, an empty HF cache, no token) then runs the *exact* code blocks of the pushed model cards,
and what they compute is compared with the model ``vitzoo.load`` builds from the same repo: logits on a
fixed batch (transformers and timm), the preprocessing of one image (timm's transform, the transformers
image processor) and the pipeline's scores. For the ViT zoo the fresh interpreter never imports vitzoo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from zoo_factory import TOKEN

import vitzoo
from vitzoo.cards import load_snippets

pytest_plugins = ["conftest_hub"]

# The fresh interpreter: runs each card's code blocks in their own namespace and saves what they compute.
CHILD = textwrap.dedent('''
    import json, os, re, sys
    from pathlib import Path

    import torch
    from PIL import Image

    spec = json.load(open(sys.argv[1]))
    x = torch.load(spec["x"])
    image = Image.open(spec["image"])
    out = {"results": {m: {"blocks": []} for m in spec["cards"]}}
    blocks = [(mid, code) for mid, card in spec["cards"].items()
              for code in re.findall(r"```python\\n(.*?)```", card, re.S)]
    for vitzoo_pass in (False, True):  # every card's vitzoo.load block last: the others must run without vitzoo
        if vitzoo_pass:
            out["vitzoo_imported_before"] = "vitzoo" in sys.modules
            snapshots = list(Path(os.environ["HF_HOME"], "hub").glob("models--*/snapshots/*"))
            out["fetched"] = sorted({p.relative_to(s).as_posix() for s in snapshots for p in s.rglob("*")
                                     if p.is_file()})
        for mid, code in blocks:
            if ("vitzoo.load(" in code) != vitzoo_pass:
                continue
            res, ns = out["results"][mid], {}
            exec(compile(code, f"<card {mid}>", "exec"), ns)
            with torch.no_grad():
                if "vitzoo.load(" in code:
                    res["blocks"].append("vitzoo")
                    res["vitzoo_logits"] = ns["model"](x)
                elif "timm.create_model" in code:
                    res["blocks"].append("timm")
                    res["timm_logits"] = ns["model"](x)
                    res["timm_input"] = ns["transform"](image.convert("RGB"))
                elif "AutoImageProcessor" in code:
                    res["blocks"].append("transformers")
                    o = ns["model"](pixel_values=x)
                    res["hf_logits"] = o.logits if hasattr(o, "logits") else o.pooler_output
                    res["hf_input"] = ns["processor"](image.convert("RGB"))["pixel_values"][0]
                elif "pipeline(" in code:
                    res["blocks"].append("pipeline")
                    if "classify" in ns:
                        n = ns["classify"].model.config.num_labels
                        res["pipeline"] = {d["label"]: d["score"] for d in ns["classify"](image, top_k=n)}
                    else:
                        res["pipeline_features"] = torch.tensor(ns["extract"](image, pool=True))
    out["vitzoo_imported_after"] = "vitzoo" in sys.modules
    torch.save(out, spec["out"])
''')


def run_card_snippets(hub, tmp_path: Path, repo: str, model_ids: list[str], input_size) -> tuple[dict, torch.Tensor, Path]:
    """Run the pushed cards of ``model_ids`` in a fresh interpreter against ``hub``; (its output, x, image path).

    The output: ``results[model_id]`` (what each block computed), ``fetched`` (the repo files in the
    child's HF cache before the vitzoo blocks ran) and whether vitzoo was imported before/after them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cards = {m: hub.files_at(repo)[f"models/{m}/README.md"].decode() for m in model_ids}
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    rng = np.random.default_rng(0)
    from PIL import Image

    image = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 256, (21, 19, 3), dtype=np.uint8)).save(image)
    spec = {"cards": cards, "x": str(tmp_path / "x.pt"), "image": str(image), "out": str(tmp_path / "out.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "child-hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "spec.json")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(tmp_path / "out.pt"), x, image


def _push(zoo: Path, repo: str, hub, monkeypatch) -> None:
    from vitzoo.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(zoo), repo, "--endpoint", hub.endpoint]) == 0
    monkeypatch.delenv("HF_TOKEN")


def _check(results: dict, zoo, x: torch.Tensor, image: Path, expect_blocks: dict[str, list[str]]) -> None:
    """Everything the card code computed equals what vitzoo.load's model computes (float tolerance)."""
    from PIL import Image

    img = Image.open(image)
    for mid, blocks in expect_blocks.items():
        res = results["results"][mid]
        assert sorted(res["blocks"]) == sorted(blocks), mid
        ref = zoo.model(mid)
        ref_input = zoo.transform(mid)(img.convert("RGB"))
        with torch.no_grad():
            ref_logits = ref(x)
            ref_img = ref(ref_input[None])[0]
        torch.testing.assert_close(res["vitzoo_logits"], ref_logits)
        torch.testing.assert_close(res["timm_logits"], ref_logits)
        torch.testing.assert_close(res["hf_logits"], ref_logits)
        torch.testing.assert_close(res["timm_input"], ref_input)
        torch.testing.assert_close(res["hf_input"], ref_input)
        cfg = zoo.config(mid)
        assert ("pipeline" in blocks) == ("pipeline" in res or "pipeline_features" in res), mid
        if "pipeline" in res:
            probs = ref_img.softmax(-1)
            expected = {name: float(p) for name, p in zip(cfg["label_names"], probs, strict=True)}
            assert res["pipeline"].keys() == expected.keys()
            for name, score in expected.items():
                assert res["pipeline"][name] == pytest.approx(score, abs=1e-5), (mid, name)
        if "pipeline_features" in res:
            torch.testing.assert_close(res["pipeline_features"][0], ref_img)


def test_vit_zoo_loads_with_timm_transformers_and_pipeline(tiny_zoo, hub, hf_cache, tmp_path, monkeypatch):
    repo = "vitzoo-test/tiny-vit"
    zoo_dir = shutil.copytree(tiny_zoo, tmp_path / "zoo")  # push re-renders the cards: leave the shared zoo alone
    _push(zoo_dir, repo, hub, monkeypatch)
    zoo = vitzoo.load(repo, endpoint=hub.endpoint, cache_dir=hf_cache)
    idx = zoo.index[zoo.index["final"]]
    finetuned = idx[idx["stage"] == "finetune"]["model_id"].iloc[0]
    supervised = idx[(idx["stage"] == "pretrain") & (idx["objective.name"] == "supervised")]["model_id"].iloc[0]
    backbone = idx[(idx["stage"] == "pretrain") & (idx["objective.name"] == "simclr")]["model_id"].iloc[0]
    ids = [finetuned, supervised, backbone]
    results, x, image = run_card_snippets(hub, tmp_path / "run", repo, ids,
                                          zoo.config(finetuned)["pretrained_cfg"]["input_size"])
    every = ["timm", "transformers", "pipeline", "vitzoo"]
    _check(results, zoo, x, image, {finetuned: every, supervised: every, backbone: every})
    assert not results["vitzoo_imported_before"], "the timm/transformers/pipeline snippets of ViTs need no vitzoo"
    assert results["vitzoo_imported_after"]  # (the check can fail: the vitzoo.load blocks did import it)
    # timm, transformers and the pipeline fetched each model's config.json and model.safetensors, nothing else
    assert results["fetched"] == sorted(f"models/{m}/{f}" for m in ids for f in ("config.json", "model.safetensors"))


def _cnn_zoo(root: Path, variant: str, in_chans: int, n_models: int = 2) -> Path:
    """A zoo of classic CNNs written like ``vitzoo generate`` writes one (RunWriter, config_json, index),
    with config.json naming the architecture by its timm registry name."""
    from vitzoo.models import TIMM_NAMES, cnn_model_args, vit
    from vitzoo.models.cnn import IMG_SIZE, build_cnn
    from vitzoo.zoo.index import write_index
    from vitzoo.zoo.io import write_json, write_text
    from vitzoo.zoo.writer import RunWriter

    size, labels = IMG_SIZE[variant], [f"class {i}" for i in range(10)]
    args = cnn_model_args(in_chans, "tanh" if variant != "resnet18" else "relu", 0.0, "U")
    for i in range(n_models):
        run_id = f"train-{i:010x}"
        w = RunWriter(root, run_id)
        history = []
        for epoch in range(2):
            w.save_epoch(epoch, build_cnn(variant, num_classes=10, seed=10 * i + epoch, **args).state_dict())
            history.append({"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0, "test_acc": 0.5})
        w.save_history(history)
        pcfg = {"input_size": [in_chans, size, size], "mean": [0.5] * in_chans, "std": [0.25] * in_chans,
                "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "num_classes": 10}
        config = vit.config_json(TIMM_NAMES[variant], args, 10, labels, pcfg, 0,
                                 {"run_id": run_id, "stage": "train", "head": "linear", "objective": "supervised"})
        w.finalize(config_json=config, run_info={"stage": "train", "config": {"model": {"variant": variant}},
                                                 "factors": {}, "init_seed": i, "data_seed": 0, "repeat": 0},
                   final_epoch=1, status="done")
    write_index(root)
    write_json(root / "zoo.json", {"format_version": 1, "name": root.name})
    write_text(root / "recipe.yaml", f"name: {root.name}\n")
    return root


def test_cnn_zoo_loads_with_timm_transformers_and_pipeline(hub, hf_cache, tmp_path, monkeypatch):
    repo = "vitzoo-test/cnn-m"
    _push(_cnn_zoo(tmp_path / "zoo", "cnn-m", 3), repo, hub, monkeypatch)
    zoo = vitzoo.load(repo, endpoint=hub.endpoint, cache_dir=hf_cache)
    ids = zoo.model_ids()
    results, x, image = run_card_snippets(hub, tmp_path / "run", repo, ids, [3, 32, 32])
    _check(results, zoo, x, image, {m: ["timm", "transformers", "pipeline", "vitzoo"] for m in ids})


@pytest.mark.parametrize(("variant", "in_chans"), [("cnn-s", 1), ("cnn-m", 3), ("resnet18", 3)])
def test_classic_architectures_are_timm_models(variant, in_chans, tmp_path):
    """After ``import vitzoo``, timm and transformers build every classic architecture from a model folder."""
    import timm
    from transformers import AutoModelForImageClassification

    from vitzoo.models import TIMM_NAMES, from_config

    zoo = vitzoo.load(_cnn_zoo(tmp_path / "zoo", variant, in_chans, n_models=1))
    (mid,) = zoo.model_ids()
    folder = tmp_path / "zoo" / "models" / mid
    cfg = zoo.config(mid)
    assert cfg["architecture"] == TIMM_NAMES[variant] and timm.is_model(TIMM_NAMES[variant])
    ours = from_config(cfg)
    ours.load_state_dict(zoo.state_dict(mid))
    ours.eval()
    t = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    h = AutoModelForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, *cfg["pretrained_cfg"]["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(x)
        torch.testing.assert_close(t(x), ref)
        torch.testing.assert_close(h(pixel_values=x).logits, ref)
    assert t.pretrained_cfg["mean"] == cfg["pretrained_cfg"]["mean"] and h.config.num_labels == 10
    snippets = load_snippets("org/zoo", mid, cfg)
    assert "import vitzoo" in snippets["timm"] and (snippets["pipeline"] is None) == (in_chans != 3)


def test_importing_vitzoo_stays_cheap_and_registers_when_timm_is_imported():
    code = textwrap.dedent("""
        import sys
        import vitzoo
        assert "timm" not in sys.modules and "torch" not in sys.modules, "import vitzoo must not import timm/torch"
        import timm
        assert all(timm.is_model(n) for n in ("vitzoo_cnn_s", "vitzoo_cnn_m", "vitzoo_resnet18"))
        assert not any(type(f).__name__ == "_TimmImportHook" for f in sys.meta_path)
        print("ok", timm.create_model("vitzoo_cnn_s").pretrained_cfg["input_size"])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (1, 28, 28)" in done.stdout


def test_config_json_is_honest(tiny_zoo):
    """The timm name stays (timm builds the model by it); nothing of timm's ImageNet checkpoint is claimed."""
    zoo = vitzoo.load(tiny_zoo)
    for mid in zoo.model_ids():
        cfg = json.loads((tiny_zoo / "models" / mid / "config.json").read_text())
        assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["embed_dim"] == 32
        assert cfg["vitzoo"]["architecture"] == "ViT-mu/4 at 16px"
        for borrowed in ("url", "hf_hub_id", "tag", "license"):
            assert borrowed not in cfg["pretrained_cfg"]
            assert borrowed not in zoo.model(mid).pretrained_cfg, (mid, borrowed)
        assert zoo.model(mid).pretrained_cfg["input_size"] == [3, 16, 16]


def test_legacy_cnn_name_gets_an_explanation_not_a_broken_snippet():
    cfg = {"architecture": "vitzoo/cnn-s", "num_classes": 10, "model_args": {"in_chans": 1}}
    s = load_snippets("org/zoo", "train-0", cfg, revision="v2")
    assert s["timm"] is s["transformers"] is s["pipeline"] is None
    assert 'revision="v2"' in s["vitzoo"] and re.search(r"`vitzoo_cnn_s`", s["notes"][0])
