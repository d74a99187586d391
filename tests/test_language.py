"""The language-model task (GPT-2, objective causal_lm): the builder, the built-in language and its tokenizer,
text sources through parquet and a local tokenizer, a micro zoo end to end through generate (index, cards,
vitzoo and transformers loading), resume after a kill and the inputs refused before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from task_helpers import assert_kill_and_resume_is_exact, write_recipe

import vitzoo
from vitzoo.data import text
from vitzoo.data.sources import DataError
from vitzoo.models import from_config, gpt2
from vitzoo.plan import expand
from vitzoo.recipe import DataConfig, RecipeError, load_recipe
from vitzoo.train.generate import generate
from vitzoo.train.tasks import language

MICRO = {
    "name": "lm-micro", "seed": 0,
    "stages": {"train": {
        "data": {"source": "builtin:arithmetic", "max_train_samples": 48, "max_eval_samples": 16},
        "model": {"variant": "gpt2", "width": 16, "depth": 1, "positions": 32},
        "objective": {"name": "causal_lm", "context_length": 16},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "constant"},
        "epochs": 3, "batch_size": 16, "checkpoint_epochs": [1],
        "grid": {"width": [16, 32]},
        "seeds": {"init": [0]},
    }},
}


def _recipe(tmp_path: Path, name: str = "micro.yaml", **train) -> Path:
    return write_recipe(MICRO, tmp_path, name, **train)


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize(("vocab", "width", "depth", "positions", "count"), [
    (50257, 768, 12, 1024, 124_439_808),  # GPT-2 small, the tied head counted once
    (50257, 1024, 24, 1024, 354_823_168),  # GPT-2 medium
    (64, 16, 1, 32, 4_848),
    (64, 128, 2, 128, 421_376),
])
def test_parameter_counts(vocab: int, width: int, depth: int, positions: int, count: int) -> None:
    assert gpt2.count_params(vocab, width, depth, positions) == count
    # embeddings + per block (LN, qkv, proj, LN, 4x MLP: 12 d^2 + 13 d) + final LN
    assert count == (vocab + positions) * width + depth * (12 * width**2 + 13 * width) + 2 * width
    if count < 1e6:  # the real module has the same count, its saved state too (no duplicated head)
        net = gpt2.build_gpt2(vocab, width, depth, positions, seed=0)
        assert sum(p.numel() for p in net.parameters()) == count
        assert sum(v.numel() for v in net.state_dict().values()) == count
        assert "lm_head.weight" not in net.state_dict()


def test_heads_rule_and_forward_shapes() -> None:
    assert [gpt2.heads(w) for w in (1, 16, 100, 128, 192, 768, 1024)] == [1, 1, 1, 2, 3, 12, 16]
    for bad in (130, 200, 1000):
        with pytest.raises(ValueError, match="model.width"):
            gpt2.heads(bad)
    net = gpt2.build_gpt2(64, 32, 2, 24, seed=0)
    assert net.config.n_head == 1 and net.config.n_inner is None and net.config.n_positions == 24
    out = net(input_ids=torch.randint(0, 64, (3, 24))).logits
    assert out.shape == (3, 24, 64)


def test_seeded_init_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = gpt2.build_gpt2(64, 16, 1, 16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, c = gpt2.build_gpt2(64, 16, 1, 16, seed=7), gpt2.build_gpt2(64, 16, 1, 16, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.wte.weight"], sc["transformer.wte.weight"])


def test_from_config_rebuilds_and_eager_attention_agrees() -> None:
    net = gpt2.build_gpt2(64, 32, 2, 16, seed=3).eval()
    cfg = json.loads(json.dumps(gpt2.config_json(net, {"run_id": "x"})))
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vitzoo"]["run_id"] == "x"
    x = torch.randint(0, 64, (2, 16))
    for impl in ("sdpa", "eager"):  # eager: the double-backward path Hessian-vector products need
        other = gpt2.from_config(cfg, attn_implementation=impl).eval()
        other.load_state_dict(net.state_dict())  # strict: only the tied head may be absent
        assert other.lm_head.weight is other.transformer.wte.weight
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=x).logits, net(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert type(from_config(cfg)).__name__ == "GPT2LMHeadModel"
    with pytest.raises(RuntimeError, match="Missing"):
        gpt2.from_config(cfg).load_state_dict({k: v for k, v in net.state_dict().items() if "ln_f" not in k})


# --------------------------------------------------------------------------- the data


def test_builtin_language_and_tokenizer_are_deterministic() -> None:
    a, b = text.arithmetic(), text.arithmetic()
    assert a["train"]["text"] == b["train"]["text"] and len(a["train"]) == 8000 and len(a["test"]) == 2000
    for doc in a["train"]["text"][:200]:  # every document is a true equation
        lhs, rhs = doc.split("=")
        assert eval(lhs) == int(rhs)  # noqa: S307 - digits and + - * only
    t1 = text.arithmetic_tokenizer(a["train"]["text"])
    t2 = text.arithmetic_tokenizer(b["train"]["text"])
    assert t1.backend_tokenizer.to_str() == t2.backend_tokenizer.to_str()
    assert len(t1) == text.ARITHMETIC_VOCAB and t1.eos_token == text.EOS
    ids = text.encode(t1, ["37+45=82"])[0]
    assert t1.decode(ids) == "37+45=82"
    d = text.text_data(DataConfig(source="builtin:arithmetic"), 16)
    assert d.train.dtype == torch.int32 and d.train.shape[1] == 17
    assert d.test is not None and len(d.val) > 0 and (d.train == d.eos_token_id).any()


def _parquet_source(tmp_path: Path, column: str = "body") -> tuple[Path, Path]:
    """A local parquet text source and a tokenizer folder (the Hub path, offline)."""
    docs = text.arithmetic(400, 100, seed=5)
    src = tmp_path / "texts"
    src.mkdir()
    for split in ("train", "test"):
        docs[split].rename_column("text", column).to_parquet(str(src / f"{split}-00000.parquet"))
    tok_dir = tmp_path / "tok"
    text.arithmetic_tokenizer(docs["train"]["text"]).save_pretrained(tok_dir)
    return src, tok_dir


def test_parquet_source_with_a_local_tokenizer(tmp_path: Path) -> None:
    src, tok_dir = _parquet_source(tmp_path)
    cfg = DataConfig(source=f"parquet:{src}", text_column="body", tokenizer=str(tok_dir), max_eval_samples=5)
    d = text.text_data(cfg, 8)
    assert d.train.shape[1] == 9 and len(d.val) == 5 and d.test is not None and len(d.test) == 5
    # blocks are the documents joined by EOS, in order
    docs = datasets.load_dataset("parquet", data_files={"test": str(src / "test-00000.parquet")})["test"]["body"]
    stream = [i for doc in text.encode(d.tokenizer, docs) for i in [*doc, d.eos_token_id]]
    assert d.test.reshape(-1).tolist() == stream[:5 * 9]
    with pytest.raises(DataError, match="data.text_column: column 'text' not in"):
        text.text_data(DataConfig(source=f"parquet:{src}", tokenizer=str(tok_dir)), 8)
    with pytest.raises(DataError, match="data.tokenizer"):
        text.text_data(DataConfig(source=f"parquet:{src}", text_column="body", tokenizer=str(tmp_path / "none")), 8)
    with pytest.raises(DataError, match="data.tokenizer"):
        text.text_data(DataConfig(source=f"parquet:{src}", text_column="body"), 8)


# --------------------------------------------------------------------------- a micro zoo


def test_micro_zoo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path)
    out = tmp_path / "zoo"
    info = generate(recipe, out, progress=False, log=lambda m: None)
    assert info["status"] == "complete"
    idx = pd.read_parquet(out / "index.parquet")
    plan = expand(load_recipe(recipe))
    assert len(idx) == 2 * 3 and sorted(idx["epoch"].unique()) == [0, 1, 3]
    for col in ("train_loss", "val_loss", "test_loss", "test_perplexity", "val_perplexity", "test_acc"):
        assert idx[col].map(math.isfinite).all(), col
    assert (idx["test_perplexity"] - idx["test_loss"].map(math.exp)).abs().max() < 1e-9
    assert set(idx["model.width"]) == {16, 32}
    zoo = vitzoo.load(out)
    data = text.text_data(load_recipe(recipe).stages[0].data, 16)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for r in plan.runs:
        folder = out / "models" / r.run_id
        run = json.loads((folder / "run.json").read_text())
        w = r.config.model.width
        assert run["status"] == "done" and run["num_params"] == gpt2.count_params(64, w, 1, 32)
        assert set(run["files"]) >= {"tokenizer.json", "tokenizer_config.json"}
        rows = idx[idx.model_id == r.run_id].sort_values("epoch")
        assert rows.iloc[-1]["train_loss"] < rows.iloc[0]["train_loss"], "training lowers the loss"
        for _, row in rows.iterrows():  # the vitzoo-loaded model reproduces each state's recorded loss
            net = zoo.model(r.run_id, epoch=int(row["epoch"]))
            ev = language.evaluate(net, data, r.config, torch.device("cpu"))
            assert ev["test_loss"] == pytest.approx(float(row["test_loss"]), rel=1e-5)
        # without vitzoo: transformers reads the folder (tied head absent from the file, re-tied on load)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        assert hf.lm_head.weight is hf.transformer.wte.weight
        ids = torch.tensor([tok("12+7=19")["input_ids"]])
        assert tok.decode(ids[0]) == "12+7=19" and len(tok) == 64
        net = zoo.model(r.run_id)
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, net(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        # a state saved with the tied key present (as other tools write it) loads to the same logits
        from safetensors.torch import load_file, save_file

        sd = load_file(str(folder / "model.safetensors"))
        assert "lm_head.weight" not in sd
        both = tmp_path / f"both-{w}"
        both.mkdir()
        (both / "config.json").write_bytes((folder / "config.json").read_bytes())
        save_file({**sd, "lm_head.weight": sd["transformer.wte.weight"].clone()}, str(both / "model.safetensors"),
                  metadata={"format": "pt"})
        hf2 = AutoModelForCausalLM.from_pretrained(both).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf2(input_ids=ids).logits, net(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    from vitzoo.cards import render_zoo_cards

    render_zoo_cards(out)
    card = (out / "README.md").read_text()
    assert "lm-micro" in card and "perplexity" in card
    model_card = (out / "models" / plan.runs[0].run_id / "README.md").read_text()
    assert "AutoModelForCausalLM" in model_card and "AutoTokenizer" in model_card
    assert "timm.create_model" not in model_card and "zoo.transform" not in model_card
    assert "test perplexity (lower is better)" in card
    assert "pipeline_tag: text-generation" in card and "pipeline_tag: text-generation" in model_card
    assert "| split | loss | accuracy | perplexity |" in model_card
    assert "image-classification" not in card.split("---")[1]  # the YAML metadata
    from vitzoo.cli import main

    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    head = json.loads(capsys.readouterr().out)["stages"]["train"]["headline"]
    finals = idx.sort_values("epoch").groupby("model_id").tail(1)["test_perplexity"]
    assert head["metric"] == "test_perplexity" and head["higher_is_better"] is False
    assert head["min"] == pytest.approx(finals.min()) and head["max"] == pytest.approx(finals.max())
    assert main(["info", str(out)]) == 0
    assert "test perplexity (lower is better)" in capsys.readouterr().out


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, grid={"width": [16]}, checkpoint_epochs=[2], model={"dropout": 0.1})
    assert_kill_and_resume_is_exact(recipe, tmp_path, "test_perplexity", [0, 2, 3])


# --------------------------------------------------------------------------- refused inputs


@pytest.mark.parametrize(("change", "key"), [
    ({"objective": {"context_length": 64}}, "context_length"),  # exceeds positions 32
    ({"data": {"source": "builtin:digits"}}, "data.source"),
    ({"data": {"source": "builtin:convection"}}, "data.source"),
    ({"objective": {"name": "supervised"}}, "objective.name"),
])
def test_bad_recipes_are_refused_naming_the_key(tmp_path: Path, change: dict, key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        load_recipe(_recipe(tmp_path, **change))


def test_untrainable_stages_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    src, tok_dir = _parquet_source(tmp_path)
    cases = [({"data": {"source": f"parquet:{src}", "tokenizer": str(tok_dir)}}, "data.text_column: column 'text'"),
             ({"data": {"source": f"parquet:{src}", "text_column": "body", "tokenizer": str(tmp_path / "x")}},
              "data.tokenizer"),
             ({"grid": {"width": [16, 200]}}, "grid.width.model: width: a GPT-2")]
    for i, (change, key) in enumerate(cases):
        out = tmp_path / f"zoo{i}"
        with pytest.raises((DataError, RecipeError), match=key) as e:
            generate(_recipe(tmp_path, f"bad{i}.yaml", **change), out, progress=False, log=lambda m: None)
        assert "stages.train." in str(e.value)
        assert not out.exists()
