"""A run's files while and after it trains: history rows, the resume point, epoch checkpoints, finishing.

Shared by every path (a run trained alone, a member of a stack), so that a model's folder, history and
run.json do not depend on how it was trained.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from vitzoo.models import vit
from vitzoo.plan import RunSpec
from vitzoo.train.context import Built, RunContext
from vitzoo.zoo.writer import RunWriter


def history_row(epoch: int, metrics: dict[str, Any], lr: float, objective_loss: float | None,
                **extras: Any) -> dict[str, Any]:
    """The one history-row schema: ``epoch``, the evaluation metrics, the last step's ``lr``, the epoch's
    mean ``objective_loss`` (None at epoch 0), then objective-specific columns (twins: ``kl``,
    ``sparsity_ratio``)."""
    return {"epoch": epoch, **metrics, "lr": lr, "objective_loss": objective_loss, **extras}


def restore(ctx: RunContext, writer: RunWriter, spec: RunSpec, net: nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]], float] | None:
    """Load the run's resume point into ``net`` and ``optimizer``: ``(epoch, history, elapsed_s)``, or None
    to start at epoch 0. Unreadable scratch (not fsync'd, so an OS crash can truncate it) resets the run."""
    try:
        resume = writer.load_resume()
        if resume is not None:
            writer.check_partial()  # every saved epoch and the history must be readable: finishing needs them
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


def resume_epoch(writer: RunWriter) -> int:
    """The epoch a run would resume after without loading it (0: fresh, or scratch that :func:`restore`
    would find unreadable and reset). Used to group runs that resume together."""
    p = writer.partial / "resume.safetensors"
    if not p.is_file():
        return 0
    try:
        import safetensors

        with safetensors.safe_open(str(p), "pt") as f:
            epoch = int(f.metadata()["epoch"])
        writer.check_partial()
        return epoch
    except Exception:  # noqa: BLE001 - the same checks as restore()
        return 0


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
    meta = {"run_id": spec.run_id, "stage": spec.stage, "parent_id": spec.parent_id, "parent_epoch": spec.parent_epoch,
            "head": built.head, "head_hidden": built.head_hidden, "objective": cfg.objective.name, "dataset": dataset}
    if built.config_json is not None:  # a task's own config.json (GPT-2: a transformers config)
        config_json = built.config_json(meta)
    else:
        assert built.pp is not None
        config_json = vit.config_json(built.arch, built.model_args, built.num_classes, built.label_names,
                                      built.pp.pretrained_cfg(built.num_classes), built.num_features, meta)
    run_info = {
        "stage": spec.stage, "factors": spec.factors, "init_seed": spec.init_seed, "data_seed": spec.data_seed,
        "repeat": spec.repeat, "parent_id": spec.parent_id, "parent_epoch": spec.parent_epoch,
        "config": asdict(cfg), "dataset": dataset, "num_classes": built.num_classes,
        "num_params": sum(v.numel() for v in built.export().values()),  # the saved network (no projector, adapters merged)
        "wall_time_s": round(wall_s, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": ctx.hardware, "device": str(ctx.device), "precision": precision,
    }
    return writer.finalize(config_json=config_json, run_info=run_info, final_epoch=final_epoch, status=status,
                           extra_files=built.files)
