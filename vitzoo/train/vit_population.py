"""ViT fine-tuning populations: many fine-tunes of one backbone shape trained as a stack.

Why: a fine-tuning stage is typically every parent × a grid of learning rates, weight decays, heads and
seeds: dozens of runs of one backbone shape on the same data for the same duration. On a GPU a micro or
Ti/16 fine-tune at batch 32-128 leaves most of the device idle, and a linear probe spends nearly all its
time in the frozen backbone forward that its siblings repeat on the same images. The trainable
parameters of P members live in one flat ``(P, n)`` buffer; one ``torch.func.vmap``-ed
``functional_call`` + ``grad_and_value`` computes every member's gradient on its own batch, and
:mod:`vitzoo.train.functional_optim` applies AdamW / Adam / SGD (momentum, Nesterov) to the whole buffer
with per-member hyperparameters read from each run's real optimizer (timm's groups: no decay on biases,
norms, position embedding and class token). :class:`_Population` is a Members backend of the engine's
loop (:func:`vitzoo.train.engine.train_group`): members are built by the same builder as a run alone,
each keeps its own loader (with its augmentation RNG state parked between batches, so it sees the very
batches it would see alone), and its resume point is the format of a run alone.

Modes: ``full`` (each member its own backbone) and ``linear`` (frozen backbone: members with the same
parent share one unbatched backbone, its features computed once per distinct batch; only the heads are
stacked). Trained alone instead (:func:`unsupported`): LoRA, mixup / cutmix, stochastic depth or dropout
in the parent architecture, fp16 (GradScaler), optimizers other than adamw/adam/sgd/nesterov.

When: ``auto`` stacks a group only where measured faster (:mod:`vitzoo.train.routing`, per device type and
mode; benchmarks/RESULTS.md "ViT fine-tune populations"); ``VITZOO_POPULATION=on`` stacks every supported
group, ``off`` trains every run alone. Population size comes from device memory (:func:`max_population`);
a sub-population that runs out of memory is halved and its members continue from their last epoch.
Numerical differences to runs alone (attention path, bf16, float order): docs/training-engine.md.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from vitzoo.data.pipeline import train_loader
from vitzoo.models import cnn_variant
from vitzoo.plan import RunSpec, canonical_json, population_key
from vitzoo.train import functional_optim as fopt
from vitzoo.train import routing
from vitzoo.train.build import amp_dtype, build_run, load_parent, make_optimizer
from vitzoo.train.checkpoint import restore, resume_epoch
from vitzoo.train.context import Built, RunContext
from vitzoo.train.engine import Member, train_group, train_run
from vitzoo.train.evaluate import eval_batches
from vitzoo.train.objectives import CrossEntropy
from vitzoo.train.population import activation_bytes_per_sample, balanced_chunks, free_bytes
from vitzoo.train.schedule import lr_schedule
from vitzoo.train.seeds import seed_module_rngs
from vitzoo.zoo.writer import RunWriter

#: Use ``F.scaled_dot_product_attention`` inside populations. False: vmap has no batching rule for the
#: CPU flash kernel (it falls back to a per-member loop); the explicit path batches everywhere.
FUSED_ATTENTION = False

#: Recipe optimizer names the engine reproduces (timm: adamw → AdamW, adam → Adam, sgd → SGD momentum,
#: nesterov → SGD Nesterov).
OPTIMIZERS = ("adamw", "adam", "sgd", "nesterov")

#: Parent ``model_args`` that make the forward random (vmap would draw other masks than the loop).
_RANDOM_ARGS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                "patch_drop_rate")


class _Unsupported(ValueError):
    """A group turned out not to be reproducible (found while building it); train it run by run."""


# ---------------------------------------------------------------------------- what is supported


def unsupported(spec: RunSpec, parent_config: dict[str, Any] | None = None) -> list[str]:
    """Reasons ``spec`` cannot be trained in a ViT population (empty when it can).

    ``parent_config`` (the parent's config.json) adds the checks that depend on the parent's
    architecture (dropout / stochastic depth inherited from pre-training).
    """
    c = spec.config
    ft = c.finetune
    out: list[str] = []
    if ft is None:
        return ["not a fine-tuning stage"]
    if c.micro_batch_size is not None:
        out.append("micro_batch_size (gradient accumulation is the module backend's)")
    if ft.mode not in ("full", "linear"):
        out.append(f"fine-tuning mode {ft.mode!r} (peft adapters are not stacked; populations: full, linear)")
    if c.objective.name != "supervised":
        out.append(f"objective {c.objective.name!r}")
    if c.optimizer.name not in OPTIMIZERS:
        out.append(f"optimizer {c.optimizer.name!r} (populations: {', '.join(OPTIMIZERS)})")
    if (c.aug.mixup or 0) > 0 or (c.aug.cutmix or 0) > 0:
        out.append("mixup / cutmix (soft targets mixed per batch)")
    if c.precision == "fp16":
        out.append("precision fp16 (the loop's GradScaler is not reproduced)")
    if parent_config is not None:
        args = parent_config.get("model_args") or {}
        rnd = [k for k in _RANDOM_ARGS if args.get(k)]
        if rnd:
            out.append(f"parent architecture with {', '.join(rnd)} > 0 (random masks differ under vmap)")
        if cnn_variant(str(parent_config.get("architecture", ""))) is not None:
            out.append(f"parent architecture {parent_config['architecture']!r} is not a ViT")
    return out


# ---------------------------------------------------------------------------- stage entry point


def train_stage(runs: list[RunSpec], ctx: RunContext) -> Iterator[dict[str, Any]]:
    """Train a fine-tuning stage's runs (this process's shard); yields each finished run's run.json.

    Supported runs are grouped (same backbone shape, head, data, duration, optimizer family, mode;
    linear probes also by parent; runs resumed at different epochs apart) and each group that
    ``auto`` (or ``VITZOO_POPULATION=on``) vectorises is trained as populations; every other run
    goes through ``train_run``, in plan order.
    """
    switch = routing.switch()
    if switch == "off":
        yield from (train_run(s, ctx) for s in runs)
        return
    groups: dict[str, list[RunSpec]] = {}
    for spec in runs:
        writer = RunWriter(ctx.zoo_root, spec.run_id)
        if writer.is_finished():
            continue
        pcfg = _parent_config(spec, ctx)
        if unsupported(spec, pcfg):
            continue
        groups.setdefault(_group_key(spec, pcfg, writer), []).append(spec)
    vectorised: list[list[RunSpec]] = []
    for group in groups.values():
        mode = group[0].config.finetune.mode  # type: ignore[union-attr]
        least = routing.least_stack(ctx.device.type, f"vit-{mode}", switch)
        if least is not None and len(group) >= least:
            vectorised.append(group)
    done: set[str] = set()
    for group in vectorised:
        for info in _train_group(group, ctx):
            done.add(info["run_id"])
            yield info
    for spec in runs:
        if spec.run_id not in done:
            yield train_run(spec, ctx)


def _parent_config(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    parent = RunWriter(ctx.zoo_root, str(spec.parent_id))
    if not parent.is_finished():
        load_parent(spec, ctx)  # waits for another process as the per-run loop does (and raises on timeout)
    return json.loads((parent.folder / "config.json").read_text())


def _group_key(spec: RunSpec, pcfg: dict[str, Any], writer: RunWriter) -> str:
    c = spec.config
    ft = c.finetune
    assert ft is not None
    parent = [spec.parent_id, spec.parent_epoch] if ft.mode == "linear" else None
    opt = c.optimizer.resolved()["timm"]
    return canonical_json([population_key(spec), pcfg["architecture"], pcfg.get("model_args"), opt, parent,
                           resume_epoch(writer)])


def _train_group(specs: list[RunSpec], ctx: RunContext) -> list[dict[str, Any]]:
    """Sub-populations sized from memory; one that runs out of memory is halved (members resume)."""
    try:
        probe = _Population(specs[:1], ctx, dry=True)
    except _Unsupported as e:
        ctx.log(f"population not reproducible ({e}); training its runs one by one")
        return [train_run(s, ctx) for s in specs]
    cap = max_population(probe, ctx.device)
    del probe
    queue = balanced_chunks(list(specs), cap)
    infos: list[dict[str, Any]] = []
    while queue:
        chunk = queue.pop(0)
        chunk = [s for s in chunk if not RunWriter(ctx.zoo_root, s.run_id).is_finished()]
        if not chunk:
            continue
        oom = False
        try:
            pop = _Population(chunk, ctx)
            infos.extend(train_group(pop, ctx, f"population of {pop.P}"))
            del pop
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            oom = True
        except _Unsupported as e:
            ctx.log(f"population not reproducible ({e}); training its runs one by one")
            infos.extend(train_run(s, ctx) for s in chunk)
        if oom:  # outside the handler: the failed population's tensors are unreferenced by now
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            ctx.log(f"population of {len(chunk)} ran out of memory; halving (members continue from their last epoch)")
            queue[:0] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]
    return infos


def max_population(pop: _Population, device: torch.device, fraction: float = 0.5, cap: int = 4096) -> int:
    """How many members fit in ``fraction`` of the free device memory (an estimate; halved on OOM).

    Per member: the trainable parameters ~6 times (weights, gradient, two optimizer buffers,
    temporaries) and ~3 copies of one training batch's activations (forward + backward) in full
    mode; in linear mode the frozen backbone's activations are transient (no graph), so one copy.
    """
    cfg = pop.cfg
    act = activation_bytes_per_sample(pop.template, pop.in_shape)
    per = 6 * 4 * pop.n_trainable
    per += (3 if pop.mode == "full" else 1) * cfg.batch_size * act
    if device.type == "cpu":
        cap = routing.cpu_cap("cpu", f"vit-{pop.mode}", cap)
    return int(max(1, min(cap, fraction * free_bytes(device) // max(per, 1))))


# ---------------------------------------------------------------------------- members


def _get_rng() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_rng(state: tuple[Any, ...]) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


@dataclass
class _Run:
    """One run of a population: its loader, RNG state and optimizer bookkeeping (files: ``engine.Member``)."""

    spec: RunSpec
    writer: RunWriter
    built: Built
    lr0: float
    wd: float
    momentum: float
    clip: float | None
    param_groups: list[dict[str, Any]]
    """The ``param_groups`` of the run's real torch optimizer state dict (for the resume point)."""
    index_of: dict[str, int]
    """Parameter name → index in the torch optimizer state dict."""
    loader: Any = None
    sampler: Any = None
    it: Any = None
    rng: tuple[Any, ...] | None = None
    plain: bool = True
    """The loader serves cached tensors (no augmentation RNG): its batches depend on data_seed only."""

    def start_epoch(self, epoch: int) -> None:
        """What ``train_run`` does at the top of an epoch, then park this member's RNG state."""
        seed_module_rngs(self.spec.init_seed, self.spec.data_seed, epoch)
        self.sampler.set_epoch(epoch)
        self.it = iter(self.loader)
        self.rng = _get_rng()

    def next_batch(self) -> Any:
        if self.plain:
            return next(self.it)
        assert self.rng is not None
        _set_rng(self.rng)
        batch = next(self.it)
        self.rng = _get_rng()
        return batch


