"""What a plan will cost before anything runs: bytes per saved state and per stage (`vitzoo plan`).

A phase zoo's w = 256 ResNet-18 state is ~0.7 GB and its recipe saves ~20 of them for each of 24 models of
that width, so the checkpoint schedule is a choice to see before a GPU-week starts. Sizes come from the
real builders on PyTorch's meta device (no memory, any width), once per distinct architecture; every
tensor of the saved state counts (batchnorm buffers included) at 4 bytes (zoos save float32).

The number of classes (and a language model's vocabulary) is not known without opening the data: known
sources use their real count (:data:`CLASSES`), others 10 classes, GPT-2 with a Hub tokenizer GPT-2's 50,257
tokens, the built-in language its tokenizer's target size. (Training FLOPs per run belong here too: the scale-out work adds them.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from vitzoo.plan import Plan, RunSpec
from vitzoo.recipe import StageConfig

#: Classes of the sources the recipes name (the rest are estimated at 10).
CLASSES = {"builtin:digits": 10, "builtin:shapes": 6, "hf:uoft-cs/cifar100": 100, "hf:zh-plus/tiny-imagenet": 200,
           "hf:tanganke/stl10": 10}
#: GPT-2's vocabulary (a Hub tokenizer); the built-in language's own is what its tokenizer learns.
GPT2_VOCAB = 50_257


@dataclass
class StageStorage:
    stage: str
    runs: int
    states_per_run: int
    bytes_total: int
    largest_state: int
    """The largest single state of the stage (bytes)."""


def _num_classes(cfg: StageConfig) -> int:
    return CLASSES.get(cfg.data.source, 10)


@functools.lru_cache(maxsize=256)
def _state_bytes(key: str) -> int:
    import torch

    cfg = json.loads(key)
    m, data, obj = cfg["model"], cfg["data"], cfg["objective"]
    variant = m["variant"]
    with torch.device("meta"):
        if variant == "gpt2":
            from vitzoo.models import gpt2

            vocab = GPT2_VOCAB if data["tokenizer"] else _builtin_vocab()
            net = gpt2.tie_state_keys(gpt2.build_gpt2(vocab, m["width"], m["depth"], m["positions"]))
        elif variant == "mlp":
            from vitzoo.models import mlp

            args = mlp.model_args(m["width"], m["depth"], None, m["init"])
            return 4 * mlp.num_params(args["width"], args["depth"])
        elif variant in ("cnn-s", "cnn-m", "resnet18", "resnet50"):
            from vitzoo.models.cnn import build_cnn

            net = build_cnn(variant, data["channels"], cfg["classes"], m["activation"], m["dropout"], m["init"],
                            width=m["width"])
        else:
            from vitzoo.models import vit
            from vitzoo.recipe import ModelConfig

            arch, args = vit.vit_args(ModelConfig(**m), data["channels"])
            net = vit.create(arch, args, 0 if obj == "simclr" else cfg["classes"], seed=0)
        return sum(4 * t.numel() for t in net.state_dict().values())


def _builtin_vocab() -> int:
    from vitzoo.data.text import ARITHMETIC_VOCAB

    return ARITHMETIC_VOCAB  # the tokenizer's target size (BPE may learn fewer merges)


def state_bytes(run: RunSpec, parent: RunSpec | None = None) -> int:
    """Bytes of one saved state of ``run`` (a fine-tune or twin: its parent's architecture)."""
    cfg = run.config
    src = parent.config if parent is not None else cfg
    key = json.dumps({"model": dataclasses.asdict(src.model) if src.model else None,
                      "data": dataclasses.asdict(src.data), "objective": src.objective.name,
                      "classes": _num_classes(cfg)}, sort_keys=True)
    if src.model is None:
        raise ValueError(f"{run.run_id}: no model to size")
    return _state_bytes(key)


def storage(plan: Plan) -> list[StageStorage]:
    """Checkpoint storage per stage: states per run (epoch 0, the schedule, the last) times bytes per state."""
    by_id = plan.by_id()
    out = []
    for st in plan.recipe.stages:
        runs = plan.stage_runs(st.name)
        total, largest, states = 0, 0, 0
        for r in runs:
            parent = by_id.get(r.parent_id) if r.parent_id else None
            while parent is not None and parent.parent_id:  # a fine-tune of a fine-tune: the root's model
                parent = by_id.get(parent.parent_id)
            b = state_bytes(r, parent)
            n = len(r.config.saved_epochs())
            total += b * n
            largest = max(largest, b)
            states = max(states, n)
        out.append(StageStorage(st.name, len(runs), states, total, largest))
    return out


def human(n: float) -> str:
    """Bytes as a short human figure (1.5 GB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def storage_json(plan: Plan) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in storage(plan)]
