"""Recipes: commented YAML validated into typed dataclasses.

A recipe names a zoo and lists its stages in order (for ViT zoos ``pretrain`` then ``finetune``;
the classic CNN zoos have one ``train`` stage). Every stage has fixed settings (the dataclass
fields) and ``grid`` axes over any of those settings; the zoo is the product of the axes times the
seeds, or a reproducible random sample of it.

Everything is checked here, before any training: unknown keys, wrong types, impossible values and
empty grids raise :class:`RecipeError` naming the file, the key and what is allowed. This module
knows nothing of torch.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vitzoo import presets
from vitzoo.errors import VitzooError


class RecipeError(VitzooError, ValueError):
    """A recipe is invalid. The message names the file, the key and what is allowed."""


# --------------------------------------------------------------------------- sections


#: Offline sources: images (digits, shapes), text (arithmetic: a procedurally generated language for
#: causal_lm) and the PINN task's own collocation points (convection: no data at all).
BUILTIN_SOURCES = ("digits", "shapes", "arithmetic", "convection")
#: Built-in sources that are not images, and the objective each is for.
BUILTIN_TASK_SOURCES = {"arithmetic": "causal_lm", "convection": "pinn"}


@dataclass
class DataConfig:
    """Where a stage's images come from. All sources are read through `datasets`."""

    source: str = "builtin:digits"
    """``builtin:digits`` / ``builtin:shapes`` (offline), ``hf:<hub dataset id>``,
    ``imagefolder:<dir>`` or ``parquet:<dir or file>``."""
    config: str | None = None
    """Hub dataset configuration name (``datasets.load_dataset(id, config)``)."""
    train_split: str = "train"
    val_split: str | None = None
    """Validation split; when None, ``val_size`` (or ``val_fraction``) of train is carved off deterministically."""
    test_split: str | None = "test"
    """Held-out split, reported only: never used for model selection."""
    val_fraction: float = 0.1
    """Fraction of train carved off as validation (rounded up) when there is no ``val_split``."""
    val_size: int | None = None
    """Exact number of validation samples carved from train (the reference splits: 10,000 of MNIST's
    60,000); overrides ``val_fraction``."""
    split_seed: int = 42
    """Seed of the train/val carve (the reference zoos use 42)."""
    image_column: str = "image"
    label_column: str = "label"
    text_column: str = "text"
    """Column holding the documents of a text source (objective causal_lm)."""
    tokenizer: str | None = None
    """Tokenizer of a text source: a Hub id or local folder (``gpt2`` for OpenWebText); None for
    ``builtin:arithmetic``, whose tokenizer is trained locally with `tokenizers`."""
    channels: int = 3
    """Channels the model sees: 1 (grayscale) or 3 (RGB); images are converted."""
    mean: list[float] | None = None
    """Per-channel normalisation mean (the phase zoos' CIFAR-10 ``[0.4914, 0.4822, 0.4465]``...); default 0.5
    for the built-ins and grayscale, ImageNet's otherwise. Saved in every model's preprocessing metadata."""
    std: list[float] | None = None
    """Per-channel normalisation standard deviation; set with ``mean``."""
    crop_pct: float = 1.0
    """Centre-crop fraction of timm's eval transform: resize to img_size / crop_pct, then crop img_size
    (SVHN's 28 px crop of 32 px images: 0.875). Saved in every model's preprocessing metadata."""
    max_train_samples: int | None = None
    """Cap the training set (after the val carve); for quick runs."""
    max_eval_samples: int | None = None
    """Cap each evaluation split; for quick runs on big datasets."""
    num_workers: int = 0
    """DataLoader worker processes."""
    revision: str | None = None
    """Hub dataset revision (commit, tag, branch) to pin the data."""

    def __post_init__(self) -> None:
        kinds = ("builtin:", "hf:", "imagefolder:", "parquet:")
        if not self.source.startswith(kinds):
            raise ValueError(f"source must start with one of {', '.join(kinds)}; got {self.source!r}")
        if self.source.startswith("builtin:") and self.source[8:] not in BUILTIN_SOURCES:
            raise ValueError(f"unknown builtin dataset {self.source!r}; allowed: "
                             f"{', '.join('builtin:' + b for b in BUILTIN_SOURCES)}")
        _check_range("val_fraction", self.val_fraction, 0.0, 0.9)
        if self.val_size is not None and not (isinstance(self.val_size, int) and self.val_size >= 1):
            raise ValueError(f"val_size must be an integer >= 1 (samples); got {self.val_size!r}")
        if self.val_split is None and self.val_fraction <= 0 and self.val_size is None:
            raise ValueError("no val_split and val_fraction is 0: a validation split is required")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.1, 1]; got {self.crop_pct}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {self.channels}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are set together")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and (len(v) != self.channels or (k == "std" and min(v) <= 0)):
                raise ValueError(f"{k} needs one {'positive ' if k == 'std' else ''}value per channel "
                                 f"({self.channels}); got {v}")
        for k in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"{k} must be >= 1; got {v}")