def _optimizer_view(net: nn.Module, spec: RunSpec) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """The run's real optimizer (as the loop builds it) and what the functional update needs of it."""
    opt = make_optimizer(net, spec.config)
    name_of = {id(p): n for n, p in net.named_parameters()}
    order = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    g0 = opt.param_groups[0]
    kind = {"AdamW": "adamw", "Adam": "adam", "SGD": "sgd"}.get(type(opt).__name__)
    if kind is None:
        raise _Unsupported(f"optimizer class {type(opt).__name__}")
    for g in opt.param_groups:
        if g.get("amsgrad") or g.get("maximize") or g.get("dampening", 0) or g.get("differentiable"):
            raise _Unsupported("amsgrad / maximize / dampening")
        for k in ("lr", "initial_lr", "betas", "eps", "momentum", "nesterov", "decoupled_weight_decay"):
            if g.get(k) != g0.get(k):
                raise _Unsupported(f"param groups differ in {k}")
    wds = {float(g["weight_decay"]) for g in opt.param_groups if g["weight_decay"]}
    if len(wds) > 1:
        raise _Unsupported("several non-zero weight decays")
    decayed = frozenset(name_of[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"])
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    if kind == "adam" and g0.get("decoupled_weight_decay"):
        kind = "adamw"
    info = {"kind": kind, "nesterov": bool(g0.get("nesterov", False)), "betas": tuple(g0.get("betas", (0.9, 0.999))),
            "eps": float(g0.get("eps", 1e-8)), "lr0": float(g0["initial_lr"]), "wd": wds.pop() if wds else 0.0,
            "momentum": float(g0.get("momentum", 0.0)), "decayed": decayed, "trainable": trainable,
            "index_of": {n: i for i, n in enumerate(order)}}
    return opt, info


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", copy=True)


# ---------------------------------------------------------------------------- the population


class _Population:
    """P fine-tuning runs of one group: trainable parameters as one flat (P, n) buffer."""

    def __init__(self, specs: list[RunSpec], ctx: RunContext, dry: bool = False) -> None:
        self.ctx, self.device = ctx, ctx.device
        self.cfg = cfg = specs[0].config
        ft = cfg.finetune
        assert ft is not None
        self.mode = ft.mode
        self.data = ctx.cache.splits(cfg.data)
        self.amp = amp_dtype(cfg.precision, self.device)
        if self.amp == torch.float16:
            raise _Unsupported("fp16")
        self.runs: list[_Run] = []
        self.members: list[Member] = []
        nets: list[nn.Module] = []
        self.opt_info: dict[str, Any] | None = None
        restored_epochs: list[int] = []
        opt_states: list[dict[str, dict[str, Tensor]]] = []
        for spec in specs:
            writer = RunWriter(ctx.zoo_root, spec.run_id)
            if not dry:
                writer.discard_temp_files()
            built = build_run(spec, ctx, self.data.num_classes, self.data.label_names)
            net = built.net
            opt, info = _optimizer_view(net, spec)
            self._check_compatible(info)
            r = _Run(spec, writer, built, lr0=info["lr0"], wd=info["wd"], momentum=info["momentum"],
                     clip=spec.config.optimizer.grad_clip or None,
                     param_groups=opt.state_dict()["param_groups"], index_of=info["index_of"])
            m = Member(spec, writer, built, self.data.name)
            if not dry:
                restored = restore(ctx, writer, spec, net, opt)  # the loop's own resume (weights + optimizer)
                if restored is not None:
                    m.start, m.history, m.elapsed = restored
                    m.fresh = False
            restored_epochs.append(m.start)
            names = {id(p): n for n, p in net.named_parameters()}
            opt_states.append({names[id(p)]: st for p, st in opt.state.items()})
            self.runs.append(r)
            self.members.append(m)
            nets.append(net)
        if len(set(restored_epochs)) != 1:
            raise _Unsupported(f"members resume at different epochs {sorted(set(restored_epochs))}")
        self.P = len(self.members)
        self.precision = str(self.amp or "float32")
        self.pp = self.runs[0].built.pp
        self.in_shape = (self.pp.channels, self.pp.img_size, self.pp.img_size)
        self._stack(nets, opt_states)
        for r, m in zip(self.runs, self.members, strict=True):  # the metadata finish_run needs, not P networks
            b = r.built  # (finish_run counts the exported parameters: the template's state has their shapes)
            r.built = m.built = Built(self.template, self.template.state_dict, b.arch, b.model_args, b.num_classes,
                                      b.num_features, b.pp, b.label_names, b.head, b.head_hidden)
        del nets, opt_states
        if not dry:
            self._loaders()

    # ------------------------------------------------------------ building
    def _check_compatible(self, info: dict[str, Any]) -> None:
        if self.opt_info is None:
            self.opt_info = dict(info)
            return
        o = self.opt_info
        for k in ("kind", "nesterov", "betas", "eps", "trainable"):
            if info[k] != o[k]:
                raise _Unsupported(f"members differ in {k}")
        if info["decayed"] and o["decayed"] and info["decayed"] != o["decayed"]:
            raise _Unsupported("members decay different parameters")
        if info["decayed"] and not o["decayed"]:
            o["decayed"] = info["decayed"]

    def _stack(self, nets: list[nn.Module], opt_states: list[dict[str, dict[str, Tensor]]]) -> None:
        o = self.opt_info
        assert o is not None
        dev = self.device
        self.kind, self.nesterov, self.betas, self.eps = o["kind"], o["nesterov"], o["betas"], o["eps"]
        trainable: list[str] = o["trainable"]
        decayed = o["decayed"]
        # Layout: parameters without weight decay first, then the decayed ones, so that the decay is one
        # slice of the buffer. The gradient-norm order (clip_grad_norm_) stays named_parameters order.
        self.layout = [n for n in trainable if n not in decayed] + [n for n in trainable if n in decayed]
        self.norm_order = list(trainable)
        template = nets[0]
        for mod in template.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = FUSED_ATTENTION
        template.requires_grad_(False)
        self.template = template.to(dev).eval()
        shapes = dict((n, p.shape) for n, p in template.named_parameters())
        sizes = [shapes[n].numel() for n in self.layout]
        self.n_trainable = sum(sizes)
        self.dec_off = sum(sizes[: len(self.layout) - len([n for n in self.layout if n in decayed])])
        rows = [torch.cat([dict(net.named_parameters())[n].detach().flatten() for n in self.layout]) for net in nets]
        self.flat = torch.stack(rows).to(dev).contiguous()
        self.params: dict[str, Tensor] = {}
        self.slots: dict[str, tuple[int, int, torch.Size]] = {}  # name -> (offset, numel, shape) in a row
        self._frozen: dict[str, Tensor] | None = None
        off = 0
        for n, k in zip(self.layout, sizes, strict=True):
            self.params[n] = self.flat[:, off:off + k].view(self.P, *shapes[n])
            self.slots[n] = (off, k, shapes[n])
            off += k
        # Optimizer state: restored rows or zeros (SGD's first step, buf = grad, equals 0 * momentum + grad).
        keys = ("exp_avg", "exp_avg_sq") if self.kind in ("adam", "adamw") else ("momentum_buffer",)
        self.state = {k: torch.zeros_like(self.flat) for k in keys}
        self.restored_steps: set[int] = set()
        for i, st in enumerate(opt_states):
            for k in keys:
                if st and all(k in st.get(n, {}) for n in self.layout):
                    self.state[k][i] = torch.cat([st[n][k].detach().flatten().to(dev) for n in self.layout])
            if "step" in st.get(self.layout[0], {}):
                self.restored_steps.add(int(float(st[self.layout[0]]["step"])))
            elif self.kind != "sgd":
                self.restored_steps.add(0)
        self.step_count = 0
        f64 = dict(dtype=torch.float64, device=dev)
        ms = self.runs
        self.lr0 = torch.tensor([m.lr0 for m in ms], **f64)
        self.wd64 = torch.tensor([m.wd for m in ms], **f64)
        self.wd32 = self.wd64.float()
        self.any_wd = any(m.wd for m in ms) and self.dec_off < self.n_trainable
        self.mom = torch.tensor([m.momentum for m in ms], dtype=torch.float32, device=dev)
        self.clip = None
        if any(m.clip for m in ms):
            self.clip = torch.tensor([m.clip or math.inf for m in ms], dtype=torch.float32, device=dev)
            self.has_clip = torch.tensor([bool(m.clip) for m in ms], device=dev)
        self.alive = torch.ones(self.P, dtype=torch.bool, device=dev)
        self._functions()

    def _functions(self) -> None:
        template, amp, dev = self.template, self.amp, self.device
        criterion = CrossEntropy(self.cfg, self.data.num_classes, self.device).criterion
        head = template.get_classifier()
        prefix = "head."

        def autocast() -> Any:
            return torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None)

        if self.mode == "full":
            def loss_fn(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
                with autocast():
                    return criterion(functional_call(template, params, (x,)), y)

            def fwd(params: dict[str, Tensor], x: Tensor) -> Tensor:
                return functional_call(template, params, (x,))
        else:
            hnames = {n: n[len(prefix):] for n in self.layout}
            if any(not n.startswith(prefix) for n in hnames):
                raise _Unsupported("linear probe with trainable parameters outside the head")

            def loss_fn(params: dict[str, Tensor], f: Tensor, y: Tensor) -> Tensor:
                with autocast():
                    return criterion(functional_call(head, {hnames[k]: v for k, v in params.items()}, (f,)), y)

            def fwd(params: dict[str, Tensor], f: Tensor) -> Tensor:
                return functional_call(head, {hnames[k]: v for k, v in params.items()}, (f,))

        self._grad = vmap(grad_and_value(loss_fn), in_dims=(0, 0, 0), randomness="error")
        self._fwd = vmap(fwd, in_dims=(0, None), randomness="error")
        self._autocast = autocast

    @torch.no_grad()
    def _features(self, x: Tensor) -> Tensor:
        """The frozen backbone's pre-logits features (linear probes): what the head sees in the loop."""
        t = self.template
        return t.forward_head(t.forward_features(x), pre_logits=True)

    # ------------------------------------------------------------ one step
    def _update(self, xs: Tensor, ys: Tensor, factor: float, where: Tensor | None = None) -> None:
        """One optimizer step of every member on its own batch (no host sync).

        ``xs[i], ys[i]`` is member i's batch; for linear probes ``xs`` may hold only the distinct batches,
        ``where[i]`` naming member i's (their frozen features are computed once).
        """
        self.template.train()
        if self.mode == "linear":
            with self._autocast():
                f = self._features(xs.flatten(0, 1))
            f = f.view(xs.shape[0], xs.shape[1], *f.shape[1:])
            grads, loss = self._grad(self.params, f if where is None else f[where], ys)
        else:
            grads, loss = self._grad(self.params, xs, ys)
        b = xs.shape[1]
        self.total += loss.detach().float() * b  # the loop's running sum: a non-finite loss poisons it
        self.seen += b
        self.alive &= torch.isfinite(loss)
        g = torch.cat([grads[n].flatten(1) for n in self.layout], 1)
        if self.clip is not None:  # clip_grad_norm_: per-parameter norms, their norm, one coefficient per model
            norms = torch.stack([torch.linalg.vector_norm(grads[n].flatten(1), 2, dim=1) for n in self.norm_order])
            coef = fopt.clip_coefficients(norms, self.clip)
            g = g * torch.where(self.has_clip, coef, torch.ones_like(coef))[:, None]
        del grads
        ok = self.alive
        g = torch.where(ok[:, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        lr = torch.where(ok, self.lr0 * factor, torch.zeros((), dtype=torch.float64, device=self.device))
        self.step_count += 1
        t = self.step_count
        p, d = self.flat, self.dec_off
        with torch.no_grad():
            if self.kind == "adamw":
                if self.any_wd:  # decayed parameters only (timm's groups: not biases, norms, embeddings)
                    fopt.decay_(p[:, d:], lr, self.wd64)
            elif self.any_wd:  # coupled: grad = grad.add(param, alpha=weight_decay)
                g[:, d:] = g[:, d:] + self.wd32[:, None] * p[:, d:]
            if self.kind in ("adam", "adamw"):  # torch.optim.Adam(W), single-tensor path
                fopt.adam_(p, g, self.state["exp_avg"], self.state["exp_avg_sq"], lr, t, self.betas, self.eps)
            else:  # torch.optim.SGD(momentum, dampening=0[, nesterov])
                fopt.sgd_(p, g, self.state["momentum_buffer"], lr, self.mom, self.nesterov)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> list[dict[str, Any]]:
        """The loop's ``_evaluate`` for every member: mean CE and top-1 per split, fp32, eval mode."""
        cfg, ctx = self.cfg, self.ctx
        self.template.eval()
        splits = ["train", "val"] + (["test"] if self.data.test is not None else [])
        bs = cfg.eval_batch_size or 4 * cfg.batch_size
        out: list[dict[str, Any]] = [{} for _ in range(self.P)]
        for split in splits:
            loss_sum = torch.zeros(self.P, dtype=torch.float64, device=self.device)
            correct = torch.zeros(self.P, dtype=torch.long, device=self.device)
            n = 0
            for x, y in eval_batches(ctx, cfg, split, self.pp, bs):
                x, y = x.to(self.device), y.to(self.device)
                inp = self._features(x) if self.mode == "linear" else x
                logits = self._fwd(self.params, inp).float()  # (P, b, classes)
                nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.P), reduction="none").view(self.P, -1)
                loss_sum += nll.sum(1).double()
                correct += (logits.argmax(-1) == y).sum(1)
                n += y.numel()
            for i, (lo, co) in enumerate(zip(loss_sum.tolist(), correct.tolist(), strict=True)):
                out[i][f"{split}_loss"] = lo / max(1, n)
                out[i][f"{split}_acc"] = co / max(1, n)
        return out

    # ------------------------------------------------------------ states
    def snapshot(self) -> dict[str, Tensor]:
        """One host copy of the flat parameters and optimizer buffers (per epoch; members' states are views)."""
        return {"flat": self.flat.detach().to("cpu", copy=True),
                **{k: v.detach().to("cpu", copy=True) for k, v in self.state.items()}}

    def state_dict(self, i: int, snap: dict[str, Tensor]) -> dict[str, Tensor]:
        """Member ``i``'s full state (timm names, on the CPU): what ``built.export()`` returns in the loop."""
        if self._frozen is None:  # the frozen backbone (linear probes) never changes: one host copy, shared
            self._frozen = {k: _cpu(v) for k, v in self.template.state_dict().items() if k not in self.params}
        own = {n: snap["flat"][i, off:off + k].view(shape) for n, (off, k, shape) in self.slots.items()}
        return {k: own[k] if k in own else self._frozen[k] for k in self.template.state_dict()}

    def optimizer_state(self, i: int, lr: float, snap: dict[str, Tensor]) -> dict[str, Any]:
        """Member ``i``'s ``torch.optim`` state dict (the loop's resume format)."""
        m = self.runs[i]
        groups = [{**g, "lr": lr} for g in m.param_groups]
        state: dict[int, dict[str, Any]] = {}
        if self.step_count > 0:
            for n, (off, k, shape) in self.slots.items():
                st: dict[str, Any] = {}
                if self.kind in ("adam", "adamw"):
                    st["step"] = torch.tensor(float(self.step_count), dtype=torch.float32)
                    st["exp_avg"] = snap["exp_avg"][i, off:off + k].view(shape)
                    st["exp_avg_sq"] = snap["exp_avg_sq"][i, off:off + k].view(shape)
                elif m.momentum != 0:
                    st["momentum_buffer"] = snap["momentum_buffer"][i, off:off + k].view(shape)
                if st:
                    state[m.index_of[n]] = st
        return {"state": state, "param_groups": groups}

    # ------------------------------------------------------------ the engine's Members interface
    def _loaders(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        for r in self.runs:
            r.loader, r.sampler = _loader(ctx, cfg, self.pp, r.spec)
            r.plain = isinstance(r.loader.dataset, torch.utils.data.TensorDataset)
        self.steps = len(self.runs[0].loader)
        if self.steps == 0:
            raise ValueError(f"{self.runs[0].spec.run_id}: the training split is empty")
        start = self.members[0].start
        self.step_count = start * self.steps  # one optimizer step per batch, as for a run alone
        if self.restored_steps - {self.step_count}:
            raise _Unsupported(f"restored optimizer steps {sorted(self.restored_steps)} != {self.step_count}")
        self.lr_at = lr_schedule(cfg, self.steps)
        self.epoch = start
        self._snap: dict[str, Tensor] | None = None

    def rng_scope(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # each member's loader RNG is seeded per epoch and parked (_Run)

    def epoch0(self, idx: list[int]) -> list[tuple[dict[str, Any], dict[str, Tensor]]]:
        metrics = self.evaluate()
        self._snap = self.snapshot()
        return [(metrics[i], self.state_dict(i, self._snap)) for i in idx]

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for r in self.runs:
            r.start_epoch(epoch)
        self.total = torch.zeros(self.P, dtype=torch.float32, device=self.device)
        self.seen = 0
        # Linear probes compute the frozen features once per distinct batch: cached-tensor loaders with the
        # same data seed serve the same batches; augmented ones are distinct per member.
        self.first, self.where = list(range(self.P)), None
        if self.mode == "linear":
            keys = [("d", r.spec.data_seed) if r.plain else ("m", i) for i, r in enumerate(self.runs)]
            distinct = list(dict.fromkeys(keys))
            self.first = [keys.index(k) for k in distinct]
            if len(self.first) < self.P:
                self.where = torch.tensor([distinct.index(k) for k in keys], dtype=torch.long, device=self.device)

    def step(self, i: int, lr_factor: float) -> None:
        batches = [r.next_batch() for r in self.runs]  # every member's loader advances, as when trained alone
        xs = torch.stack([batches[j][0] for j in self.first]).to(self.device, non_blocking=True)
        ys = torch.stack([b[1] for b in batches]).to(self.device, non_blocking=True)
        self._update(xs, ys, lr_factor, self.where)

    def end_epoch(self) -> list[tuple[bool, float]]:
        objective = [v / max(1, self.seen) for v in self.total.tolist()]  # one host sync per epoch
        return [(math.isfinite(v), v) for v in objective]

    def states(self) -> list[dict[str, Tensor]]:
        self._snap = self.snapshot()
        return [self.state_dict(i, self._snap) for i in range(self.P)]

    def columns(self, j: int, state: dict[str, Tensor], epoch0: bool = False) -> dict[str, Any]:
        return {}

    def lr(self, j: int) -> float:
        return self.runs[j].lr0 * self.lr_at(self.epoch * self.steps - 1)

    def save_resume(self, j: int, epoch: int, elapsed_s: float) -> None:
        """The per-run resume point (weights + a torch optimizer state dict), shared with runs trained alone."""
        assert self._snap is not None
        lr = self.runs[j].lr0 if epoch == 0 else self.lr(j)
        self.members[j].writer.save_resume(epoch, self.state_dict(j, self._snap),
                                           self.optimizer_state(j, lr, self._snap), {"elapsed_s": elapsed_s})

    def keep(self, idx: list[int]) -> None:
        """Members not in ``idx`` (diverged) are frozen: zero steps; the stack keeps its shape."""
        mask = torch.zeros(self.P, dtype=torch.bool, device=self.device)
        mask[idx] = True
        self.alive &= mask


def _loader(ctx: RunContext, cfg: Any, pp: Any, spec: RunSpec) -> tuple[Any, Any]:
    return train_loader(ctx.cache, cfg.data, pp, cfg.aug, cfg.batch_size, spec.data_seed)


__all__ = ["max_population", "train_stage", "unsupported"]
