"""Building a run: its network (ViT pre-training, SimCLR, classic CNN, fine-tune incl. LoRA and linear
probes), its parent's state, its optimizer and its autocast dtype. One place for every path, so that a
run trained alone and the same run trained in a stack start from the very same weights and groups.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from vitzoo.data.pipeline import preprocessing_for
from vitzoo.models import TIMM_NAMES, vit
from vitzoo.plan import RunSpec
from vitzoo.recipe import StageConfig
from vitzoo.train.context import Built, RunContext, cpu_state
from vitzoo.train.objectives import SimCLRModel
from vitzoo.zoo.writer import RunWriter


def build_run(spec: RunSpec, ctx: RunContext, num_classes: int, label_names: list[str]) -> Built:
    """The network of a pre-training, classic or fine-tuning run, initialised from its seeds (or parent)."""
    cfg = spec.config
    if cfg.finetune is None:
        assert cfg.model is not None
        if not cfg.model.is_vit:
            return build_cnn_run(spec, num_classes, label_names)
        arch, args = vit.vit_args(cfg.model, cfg.data.channels)
        pp = preprocessing_for(cfg.data, cfg.model.resolved_img_size)
        if cfg.objective.name == "simclr":
            backbone = vit.create(arch, args, 0, spec.init_seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.init_seed + 1)
                net = SimCLRModel(backbone, cfg.objective.proj_dim)
            return Built(net, lambda: cpu_state(backbone), arch, args, 0, backbone.num_features, pp, None,
                         "none", None)
        net = vit.create(arch, args, num_classes, spec.init_seed)
        return Built(net, lambda: cpu_state(net), arch, args, num_classes, net.num_features, pp, label_names,
                     "linear", None)
    return build_finetune(spec, ctx, num_classes, label_names)


def build_cnn_run(spec: RunSpec, num_classes: int, label_names: list[str]) -> Built:
    """A classic-zoo CNN for a run, initialised from its seed (used by the per-run and population engines)."""
    from vitzoo.models import cnn_model_args
    from vitzoo.models.cnn import build_cnn

    m = spec.config.model
    assert m is not None
    args = cnn_model_args(spec.config.data.channels, m.activation, m.dropout, m.init, m.width)
    net = build_cnn(m.variant, num_classes=num_classes, seed=spec.init_seed, **args)
    pp = preprocessing_for(spec.config.data, m.resolved_img_size)
    return Built(net, lambda: cpu_state(net), TIMM_NAMES[m.variant], args, num_classes, 0, pp, label_names,
                 "linear", None)


def load_parent(spec: RunSpec, ctx: RunContext) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The parent's config.json and its state at ``spec.parent_epoch`` ("last" = its final, last good state).

    Waits while another process still trains the parent (stages are separated by a barrier, so this
    only matters when processes run unevenly or a zoo is resumed with a different process count).
    """
    from vitzoo.zoo.reader import LocalSource, read_state

    assert spec.parent_id is not None
    parent = RunWriter(ctx.zoo_root, spec.parent_id)
    waited = 0.0
    while not parent.is_finished():
        if waited == 0:
            ctx.log(f"{spec.run_id}: waiting for parent {spec.parent_id} (trained by another process)")
        if waited > ctx.parent_wait_s:
            raise TimeoutError(f"{spec.run_id}: parent {spec.parent_id} did not finish within {ctx.parent_wait_s} s")
        time.sleep(2.0)
        waited += 2.0
    src = LocalSource(ctx.zoo_root)
    pcfg = src.json(f"models/{spec.parent_id}/config.json")
    pinfo = src.json(f"models/{spec.parent_id}/run.json")
    epoch = pinfo["final_epoch"] if spec.parent_epoch in (None, "last") else int(spec.parent_epoch)
    return pcfg, read_state(src, pinfo, epoch)