@dataclass
class ModelConfig:
    """The architecture. ``variant`` names a preset; the other fields override it."""

    variant: str = "S/16"
    """ViT ``<size>/<patch>`` (mu, Ti, S, M, B, L; ``micro`` = mu/4), the classic cnn-s, cnn-m, the CIFAR
    resnet18 / resnet50 (width-scaled by ``width``), gpt2 (objective causal_lm) or mlp (objective pinn)."""
    img_size: int | None = None
    """Input resolution; default 224 for ViTs (32 for micro), fixed for the CNNs (ResNets: 32, any size works)."""
    patch_size: int | None = None
    """Override the variant's patch size."""
    width: int | None = None
    """The load axis of the width-scaled families: ResNet stage widths ``w, 2w, 4w, 8w`` (64 = the standard
    network, the default), ViT embedding width (heads ``max(1, width // 64)``, MLP ratio kept), GPT-2
    ``n_embd`` (model_dim), PINN MLP hidden width."""
    depth: int | None = None
    """Override the depth: ViT blocks, GPT-2 layers, PINN MLP hidden layers."""
    positions: int | None = None
    """GPT-2 ``n_positions``: the longest context the model accepts (default 1024); objective.context_length
    must not exceed it."""
    drop_path_rate: float = 0.0
    activation: str | None = None
    """CNN / MLP activation: tanh, relu, sigmoid, gelu, leaky_relu, silu (ViTs use GELU)."""
    dropout: float = 0.0
    """CNN dropout probability (after the activation, as in the reference); GPT-2 residual, embedding and
    attention dropout."""
    init: str | None = None
    """CNN / MLP init scheme: U, N, KU, KN, xavier (CNN biases 0.01, as in the reference; PINN MLP biases 0)."""

    def __post_init__(self) -> None:
        vit = presets.parse_vit_variant(self.variant)
        known = presets.CNN_VARIANTS + presets.TASK_VARIANTS
        if vit is None and self.variant not in known:
            raise ValueError(f"unknown variant {self.variant!r}; allowed: {', '.join(presets.known_variants())}")
        if vit is not None and (self.activation or self.init or self.dropout):
            raise ValueError("activation, init and dropout apply to the CNN variants only")
        _check_range("drop_path_rate", self.drop_path_rate, 0.0, 1.0)
        _check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        for k in ("img_size", "patch_size", "width", "depth", "positions"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{k} must be a positive integer; got {v!r}")
        if self.width is not None and vit is None and self.variant not in presets.WIDTH_VARIANTS:
            raise ValueError(f"width: variant {self.variant!r} has no width axis (width-scaled: ViTs, "
                             f"{', '.join(presets.WIDTH_VARIANTS)})")
        if self.depth is not None and vit is None and self.variant not in presets.TASK_VARIANTS:
            raise ValueError(f"depth: variant {self.variant!r} has a fixed depth (depth applies to ViTs, "
                             f"{', '.join(presets.TASK_VARIANTS)})")
        if self.positions is not None and self.variant != "gpt2":
            raise ValueError("positions applies to gpt2 only")
        if (vit is not None or self.variant == "gpt2") and self.width is not None and self.width >= 128 \
                and self.width % 64:
            raise ValueError(f"width: a {'ViT' if vit else 'GPT-2'}'s heads have 64 dimensions from width 128 on (one "
                             f"head below), so the width must be a multiple of 64 there; got {self.width}")
        if vit is not None:
            img, patch = self.resolved_img_size, self.resolved_patch_size
            if img % patch:
                raise ValueError(f"img_size {img} is not a multiple of patch_size {patch}")

    @property
    def is_vit(self) -> bool:
        return presets.parse_vit_variant(self.variant) is not None

    @property
    def is_image(self) -> bool:
        """An image classifier (ViT or CNN/ResNet), as opposed to a GPT-2 or a PINN."""
        return self.variant not in presets.TASK_VARIANTS

    @property
    def resolved_patch_size(self) -> int:
        vit = presets.parse_vit_variant(self.variant)
        assert vit is not None
        return self.patch_size or vit[1]

    @property
    def resolved_img_size(self) -> int:
        vit = presets.parse_vit_variant(self.variant)
        if vit is None:
            if not self.is_image:
                raise ValueError(f"variant {self.variant!r} does not take images")
            return self.img_size or {"cnn-s": 28, "cnn-m": 32, "resnet18": 32, "resnet50": 32}[self.variant]
        return self.img_size or presets.VIT_DEFAULT_IMG_SIZE.get(vit[0], 224)


@dataclass
class ObjectiveConfig:
    """What the stage optimises: image classification (supervised, simclr), language modelling (causal_lm,
    with a gpt2 model) or a physics-informed loss (pinn, with an mlp model)."""

    name: Literal["supervised", "simclr", "causal_lm", "pinn"] = "supervised"
    temperature: float = 0.07
    """InfoNCE temperature (simclr)."""
    proj_dim: int = 128
    """Output size of the SimCLR projection head."""
    knn_k: int = 20
    """Neighbours of the kNN accuracy reported for contrastive stages."""
    knn_bank_size: int = 10000
    """Training images embedded for the kNN bank (a cap: ImageNet has 1.28M)."""
    context_length: int = 128
    """Tokens per training sequence (causal_lm); at most the model's ``positions``."""
    beta: float = 1.0
    """Convection coefficient of the PINN task ``u_t + beta u_x = 0`` (pinn): the load axis of the PINN zoo."""
    collocation_points: int = 1000
    """PINN: interior points where the residual is enforced, drawn uniformly in ``[0, 2π) × [0, 1]`` from the
    run's data seed; an epoch is one pass over them in batches of ``batch_size``."""
    initial_points: int = 256
    """PINN: points of the initial condition ``u(x, 0) = sin x`` (x uniform in ``[0, 2π)``), all in every step."""
    boundary_points: int = 100
    """PINN: times of the periodic boundary condition ``u(0, t) = u(2π, t)`` (t uniform in ``[0, 1]``), all in
    every step."""
    residual_weight: float = 1.0
    """PINN: the loss is ``residual_weight · mean(residual²) + mean(IC error²) + mean(BC error²)``."""
    eval_grid: list[int] = field(default_factory=lambda: [256, 100])
    """PINN: the evaluation grid ``[nx, nt]``: x = nx points of ``[0, 2π)`` (endpoint excluded), t = nt points
    of ``[0, 1]`` (both ends); ``test_rel_l2`` and the test losses are measured on it."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2 tokens; got {self.context_length}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the convection coefficient); got {self.beta}")
        for k in ("collocation_points", "initial_points", "boundary_points"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer; got {v!r}")
        if not self.residual_weight > 0:
            raise ValueError(f"residual_weight must be > 0; got {self.residual_weight}")
        g = self.eval_grid
        if (len(g) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in g) or g[0] < 1
                or g[1] < 2):
            raise ValueError(f"eval_grid must be [nx, nt] with nx >= 1 and nt >= 2 integers; got {g!r}")


@dataclass
class OptimizerConfig:
    """The optimizer; ``name`` picks a preset whose lr/weight_decay/momentum the other fields override."""

    name: str = "adamw"
    """adamw, adam, sgd (momentum), nesterov, lamb, lion."""
    lr: float | None = None
    """Peak learning rate; default the preset's."""
    weight_decay: float | None = None
    momentum: float | None = None
    """SGD momentum; default 0.9."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm; null disables."""

    def __post_init__(self) -> None:
        if self.name not in presets.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; allowed: {', '.join(presets.OPTIMIZERS)}")
        for k in ("lr", "weight_decay", "momentum"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"{k} must be >= 0; got {v}")
        if self.lr is not None and self.lr == 0:
            raise ValueError("lr must be > 0")

    def resolved(self) -> dict[str, Any]:
        """The preset merged with the overrides (what the trainer uses)."""
        out = dict(presets.OPTIMIZERS[self.name])
        for k in ("lr", "weight_decay", "momentum"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped per optimizer step."""

    name: Literal["cosine", "constant", "onecycle"] = "cosine"
    warmup: str = "0ep"
    """Linear warmup as a duration with a unit: ``2ep`` (epochs) or ``500st`` (steps)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine)."""

    def __post_init__(self) -> None:
        parse_duration(self.warmup)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclass
class AugConfig:
    """Training augmentation; ``level`` picks a preset (none/light/medium/strong), fields override it."""

    level: str = "none"
    scale: list[float] | None = None
    """RandomResizedCrop scale range; null = plain resize."""
    hflip: float | None = None
    """Probability of a horizontal flip."""
    crop_padding: int | None = None
    """Random crop of the image size after zero-padding (black) by this many pixels on every side, the
    CIFAR recipe (``RandomCrop(32, padding=4)``); 0 = off. An alternative to ``scale``, not a companion."""
    rotation: float | None = None
    """Random rotation by up to this many degrees either way, after crop and flip, corners black
    (``RandomRotation(20)`` of the phase-transition zoos); null / 0 = off."""
    rand_augment: str | None = None
    """timm RandAugment config string, e.g. ``rand-m9-mstd0.5-inc1``."""
    mixup: float | None = None
    """Mixup alpha (0 = off)."""
    cutmix: float | None = None
    """CutMix alpha (0 = off)."""
    re_prob: float | None = None
    """Random-erasing probability."""
    label_smoothing: float | None = None

    def __post_init__(self) -> None:
        if self.level not in presets.AUG_LEVELS:
            raise ValueError(f"unknown aug level {self.level!r}; allowed: {', '.join(presets.AUG_LEVELS)}")
        base = presets.AUG_LEVELS[self.level]
        for k, v in base.items():  # resolve the preset into the fields: the resolved config is explicit
            if getattr(self, k) is None and v is not None:
                setattr(self, k, copy.copy(v))
        for k in ("hflip", "re_prob", "label_smoothing"):
            v = getattr(self, k)
            if v is not None:
                _check_range(k, v, 0.0, 1.0)
        for k in ("mixup", "cutmix"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"{k} must be >= 0; got {v}")
        if self.rotation is not None:
            _check_range("rotation", self.rotation, 0.0, 180.0)
        if self.crop_padding is not None and not (isinstance(self.crop_padding, int) and self.crop_padding >= 0):
            raise ValueError(f"crop_padding must be an integer >= 0 (pixels); got {self.crop_padding!r}")
        if self.rotation and self.scale is not None:
            raise ValueError(f"rotation ({self.rotation}) goes with the padded-crop recipe (crop_padding), not with "
                             "random resized crops (scale); set scale: null")
        if self.crop_padding and self.scale is not None:
            raise ValueError(f"crop_padding ({self.crop_padding}) and scale ({self.scale}) are two different random "
                             "crops; set one (scale: null for the padded crop)")
        if self.scale is not None and not (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must be [lo, hi] with 0 < lo <= hi <= 1; got {self.scale}")
        if self.rand_augment is not None and not self.rand_augment.startswith("rand"):
            raise ValueError(f"rand_augment must be a timm RandAugment string like 'rand-m9-mstd0.5'; got {self.rand_augment!r}")


@dataclass
class FinetuneConfig:
    """Fine-tuning from the models of an earlier stage: each parent × this stage's grid."""

    parent_stage: str = "pretrain"
    parent_epoch: str = "last"
    """Which parent state to start from: ``last`` or an epoch number (a saved checkpoint)."""
    mode: Literal["full", "linear", "lora"] = "full"
    """full fine-tuning, linear probe (frozen backbone), or LoRA adapters (peft)."""
    head: Literal["linear", "mlp"] = "linear"
    head_hidden: int | None = None
    """Hidden width of the MLP head; default the backbone width."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    """Module names that get LoRA adapters (timm ViT naming)."""

    def __post_init__(self) -> None:
        if self.parent_epoch != "last" and not str(self.parent_epoch).isdigit():
            raise ValueError(f"parent_epoch must be 'last' or an epoch number; got {self.parent_epoch!r}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1; got {self.lora_r}")


@dataclass
class SparsifyConfig:
    """Sparsified twins (Model Zoos §1): variational-dropout sparsification of each parent model.

    Each parent's state at ``parent_epoch`` is trained further with variational dropout
    (Molchanov et al. 2017) for the stage's ``epochs``; weights whose log alpha reaches
    ``threshold`` are pruned, and ``sparsity_ratio`` is recorded per epoch in the index.
    """

    parent_stage: str = "train"
    parent_epoch: str = "last"
    """Which parent state to start from: ``last`` or an epoch number (a saved checkpoint)."""
    log_sigma2_init: float = -10.0
    threshold: float = 3.0
    """Prune a weight when its log alpha = log sigma^2 - log w^2 is at least this."""
    kl_weight: float = 1.0
    """Weight of the KL term, ramped in by min(1, 0.01 * epoch / epochs) as in the reference."""

    def __post_init__(self) -> None:
        if self.parent_epoch != "last" and not str(self.parent_epoch).isdigit():
            raise ValueError(f"parent_epoch must be 'last' or an epoch number; got {self.parent_epoch!r}")


@dataclass
class SeedConfig:
    """Seeds: the repetitions of every grid point.

    ``init`` lists the initialisation seeds (``[0, 1]`` or a range ``"1..1000"``). With
    ``random: N`` each grid point instead gets N seeds drawn from the recipe's sampling seed and
    recorded per model (the reference "Hyp-10-rand" zoos). ``data`` sets the data-order seed:
    ``same`` (equal to the init seed), ``fixed`` (one data order for all models: ``fixed_data_seed``)
    or ``offset`` (init seed + 1000003, decorrelated from init).
    """

    init: list[int] = field(default_factory=lambda: [0])
    random: int = 0
    data: Literal["same", "fixed", "offset"] = "same"
    fixed_data_seed: int = 0

    def __post_init__(self) -> None:
        if not self.init and not self.random:
            raise ValueError("no seeds: give init seeds or random: N")
        if len(set(self.init)) != len(self.init):
            raise ValueError(f"init seeds repeat: {self.init}")
        if self.random < 0:
            raise ValueError(f"random must be >= 0; got {self.random}")


@dataclass
class SampleConfig:
    """Train a fixed-size random subset of the grid × seeds, reproducible from ``seed``."""

    n: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1; got {self.n}")


@dataclass
class StageConfig:
    """One stage of a zoo: fixed settings, grid axes over them, and seeds."""

    name: str = "train"
    finetune: FinetuneConfig | None = None
    """Present for fine-tuning stages: which parent stage and how."""
    sparsify: SparsifyConfig | None = None
    """Present for sparsification stages (sparsified twins of a parent stage's models)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig | None = None
    """The architecture (fine-tuning stages inherit their parent's)."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int | None = None
    """Default: 4 × batch_size."""
    micro_batch_size: int | None = None
    """Gradient accumulation: at most this many samples per forward pass; ``batch_size`` stays the effective
    batch (one optimizer step per ``batch_size`` samples, the schedule counts optimizer steps). Batchnorm
    statistics see the micro-batch. Must divide batch_size when smaller (a batch no larger than it is one
    forward pass); null = one forward per batch."""
    micro_batch_by_width: dict[str, int] | None = None
    """``micro_batch_size`` by model width, for grids whose large widths do not fit a batch on the device: the
    value of the largest width key at or below ``model.width`` (64 when unset) becomes ``micro_batch_size``,
    e.g. ``{64: 512, 128: 256, 256: 128}`` (the reference ResNet-50 zoos' rule). Narrower models: one forward
    per batch. When set, it decides micro_batch_size for every grid point."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision; auto = bf16 where the device supports it, else fp32."""
    checkpoint_every: int = 1
    """Save a checkpoint every N epochs; epoch 0 (the initialisation) and the last are always saved."""
    checkpoint_epochs: list[int] | None = None
    """Explicit epochs to save instead of checkpoint_every (0 and the last are added)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Axes: setting name (``lr``, ``optimizer.name``, ``aug``, ``model``...) to a list of values."""
    seeds: SeedConfig = field(default_factory=SeedConfig)
    sample: SampleConfig | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"stage name must be lowercase letters, digits and _; got {self.name!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1; got {self.checkpoint_every}")
        if self.finetune is not None and self.sparsify is not None:
            raise ValueError("a stage is either `finetune` or `sparsify`, not both")
        if self.parent is None and self.model is None:
            raise ValueError("a stage without `finetune` or `sparsify` needs a `model`")
        if self.parent is not None and self.model is not None:
            raise ValueError("a fine-tuning or sparsification stage inherits its parent's `model`; remove `model`")
        if self.objective.name == "simclr" and self.finetune is not None:
            raise ValueError("fine-tuning stages are supervised; objective simclr is for pre-training")
        if self.micro_batch_by_width is not None:  # it decides micro_batch_size (recomputed for every grid point)
            try:
                rule = sorted((int(w), int(m)) for w, m in self.micro_batch_by_width.items())
            except ValueError:
                raise ValueError(f"micro_batch_by_width maps widths to micro-batch sizes (integers); got "
                                 f"{self.micro_batch_by_width}") from None
            width = (self.model.width if self.model is not None else None) or 64
            fitting = [m for w, m in rule if w <= width]
            self.micro_batch_size = fitting[-1] if fitting and fitting[-1] < self.batch_size else None
        if self.micro_batch_size is not None:
            if self.objective.name == "simclr":
                raise ValueError("micro_batch_size: SimCLR's loss contrasts the whole batch; it cannot be accumulated")
            m = self.micro_batch_size
            if m < 1 or (m < self.batch_size and self.batch_size % m):
                raise ValueError(f"micro_batch_size ({m}) must be >= 1 and divide batch_size ({self.batch_size}) "
                                 "when smaller")
        self._check_task()

    def _check_task(self) -> None:
        """Model, objective and data of one task belong together (a GPT-2 reads text, a PINN no data)."""
        obj, src = self.objective.name, self.data.source
        builtin_task = BUILTIN_TASK_SOURCES.get(src[8:]) if src.startswith("builtin:") else None
        if self.model is not None:
            want = presets.TASK_OBJECTIVE.get(self.model.variant)
            if want is not None and obj != want:
                raise ValueError(f"objective.name: model {self.model.variant!r} is trained with objective {want!r}; "
                                 f"got {obj!r}")
            if want is None and obj in presets.TASK_OBJECTIVE.values():
                need = next(v for v, o in presets.TASK_OBJECTIVE.items() if o == obj)
                raise ValueError(f"model.variant: objective {obj!r} trains a {need!r} model; got "
                                 f"{self.model.variant!r}")
            if self.model.variant == "gpt2" and self.objective.context_length > (self.model.positions or 1024):
                raise ValueError(f"objective.context_length ({self.objective.context_length}) exceeds the model's "
                                 f"positions ({self.model.positions or 1024})")
        if obj in presets.TASK_OBJECTIVE.values() and self.parent is not None:
            raise ValueError(f"objective {obj!r}: fine-tuning and sparsification stages are for image classifiers")
        if obj == "pinn" and src != "builtin:convection":
            raise ValueError(f"data.source: objective pinn draws its own collocation points; set data: "
                             f"builtin:convection (got {src!r})")
        if obj == "causal_lm" and (src.startswith("builtin:") and builtin_task != "causal_lm"
                                   or src.startswith("imagefolder:")):
            raise ValueError(f"data.source: objective causal_lm reads text (builtin:arithmetic, hf:<id>, "
                             f"parquet:<path>); got {src!r}")
        if builtin_task is not None and obj != builtin_task:
            raise ValueError(f"data.source: {src} is data for objective {builtin_task!r}; got objective {obj!r}")

    @property
    def parent(self) -> FinetuneConfig | SparsifyConfig | None:
        """The section naming this stage's parent stage (fine-tuning or sparsification), if any."""
        return self.finetune or self.sparsify

    def saved_epochs(self) -> list[int]:
        """Epochs whose state is saved: 0, every N-th (or the explicit list), and the last."""
        if self.checkpoint_epochs is not None:
            eps = {e for e in self.checkpoint_epochs if 0 <= e <= self.epochs}
        else:
            eps = set(range(0, self.epochs + 1, self.checkpoint_every))
        return sorted(eps | {0, self.epochs})


@dataclass
class Recipe:
    """A zoo: a name, a sampling seed and its stages in order."""

    name: str
    stages: list[StageConfig]
    description: str = ""
    seed: int = 0
    """Sampling seed: random grid samples and random per-model seeds derive from it."""
    license: str = "mit"
    """License written into the zoo's cards."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name must be letters, digits, '-', '_' or '.'; got {self.name!r}")
        if not self.stages:
            raise ValueError("a recipe needs at least one stage")
        seen: dict[str, StageConfig] = {}
        for st in self.stages:
            if st.name in seen:
                raise ValueError(f"stage {st.name!r} appears twice")
            if st.parent is not None:
                parent = seen.get(st.parent.parent_stage)
                if parent is None:
                    raise ValueError(
                        f"stage {st.name!r}: parent_stage {st.parent.parent_stage!r} is not an earlier stage"
                        f" (earlier: {', '.join(seen) or 'none'})"
                    )
                pe = st.parent.parent_epoch
                if pe != "last":
                    for p in _stage_variants(parent):
                        if int(pe) not in p.saved_epochs():
                            raise ValueError(
                                f"stage {st.name!r}: parent_epoch {pe} is not saved by stage {parent.name!r}"
                                f" (saved: {p.saved_epochs()})"
                            )
            seen[st.name] = st

    source = "<recipe>"
    """Where the recipe was read from (for error messages); not part of the recipe."""

    def stage(self, name: str) -> StageConfig:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(f"no stage {name!r} in recipe {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (presets expanded); written into every zoo."""
        d = dataclasses.asdict(self)
        d["stages"] = {s.pop("name"): s for s in d["stages"]}
        return d


# --------------------------------------------------------------------------- identity

#: Fields added after zoos were first made, with their defaults. While at the default they are left out of
#: run ids and recipe digests (:func:`identity`), so a zoo made before a field existed keeps its model names
#: and still resumes. A new field goes here with its default (section ``""`` = the stage itself).
LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "": {"micro_batch_size": None, "micro_batch_by_width": None},
    "model": {"width": None, "depth": None, "positions": None},
    "objective": {"context_length": 128, "beta": 1.0, "collocation_points": 1000, "initial_points": 256,
                  "boundary_points": 100, "residual_weight": 1.0, "eval_grid": [256, 100]},
    "data": {"text_column": "text", "tokenizer": None, "mean": None, "std": None},
    "aug": {"rotation": None},
}


def identity(stage: dict[str, Any]) -> dict[str, Any]:
    """A stage config as plain data (``dataclasses.asdict``) without the :data:`LATER_DEFAULTS` fields that
    are at their defaults: what names a run."""
    out = dict(stage)
    for section, defaults in LATER_DEFAULTS.items():
        d = out if not section else out.get(section)
        if not isinstance(d, dict):
            continue
        d = dict(d)
        for k, v in defaults.items():
            if k in d and d[k] == v:
                del d[k]
        if section:
            out[section] = d
        else:
            out = d
    return out


# --------------------------------------------------------------------------- grid axes

#: Short names for the axes users vary most, mapped to dotted paths in StageConfig.
AXIS_ALIASES = {
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "wd": "optimizer.weight_decay",
    "momentum": "optimizer.momentum",
    "head": "finetune.head",
    "mode": "finetune.mode",
    "activation": "model.activation",
    "dropout": "model.dropout",
    "init": "model.init",
    "variant": "model.variant",
    "temperature": "objective.temperature",
    "width": "model.width",
    "depth": "model.depth",
    "beta": "objective.beta",
    "context_length": "objective.context_length",
}


def axis_path(key: str) -> str:
    return AXIS_ALIASES.get(key, key)


def apply_axes(stage: StageConfig, values: dict[str, Any], where: str = "") -> StageConfig:
    """Return a copy of ``stage`` with grid values applied and validated, grid/seeds/sample cleared."""
    raw = _stage_to_raw(stage)
    for key, value in values.items():
        _set_path(raw, axis_path(key).split("."), value)
    raw.pop("grid", None)
    raw.pop("sample", None)
    raw["seeds"] = {"init": [0]}
    return _build(StageConfig, raw, where or f"stages.{stage.name}")


def _stage_variants(stage: StageConfig) -> list[StageConfig]:
    """The stage with each value of each grid axis applied (one axis at a time: cheap validation)."""
    out = []
    for key, values in stage.grid.items():
        for v in values:
            out.append(apply_axes(stage, {key: v}, f"stages.{stage.name}.grid.{key}"))
    return out or [stage]


def _stage_to_raw(stage: StageConfig) -> dict[str, Any]:
    raw = dataclasses.asdict(stage)
    return raw


def _set_path(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    head, *rest = parts
    if not rest:
        # A preset name may replace a whole section: `aug: strong`, `optimizer: sgd`, `model: S/16`.
        if isinstance(value, str) and head in _PRESET_FIELD:
            raw[head] = {_PRESET_FIELD[head]: value}
        elif isinstance(value, dict) and isinstance(raw.get(head), dict):
            raw[head] = {**_reset_preset(head, raw[head]), **value}
        else:
            raw[head] = value
        return
    sub = raw.get(head)
    if sub is None:
        sub = raw[head] = {}
    if not isinstance(sub, dict):
        raise RecipeError(f"grid axis {'.'.join(parts)!r}: {head!r} is not a section")
    _set_path(sub, rest, value)


def _reset_preset(head: str, section: dict[str, Any]) -> dict[str, Any]:
    return section if head not in _PRESET_FIELD else {}


#: Sections that accept a bare preset name, and the field that name goes to.
_PRESET_FIELD = {"model": "variant", "aug": "level", "optimizer": "name", "schedule": "name", "objective": "name",
                 "data": "source"}


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Raises RecipeError naming the file and key at fault."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with keys name, stages, ...")
    data = copy.deepcopy(data)
    stages = data.get("stages")
    if isinstance(stages, dict):  # `stages: {pretrain: {...}, finetune: {...}}` keeps order
        data["stages"] = [{"name": k, **(v or {})} for k, v in stages.items()]
    try:
        recipe = _build(Recipe, data, "")
        for st in recipe.stages:  # every grid value must validate on its own
            _check_grid(st)
    except RecipeError as e:
        msg = str(e)
        for i, st in enumerate(data.get("stages") or []):  # name stages as the YAML does: stages.pretrain.x
            if isinstance(st, dict) and "name" in st:
                msg = msg.replace(f"stages[{i}]", f"stages.{st['name']}")
        raise RecipeError(f"{source}: {msg}") from None
    recipe.source = source  # not a field: errors found later (plan expansion) name the file too
    return recipe


def _check_grid(stage: StageConfig) -> None:
    where = f"stages.{stage.name}.grid"
    fields = {f.name for f in dataclasses.fields(StageConfig)} - {"grid", "seeds", "sample", "name", "finetune",
                                                                   "sparsify"}
    for key, values in stage.grid.items():
        path = axis_path(key)
        top = path.split(".")[0]
        if top not in fields | {"finetune", "sparsify"}:
            raise RecipeError(f"{where}.{key}: unknown axis; allowed: {', '.join(sorted(fields | set(AXIS_ALIASES)))}")
        if getattr(stage, top, True) is None:
            raise RecipeError(f"{where}.{key}: this stage has no `{top}` section")
        if top == "model" and stage.parent is not None:
            raise RecipeError(f"{where}.{key}: a fine-tuning or sparsification stage inherits its parent's model")
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{where}.{key}: an axis is a non-empty list of values; got {values!r}")
        seen = []
        for v in values:
            if v in seen:
                raise RecipeError(f"{where}.{key}: value {v!r} repeats")
            seen.append(v)
    _stage_variants(stage)


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    if cls in _PRESET_CLASSES and isinstance(data, str):
        data = {_PRESET_CLASSES[cls]: data}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping for {cls.__name__}; got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        raise RecipeError(f"{_join(where, str(k))}: unknown key; allowed: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{_join(where, missing[0])}: required key is missing")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where or 'recipe'}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[-1] if len(errors) == 1 else f"{where}: {_show(value)} is not valid here ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: {_show(value)} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            if tp == list[int] and isinstance(value, str) and ".." in value:
                return _parse_range(value, where)
            raise RecipeError(f"{where}: expected a list; got {_show(value)}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping; got {_show(value)}")
        return {str(k): _coerce(args[1], v, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false; got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer; got {_show(value)}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-3` as a string; accept it as the number it plainly is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number; got {_show(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `parent_epoch: 10`
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string; got {_show(value)}")
        return value
    raise TypeError(f"unsupported type {tp} at {where}")  # a bug in this module, not in a recipe


_PRESET_CLASSES = {ModelConfig: "variant", AugConfig: "level", OptimizerConfig: "name", ScheduleConfig: "name",
                   ObjectiveConfig: "name", DataConfig: "source"}


def _parse_range(text: str, where: str) -> list[int]:
    m = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", text)
    if not m or int(m[1]) > int(m[2]):
        raise RecipeError(f"{where}: a range is written 'first..last' (inclusive), e.g. '1..1000'; got {text!r}")
    return list(range(int(m[1]), int(m[2]) + 1))


def parse_duration(text: str) -> tuple[float, str]:
    """Parse ``"2ep"`` / ``"500st"`` into (value, unit). Unit is ``ep`` or ``st``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ep|st)\s*", str(text))
    if not m:
        raise ValueError(f"a duration is a number with a unit, 'ep' (epochs) or 'st' (steps), e.g. '2ep'; got {text!r}")
    return float(m[1]), m[2]


def _check_range(name: str, v: float, lo: float, hi: float, hi_open: bool = False) -> None:
    if not (lo <= v <= hi) or (hi_open and v >= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}; got {v}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"
