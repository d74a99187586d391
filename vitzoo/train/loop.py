"""Train one run (a RunSpec) into its model folder: pre-training or fine-tuning, resumable.

Determinism and resume: the data order is a function of ``(data_seed, epoch)`` and every RNG
(dropout, drop-path, augmentation) is re-seeded from ``(init_seed, data_seed, epoch)`` at the start
of each epoch, so a run resumed from its last epoch continues exactly as if never stopped. The
learning rate is a pure function of the step, so the only state to save is weights + optimizer.

A diverging run (non-finite loss) stops, is recorded as ``diverged`` with its last good state, and
the zoo goes on: the reference zoos contain diverged models, so this is data, not an error.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo.data.pipeline import DataCache, Preprocessing, eval_transform, preprocessing_for, train_loader
from vitzoo.models import vit
from vitzoo.plan import RunSpec
from vitzoo.recipe import StageConfig
from vitzoo.train.objectives import SimCLRModel, info_nce, knn_accuracy
from vitzoo.train.schedule import lr_schedule
from vitzoo.train.seeds import seed_module_rngs
from vitzoo.zoo.writer import RunWriter


@dataclass
class RunContext:
    """What a process needs to train runs: where, on which device, with which shared caches."""

    zoo_root: Path
    device: torch.device
    cache: DataCache = field(default_factory=DataCache)
    hardware: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    log: Callable[[str], None] = print
    parent_wait_s: float = 24 * 3600.0
    """How long a fine-tuning run waits for a parent trained by another process."""
    stop_after_epoch: int | None = None
    """Testing hook: raise KeyboardInterrupt after saving this epoch (simulates a kill)."""


class Built:
    """A run's network and how to export its state in timm naming."""

    def __init__(self, net: nn.Module, export: Callable[[], dict[str, torch.Tensor]], arch: str,
                 model_args: dict[str, Any], num_classes: int, num_features: int, pp: Preprocessing,
                 label_names: list[str] | None, head: str, head_hidden: int | None):
        self.net, self.export, self.arch, self.model_args = net, export, arch, model_args
        self.num_classes, self.num_features, self.pp, self.label_names = num_classes, num_features, pp, label_names
        self.head, self.head_hidden = head, head_hidden


