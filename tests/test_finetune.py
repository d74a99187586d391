"""Fine-tuning modes: linear probe freezes the backbone, MLP heads, LoRA merged; bf16 autocast runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import vitzoo
from vitzoo.train.generate import generate

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def modes_zoo(tmp_path_factory) -> Path:
    data = yaml.safe_load((TESTS / "tiny.yaml").read_text())
    data["stages"]["pretrain"]["grid"] = {"objective": ["supervised"]}
    data["stages"]["pretrain"]["precision"] = "bf16"  # autocast on CPU: the mixed-precision path runs
    data["stages"]["finetune"]["grid"] = {"mode": ["linear", "lora"], "head": ["linear", "mlp"]}
    data["stages"]["finetune"]["finetune"]["head_hidden"] = 16
    p = tmp_path_factory.mktemp("r") / "modes.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path_factory.mktemp("z") / "modes"
    generate(p, out, progress=False, log=lambda m: None)
    return out


def _backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head")}


def test_linear_probe_keeps_the_parents_backbone(modes_zoo: Path) -> None:
    zoo = vitzoo.load(modes_zoo)
    for head in ("linear", "mlp"):
        row = zoo.filter(stage="finetune", final=True, mode="linear", head=head).index.iloc[0]
        child, parent = zoo.state_dict(row["model_id"]), zoo.state_dict(row["parent_id"])
        for k, v in _backbone(child).items():
            assert torch.equal(v, parent[k]), f"{k} changed under a linear probe"
        first = zoo.state_dict(row["model_id"], 0)
        assert any(not torch.equal(child[k], first[k]) for k in child if k.startswith("head")), "the head trained"


def test_mlp_head_and_lora_models(modes_zoo: Path) -> None:
    zoo = vitzoo.load(modes_zoo)
    mlp = zoo.filter(stage="finetune", final=True, head="mlp").index["model_id"].iloc[0]
    sd = zoo.state_dict(mlp)
    assert sd["head.0.weight"].shape == (16, 32) and sd["head.2.weight"].shape == (6, 16)
    model = zoo.model(mlp)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 6)
    lora = zoo.filter(stage="finetune", final=True, mode="lora", head="linear").index.iloc[0]
    child, parent = zoo.state_dict(lora["model_id"]), zoo.state_dict(lora["parent_id"])
    assert not torch.equal(child["blocks.1.mlp.fc1.weight"], parent["blocks.1.mlp.fc1.weight"])
    assert torch.equal(child["blocks.1.norm1.weight"], parent["blocks.1.norm1.weight"]), "LoRA leaves norms alone"


def test_bf16_stage_recorded(modes_zoo: Path) -> None:
    zoo = vitzoo.load(modes_zoo)
    pre = zoo.filter(stage="pretrain").index["model_id"].iloc[0]
    assert zoo.run_info(pre)["precision"] == "torch.bfloat16"
    assert zoo.state_dict(pre)["head.weight"].dtype == torch.float32, "weights stay fp32 under autocast"
