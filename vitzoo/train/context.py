"""What every training path shares: the process's context, a built run's network, progress bars."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitzoo.data.pipeline import DataCache, Preprocessing


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
    """A run's network and how to export its state in timm naming (plus what config.json records).

    Tasks whose models are not timm image classifiers (GPT-2, PINN MLPs) give ``config_json``: it turns the
    run's ``vitzoo`` metadata into the whole config.json (a transformers ``GPT2Config``...), and ``files``:
    more files for the model folder (a tokenizer), written before run.json and indexed with the model.
    """

    def __init__(self, net: nn.Module, export: Callable[[], dict[str, torch.Tensor]], arch: str,
                 model_args: dict[str, Any], num_classes: int, num_features: int, pp: Preprocessing | None,
                 label_names: list[str] | None, head: str, head_hidden: int | None,
                 config_json: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 files: dict[str, bytes] | None = None):
        self.net, self.export, self.arch, self.model_args = net, export, arch, model_args
        self.num_classes, self.num_features, self.pp, self.label_names = num_classes, num_features, pp, label_names
        self.head, self.head_hidden = head, head_hidden
        self.config_json, self.files = config_json, files or {}


def cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (what a zoo saves)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}


def progress_bar(ctx: RunContext, total: int, desc: str, initial: int):
    """A step bar under the zoo bar (tqdm on a terminal, periodic log lines otherwise), or None when off."""
    if not ctx.progress:
        return None
    from vitzoo import log

    return log.progress(total, desc, initial=initial, unit="step", leave=False, position=1, dynamic_ncols=True)
