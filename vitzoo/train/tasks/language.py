"""The language-model task (objective ``causal_lm``): GPT-2s on text, trained by the engine's one loop.

Parts (assembled by :func:`build` into a :class:`~vitzoo.train.engine.ModuleRun`):

- data (:func:`vitzoo.data.text.text_data`): the source tokenized once per process into blocks of
  ``objective.context_length + 1`` tokens (train / val / test);
- model (:func:`vitzoo.models.gpt2.build_gpt2`): vocabulary = the tokenizer's, ``n_embd`` = ``model.width``,
  ``n_layer`` = ``model.depth``, ``n_positions`` = ``model.positions``, dropout ``model.dropout``, initialised
  from the run's init seed;
- feed (:class:`~vitzoo.train.feed.TensorFeed`): the train blocks on the device, sliced in the order of
  :func:`~vitzoo.train.seeds.epoch_order` (an epoch = one pass over the blocks, ``batch_size`` blocks a step;
  ``micro_batch_size`` accumulates, as for any task);
- objective (:class:`NextToken`): next-token cross-entropy, the mean over the batch's tokens;
- evaluator (:func:`evaluate`): per split ``<split>_loss`` (mean token cross-entropy, nats),
  ``<split>_perplexity`` = exp(loss) and ``<split>_acc`` = next-token top-1 accuracy (the fraction of
  positions whose argmax is the next token: a classifier's accuracy over the vocabulary, which keeps the
  zoo's ``*_acc`` columns meaningful); the train split on its first :data:`~vitzoo.train.evaluate.
  TRAIN_EVAL_CAP` blocks (or ``max_eval_samples`` when smaller): a statistic, not a sweep.

The weight decay follows timm's rule for every GPT-2 (no decay on biases and LayerNorms, 1-d parameters),
as GPT-2-style training does; the optimizer and schedule are the recipe's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo.data.sources import DataError
from vitzoo.data.text import TextData, text_data
from vitzoo.models import gpt2
from vitzoo.plan import RunSpec
from vitzoo.recipe import StageConfig
from vitzoo.train.build import amp_dtype, make_optimizer
from vitzoo.train.context import Built, RunContext, cpu_state
from vitzoo.train.evaluate import TRAIN_EVAL_CAP
from vitzoo.train.feed import TensorFeed


def next_token_loss(net: nn.Module, tokens: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]`` and the number of correct
    top-1 predictions (float32 logits; ``reduction`` as ``F.cross_entropy``'s)."""
    tokens = tokens.long()
    logits = net(input_ids=tokens[:, :-1]).logits.float()
    target = tokens[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction=reduction)
    correct = (logits.argmax(-1) == target).sum()
    return loss, correct


class NextToken:
    """The objective the engine steps: mean next-token cross-entropy of a batch of blocks; ``n`` = blocks
    (every block has the same number of tokens, so block-weighted micro-batches weight tokens equally)."""

    equal_batches = False

    def start_epoch(self, epoch: int) -> None:
        pass

    def loss(self, net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        tokens = batch[0]
        loss, _ = next_token_loss(net, tokens)
        return loss, tokens.shape[0]

    def columns(self, state: dict[str, torch.Tensor] | None, steps: int) -> dict[str, Any]:
        return {}


def eval_cap(cfg: StageConfig) -> int:
    """Train blocks evaluated per epoch."""
    return min(TRAIN_EVAL_CAP, cfg.data.max_eval_samples or TRAIN_EVAL_CAP)


@torch.no_grad()
def evaluate(net: nn.Module, data: TextData, cfg: StageConfig, device: torch.device,
             amp: torch.dtype | None = None) -> dict[str, Any]:
    """``<split>_loss``, ``<split>_perplexity`` and ``<split>_acc`` per split (see the module docstring).
    Sums stay on the device (float64) and are read once per split."""
    net.eval()
    bs = cfg.eval_batch_size or 4 * cfg.batch_size
    out: dict[str, Any] = {}
    splits = [("train", data.train[:eval_cap(cfg)]), ("val", data.val)]
    if data.test is not None:
        splits.append(("test", data.test))
    for split, x in splits:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for i in range(0, len(x), bs):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, c = next_token_loss(net, x[i:i + bs].to(device), reduction="sum")
            loss_sum += loss.double()
            correct += c
        n = len(x) * (x.shape[1] - 1)
        loss = loss_sum.item() / n if n else float("nan")
        out[f"{split}_loss"] = loss
        out[f"{split}_perplexity"] = math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")
        out[f"{split}_acc"] = correct.item() / n if n else None
    return out


def model_args(cfg: StageConfig, data: TextData) -> dict[str, Any]:
    """What the model is, as run.json's ``model_args`` records it."""
    assert cfg.model is not None
    m = cfg.model
    return {"vocab_size": data.vocab_size, "width": m.width or gpt2.WIDTH, "depth": m.depth or gpt2.DEPTH,
            "positions": m.positions or gpt2.POSITIONS, "dropout": m.dropout, "eos_token_id": data.eos_token_id}


def build(spec: RunSpec, ctx: RunContext) -> Any:
    """The run's parts: the text blocks (cached), a GPT-2 from the init seed, the recipe's optimizer, the
    blocks feed, the next-token loss and the evaluator."""
    from vitzoo.train.engine import ModuleRun

    cfg = spec.config
    data = text_data(cfg.data, cfg.objective.context_length)
    args = model_args(cfg, data)
    net = gpt2.build_gpt2(args["vocab_size"], args["width"], args["depth"], args["positions"], args["dropout"],
                          seed=spec.init_seed, eos_token_id=args["eos_token_id"]).to(ctx.device)
    built = Built(net, lambda: cpu_state(net), gpt2.ARCHITECTURE, args, 0, args["width"], None, None, "lm", None,
                  config_json=lambda meta: gpt2.config_json(net, meta), files=data.files)
    amp = amp_dtype(cfg.precision, ctx.device)
    blocks = data.train.to(ctx.device)
    feed = TensorFeed(blocks, torch.arange(len(blocks), device=ctx.device), spec.data_seed, cfg.batch_size)

    def run_evaluate() -> dict[str, Any]:
        return evaluate(net, data, cfg, ctx.device, amp)

    return ModuleRun(spec, built, make_optimizer(net, cfg, no_decay=()), NextToken(), feed, run_evaluate,
                     lambda: (run_evaluate(), built.export()), data.name, amp)


def preflight(cfg: StageConfig, cache: Any) -> None:
    """Read and tokenize the stage's text (cached for training) and check the model: a missing text column
    or tokenizer, too little text, or a width without a head split fails here, naming the key."""
    assert cfg.model is not None
    if cfg.model.width is not None:
        try:
            gpt2.heads(cfg.model.width)
        except ValueError as e:
            raise DataError(str(e)) from None
    text_data(cfg.data, cfg.objective.context_length)