def build_finetune(spec: RunSpec, ctx: RunContext, num_classes: int, label_names: list[str]) -> Built:
    """A fine-tune: the parent's backbone, a new head seeded by ``init_seed``, LoRA adapters or a frozen
    backbone by mode. Its exported state is always plain timm weights (adapters merged)."""
    cfg = spec.config
    ft = cfg.finetune
    assert ft is not None
    pcfg, state = load_parent(spec, ctx)
    args = dict(pcfg["model_args"])
    if args.get("in_chans", 3) != cfg.data.channels:
        raise ValueError(f"stages.{spec.stage}.data.channels={cfg.data.channels} but the parent model takes "
                         f"{args.get('in_chans')} channels")
    net = vit.create(pcfg["architecture"], args, 0, spec.init_seed)
    backbone_state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = net.load_state_dict(backbone_state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head")]:
        raise RuntimeError(f"{spec.run_id}: parent state does not fit: missing {missing}, unexpected {unexpected}")
    vit.set_head(net, num_classes, ft.head, ft.head_hidden, seed=spec.init_seed)
    pp = preprocessing_for(cfg.data, args["img_size"])
    head_hidden = (ft.head_hidden or net.num_features) if ft.head == "mlp" else None
    if ft.mode == "linear":
        for name, p in net.named_parameters():
            p.requires_grad = name.startswith("head.")
        export = lambda: cpu_state(net)  # noqa: E731
        model: nn.Module = net
    elif ft.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                          target_modules=ft.lora_targets)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = get_peft_model(net, lcfg)
        for name, p in model.named_parameters():
            if ".head." in name or name.startswith("head."):
                p.requires_grad = True

        def export() -> dict[str, torch.Tensor]:
            # Zoo states are plain timm weights: the adapters merged in, loadable without peft.
            return cpu_state(copy.deepcopy(model).merge_and_unload())
    else:
        export = lambda: cpu_state(net)  # noqa: E731
        model = net
    return Built(model, export, pcfg["architecture"], args, num_classes, net.num_features, pp, label_names, ft.head,
                 head_hidden)


def make_optimizer(net: nn.Module, cfg: StageConfig, *, no_decay: tuple[str, ...] | None = None) -> torch.optim.Optimizer:
    """timm's optimizer for the stage, with the one weight-decay policy of vitzoo:

    - ViTs (and ViT fine-tunes) follow timm's practice: no decay on biases, norms (1-d parameters) and the
      model's ``no_weight_decay()`` names (position embedding, class token);
    - the classic CNN zoos decay every parameter, as the reference code does;
    - ``no_decay`` (name suffixes) adds the same timm rule plus those names, whatever the architecture:
      sparsified twins never decay ``log_sigma2``.

    Every group gets ``initial_lr`` (the peak lr the schedule multiplies).
    """
    from timm.optim import create_optimizer_v2

    o = cfg.optimizer.resolved()
    kwargs: dict[str, Any] = {}
    if "momentum" in o:
        kwargs["momentum"] = o["momentum"]
    if no_decay is not None:
        skip = set(getattr(net, "no_weight_decay", lambda: set())())
        decay, keep = [], []
        for name, p in net.named_parameters():
            if not p.requires_grad:
                continue
            (keep if p.ndim <= 1 or name.endswith((".bias", *no_decay)) or name in skip else decay).append(p)
        groups = [{"params": keep, "weight_decay": 0.0}, {"params": decay, "weight_decay": o["weight_decay"]}]
        opt = create_optimizer_v2([g for g in groups if g["params"]], opt=o["timm"], lr=o["lr"],
                                  weight_decay=o["weight_decay"], **kwargs)
    else:
        vit_like = cfg.model is None or cfg.model.is_vit
        opt = create_optimizer_v2(net, opt=o["timm"], lr=o["lr"], weight_decay=o["weight_decay"],
                                  filter_bias_and_bn=vit_like, **kwargs)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a recipe's ``precision`` on ``device`` (None: full precision)."""
    if precision == "no":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the accelerator supports it; full precision on CPU (bf16 there is slow and lossy)
    from accelerate.utils import is_bf16_available

    return torch.bfloat16 if device.type == "cuda" and is_bf16_available() else None