def train_run(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train ``spec`` into ``<zoo>/models/<run_id>``; returns its run.json content."""
    writer = RunWriter(ctx.zoo_root, spec.run_id)
    if writer.is_finished():
        return json.loads((writer.folder / "run.json").read_text())
    writer.discard_temp_files()
    cfg = spec.config
    t_start = time.time()
    data = ctx.cache.splits(cfg.data)
    built = _build(spec, ctx, data.num_classes, data.label_names)
    net = built.net.to(ctx.device)
    simclr = cfg.objective.name == "simclr"
    mixup, criterion = _supervised_loss(cfg, data.num_classes)
    loader, sampler = train_loader(ctx.cache, cfg.data, built.pp, cfg.aug, cfg.batch_size, spec.data_seed,
                                   views=2 if simclr else 1, equal_batches=mixup is not None)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{spec.run_id}: the training split is empty")
    optimizer = make_optimizer(net, cfg)
    lr_at = lr_schedule(cfg, steps_per_epoch)
    amp_dtype = _amp_dtype(cfg.precision, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    saved = set(cfg.saved_epochs())

    history: list[dict[str, Any]] = []
    restored = restore(ctx, writer, spec, net, optimizer)
    if restored is not None:
        start_epoch, history, elapsed = restored
        t_start -= elapsed
    else:  # epoch 0: the initialisation, evaluated and saved
        start_epoch = 0
        history = [{"epoch": 0, **_evaluate(net, built, cfg, ctx, simclr), "lr": 0.0, "objective_loss": None}]
        writer.save_epoch(0, built.export())
        writer.save_history(history)
        writer.save_resume(0, net.state_dict(), optimizer.state_dict(), {"elapsed_s": time.time() - t_start})
    last_good = (start_epoch, built.export() if start_epoch not in saved else None)

    status = "done"
    bar = progress_bar(ctx, cfg.epochs * steps_per_epoch, spec.run_id, start_epoch * steps_per_epoch)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        seed_module_rngs(spec.init_seed, spec.data_seed, epoch)
        sampler.set_epoch(epoch)
        net.train()
        # The loss sum stays on the device: no host sync per step. A non-finite loss poisons the sum, so
        # divergence is caught at the end of the epoch, and the epoch's state is discarded then.
        total, n = torch.zeros((), device=ctx.device), 0
        for i, batch in enumerate(loader):
            step = (epoch - 1) * steps_per_epoch + i
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_at(step)
            with torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = _loss(net, batch, ctx.device, simclr, cfg, mixup, criterion)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optimizer.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optimizer.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach().float() * _batch_len(batch)
            n += _batch_len(batch)
            if bar is not None:
                bar.update(1)
        objective_loss = total.item() / max(1, n)
        diverged = not math.isfinite(objective_loss)
        if not diverged:
            metrics = _evaluate(net, built, cfg, ctx, simclr)
            diverged = any(isinstance(v, float) and not math.isfinite(v) for k, v in metrics.items()
                           if k.endswith("loss") and v is not None)
        if diverged:
            status = "diverged"
            ctx.log(f"{spec.run_id}: diverged in epoch {epoch}; keeping epoch {last_good[0]}")
            break
        history.append({"epoch": epoch, **metrics, "lr": optimizer.param_groups[0]["lr"],
                        "objective_loss": objective_loss})
        last_good = end_epoch(ctx, writer, epoch, built.export(), saved, history, net, optimizer, t_start)
    if bar is not None:
        bar.close()
    return finish_run(spec, ctx, writer, built, dataset=data.name, last_good=last_good, status=status,
                      wall_s=time.time() - t_start, precision=str(amp_dtype or "float32"))


def restore(ctx: RunContext, writer: RunWriter, spec: RunSpec, net: nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]], float] | None:
    """Load the run's resume point into ``net`` and ``optimizer``: ``(epoch, history, elapsed_s)``, or None
    to start at epoch 0. Unreadable scratch (not fsync'd, so an OS crash can truncate it) resets the run."""
    try:
        resume = writer.load_resume()
    except Exception as e:  # noqa: BLE001 - any unreadable scratch file: start the run again
        ctx.log(f"{spec.run_id}: unreadable partial state ({type(e).__name__}); restarting from epoch 0")
        writer.reset()
        return None
    if resume is None:
        return None
    epoch, model_state, opt_state, extra = resume
    net.load_state_dict(model_state)
    optimizer.load_state_dict(opt_state)
    ctx.log(f"{spec.run_id}: resuming after epoch {epoch}")
    return epoch, writer.history()[: epoch + 1], extra.get("elapsed_s", 0.0)


def end_epoch(ctx: RunContext, writer: RunWriter, epoch: int, state: dict[str, torch.Tensor], saved: set[int],
              history: list[dict[str, Any]], net: nn.Module, optimizer: torch.optim.Optimizer,
              t_start: float) -> tuple[int, dict[str, torch.Tensor] | None]:
    """Bookkeeping after a good epoch: the state is saved if it is a checkpoint epoch, else kept in memory
    as the last good one (a later divergence falls back to it); then history and the resume point.
    Returns ``(epoch, state not yet on disk or None)``, the argument ``finish_run`` takes as ``last_good``."""
    if epoch in saved:
        writer.save_epoch(epoch, state)
    writer.save_history(history)
    writer.save_resume(epoch, net.state_dict(), optimizer.state_dict(), {"elapsed_s": time.time() - t_start})
    if ctx.stop_after_epoch is not None and epoch >= ctx.stop_after_epoch:
        raise KeyboardInterrupt(f"stop_after_epoch={ctx.stop_after_epoch}")
    return epoch, (None if epoch in saved else state)


def finish_run(spec: RunSpec, ctx: RunContext, writer: RunWriter, built: Built, *, dataset: str,
               last_good: tuple[int, dict[str, torch.Tensor] | None], status: str, wall_s: float,
               precision: str) -> dict[str, Any]:
    """Write config.json and run.json for a trained run (shared by every engine).

    ``last_good`` is ``(final epoch, its state if not saved yet)``: the last epoch, or for a diverged
    run its last good one, which may not have been a checkpoint epoch.
    """
    final_epoch, unsaved_state = last_good
    if unsaved_state is not None:
        writer.save_epoch(final_epoch, unsaved_state)
    cfg = spec.config
    config_json = vit.config_json(
        built.arch, built.model_args, built.num_classes, built.label_names, built.pp.pretrained_cfg(built.num_classes),
        built.num_features,
        {"run_id": spec.run_id, "stage": spec.stage, "parent_id": spec.parent_id, "parent_epoch": spec.parent_epoch,
         "head": built.head, "head_hidden": built.head_hidden, "objective": cfg.objective.name, "dataset": dataset},
    )
    run_info = {
        "stage": spec.stage, "factors": spec.factors, "init_seed": spec.init_seed, "data_seed": spec.data_seed,
        "repeat": spec.repeat, "parent_id": spec.parent_id, "parent_epoch": spec.parent_epoch,
        "config": asdict(cfg), "dataset": dataset, "num_classes": built.num_classes,
        "num_params": sum(v.numel() for v in built.export().values()),  # the saved network (no projector, adapters merged)
        "wall_time_s": round(wall_s, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": ctx.hardware, "device": str(ctx.device), "precision": precision,
    }
    return writer.finalize(config_json=config_json, run_info=run_info, final_epoch=final_epoch, status=status)


# ---------------------------------------------------------------------------- building


def _build(spec: RunSpec, ctx: RunContext, num_classes: int, label_names: list[str]) -> Built:
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
            return Built(net, lambda: _cpu_state(backbone), arch, args, 0, backbone.num_features, pp, None,
                         "none", None)
        net = vit.create(arch, args, num_classes, spec.init_seed)
        return Built(net, lambda: _cpu_state(net), arch, args, num_classes, net.num_features, pp, label_names,
                     "linear", None)
    return _build_finetune(spec, ctx, num_classes, label_names)


def build_cnn_run(spec: RunSpec, num_classes: int, label_names: list[str]) -> Built:
    """A classic-zoo CNN for a run, initialised from its seed (used by the per-run and population engines)."""
    from vitzoo.models import cnn_model_args
    from vitzoo.models.cnn import build_cnn

    m = spec.config.model
    assert m is not None
    args = cnn_model_args(spec.config.data.channels, m.activation, m.dropout, m.init)
    net = build_cnn(m.variant, num_classes=num_classes, seed=spec.init_seed, **args)
    pp = preprocessing_for(spec.config.data, m.resolved_img_size)
    return Built(net, lambda: _cpu_state(net), f"vitzoo/{m.variant}", args, num_classes, 0, pp, label_names,
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


def _build_finetune(spec: RunSpec, ctx: RunContext, num_classes: int, label_names: list[str]) -> Built:
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
        export = lambda: _cpu_state(net)  # noqa: E731
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
            return _cpu_state(copy.deepcopy(model).merge_and_unload())
    else:
        export = lambda: _cpu_state(net)  # noqa: E731
        model = net
    return Built(model, export, pcfg["architecture"], args, num_classes, net.num_features, pp, label_names, ft.head,
                 head_hidden)


def _cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------- optimisation


def make_optimizer(net: nn.Module, cfg: StageConfig) -> torch.optim.Optimizer:
    """timm's optimizer for the stage. ViTs follow timm's practice (no weight decay on biases and norms);
    the classic CNN zoos decay every parameter, as the reference code and the population engine do."""
    from timm.optim import create_optimizer_v2

    o = cfg.optimizer.resolved()
    kwargs: dict[str, Any] = {}
    if "momentum" in o:
        kwargs["momentum"] = o["momentum"]
    vit_like = cfg.model is None or cfg.model.is_vit
    opt = create_optimizer_v2(net, opt=o["timm"], lr=o["lr"], weight_decay=o["weight_decay"],
                              filter_bias_and_bn=vit_like, **kwargs)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def _supervised_loss(cfg: StageConfig, num_classes: int):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    a = cfg.aug
    if cfg.objective.name == "supervised" and ((a.mixup or 0) > 0 or (a.cutmix or 0) > 0):
        mix = Mixup(mixup_alpha=a.mixup or 0.0, cutmix_alpha=a.cutmix or 0.0, label_smoothing=a.label_smoothing or 0.0,
                    num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=a.label_smoothing or 0.0)


def _loss(net, batch, device, simclr: bool, cfg: StageConfig, mixup, criterion) -> torch.Tensor:
    if simclr:
        (v1, v2), _, _ = batch
        b = v1.shape[0]
        z = net(torch.cat([v1, v2]).to(device, non_blocking=True))
        return info_nce(z[:b], z[b:], cfg.objective.temperature)
    x, y = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if mixup is not None and x.shape[0] % 2 == 0:
        x, y = mixup(x, y)
    elif mixup is not None:  # odd last batch: plain smoothed targets
        y = F.one_hot(y, net_num_classes(net)).float()
    return criterion(net(x), y)


def net_num_classes(net: nn.Module) -> int:
    return getattr(net, "num_classes", None) or net.get_classifier().out_features


def _batch_len(batch) -> int:
    x = batch[0]
    return (x[0] if isinstance(x, (tuple, list)) else x).shape[0]


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "no":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the accelerator supports it; full precision on CPU (bf16 there is slow and lossy)
    from accelerate.utils import is_bf16_available

    return torch.bfloat16 if device.type == "cuda" and is_bf16_available() else None


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _evaluate(net, built: Built, cfg: StageConfig, ctx: RunContext, simclr: bool) -> dict[str, Any]:
    net.eval()
    out: dict[str, Any] = {}
    splits = ["train", "val"] + (["test"] if ctx.cache.splits(cfg.data).test is not None else [])
    bs = cfg.eval_batch_size or 4 * cfg.batch_size
    if simclr:
        backbone = net.backbone
        bank_x, bank_y = _features(backbone, ctx, cfg, "train", built.pp, bs, limit=cfg.objective.knn_bank_size)
        for split in splits:
            out[f"{split}_loss"] = None
            if split == "train":
                out["train_acc"] = None
                continue
            fx, fy = _features(backbone, ctx, cfg, split, built.pp, bs)
            out[f"{split}_acc"] = knn_accuracy(bank_x, bank_y, fx, fy, cfg.objective.knn_k, int(bank_y.max()) + 1)
        return out
    for split in splits:
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in _eval_batches(ctx, cfg, split, built.pp, bs):
            logits = net(x.to(ctx.device)).float()
            y = y.to(ctx.device)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += y.numel()
        out[f"{split}_loss"] = loss_sum / max(1, n)
        out[f"{split}_acc"] = correct / max(1, n)
    return out


def _eval_batches(ctx: RunContext, cfg: StageConfig, split: str, pp: Preprocessing, bs: int, limit: int | None = None):
    """Every image of a split (train capped at 10k: it is a statistic, not a sweep) in eval transform."""
    ds = getattr(ctx.cache.splits(cfg.data), split)
    n = len(ds)
    if split == "train":
        limit = min(limit or 10_000, 10_000)
    if limit is not None:
        n = min(n, limit)
    if ctx.cache.fits(cfg.data, split, pp):
        x, y = ctx.cache.eval_tensors(cfg.data, split, pp)
        for i in range(0, n, bs):
            yield x[i:min(i + bs, n)], y[i:min(i + bs, n)]
        return
    from torch.utils.data import DataLoader

    from vitzoo.data.pipeline import ImageSet

    sub = ds.select(range(n))
    yield from DataLoader(ImageSet(sub, eval_transform(pp), pp.channels), batch_size=bs,
                          num_workers=cfg.data.num_workers)


def _features(backbone, ctx, cfg, split, pp, bs, limit=None):
    fs, ys = [], []
    for x, y in _eval_batches(ctx, cfg, split, pp, bs, limit):
        fs.append(backbone(x.to(ctx.device)).float())
        ys.append(y.to(ctx.device))
    return torch.cat(fs), torch.cat(ys)


def progress_bar(ctx: RunContext, total: int, desc: str, initial: int):
    if not ctx.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, position=1, dynamic_ncols=True)

