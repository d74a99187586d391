"""GPT-2 language models (transformers ``GPT2LMHeadModel``) for the language-model zoos.

Sizes: ``n_embd`` = ``model.width`` (the zoo's ``model_dim`` axis, default 768), ``n_layer`` =
``model.depth`` (default 12), ``n_positions`` = ``model.positions`` (default 1024), ``n_inner`` = 4 ×
``n_embd`` (GPT-2's own ratio). Heads (:func:`heads`): ``max(1, width // 64)``, i.e. 64-dimensional heads as
GPT-2 small/medium/large/XL from width 128 on and one head below; from 128 on the width must therefore be
a multiple of 64 (anything else is refused before training, naming ``model.width``). GPT-2 small is
``width 768, depth 12``: 124,439,808 parameters at vocabulary 50,257 (tests pin it).

Tied embeddings (``tie_word_embeddings``, as GPT-2): ``lm_head.weight`` *is* ``transformer.wte.weight``.
A saved state leaves the tied key out, exactly as ``save_pretrained`` does, so ``model.safetensors`` holds
each parameter once (the zoo's weight-space views see no duplicated embedding; ``num_params`` is the
network's): :func:`tie_state_keys` makes the module's own ``state_dict``/``load_state_dict`` agree with that,
and ``AutoModelForCausalLM.from_pretrained`` re-ties the head when loading the folder.

Attention: models are built with ``attn_implementation="sdpa"`` (PyTorch's fused attention: the fast
path for training 264 models). The flash / memory-efficient SDPA kernels have no double backward, which
Hessian-vector products need: load with ``from_config(cfg, attn_implementation="eager")`` (or
``AutoModelForCausalLM.from_pretrained(..., attn_implementation="eager")``, or wrap the computation in
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): the same function, same weights, up to rounding.
"""

from __future__ import annotations

from typing import Any

import torch

#: Defaults of the recipe's ``model.width`` / ``depth`` / ``positions`` (GPT-2 small).
WIDTH, DEPTH, POSITIONS = 768, 12, 1024
#: Attention implementation of the models vitzoo trains (see the module docstring).
ATTENTION = "sdpa"
#: What config.json's ``architectures`` names (transformers' class; vitzoo.models.TASK_NAMES["gpt2"]).
ARCHITECTURE = "GPT2LMHeadModel"
_TIED = "lm_head.weight"


def heads(width: int) -> int:
    """The number of attention heads of a GPT-2 of ``width``: 64-dimensional heads, one head below 128.

    Raises ValueError (naming ``model.width``) when ``width`` is not a multiple of 64 from 128 on."""
    if width < 1:
        raise ValueError(f"model.width must be >= 1; got {width}")
    n = max(1, width // 64)
    if width >= 128 and width % 64:
        raise ValueError(f"model.width: a GPT-2's heads have 64 dimensions from width 128 on (one head below), so "
                         f"the width must be a multiple of 64 there; got {width}")
    return n


def gpt2_config(vocab_size: int, width: int | None = None, depth: int | None = None, positions: int | None = None,
                dropout: float = 0.0, eos_token_id: int | None = None, attn_implementation: str = ATTENTION):
    """The transformers ``GPT2Config`` of a vitzoo GPT-2: ``eos_token_id`` doubles as BOS (GPT-2's tokenizer has
    one special token); no padding id, as GPT-2 (blocks are never padded)."""
    from transformers import GPT2Config

    width, depth, positions = width or WIDTH, depth or DEPTH, positions or POSITIONS
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    return GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=depth, n_head=heads(width), n_positions=positions,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=eos,
                      eos_token_id=eos, tie_word_embeddings=True,
                      architectures=[ARCHITECTURE], attn_implementation=attn_implementation)


def tie_state_keys(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model.state_dict()`` leave out the tied ``lm_head.weight`` and ``load_state_dict`` accept a state
    without it (strict loading still refuses any other missing or unexpected key). Returns ``model``."""
    if not getattr(model.config, "tie_word_embeddings", True):
        return model

    def drop(module: torch.nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        state.pop(prefix + _TIED, None)

    def allow(module: torch.nn.Module, incompatible: Any) -> None:
        if _TIED in incompatible.missing_keys:
            incompatible.missing_keys.remove(_TIED)

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_post_hook(allow)
    return model


def build_gpt2(vocab_size: int, width: int | None = None, depth: int | None = None, positions: int | None = None,
               dropout: float = 0.0, seed: int = 0, eos_token_id: int | None = None,
               attn_implementation: str = ATTENTION) -> torch.nn.Module:
    """A freshly initialised GPT-2 (transformers' own init: normal(0, 0.02), scaled residual projections),
    seeded by ``seed`` without touching the global RNG (the engine re-seeds it per epoch; a build must
    not shift another run's stream)."""
    from transformers import GPT2LMHeadModel

    cfg = gpt2_config(vocab_size, width, depth, positions, dropout, eos_token_id, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    return tie_state_keys(model)


def count_params(vocab_size: int, width: int | None = None, depth: int | None = None,
                 positions: int | None = None) -> int:
    """Parameters of a GPT-2 (the tied head counted once), built on the meta device: no memory, any size."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(gpt2_config(vocab_size, width, depth, positions))
    return sum(p.numel() for p in model.parameters())


def config_json(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """A model folder's config.json: the ``GPT2Config`` as transformers writes it, plus the ``vitzoo``
    metadata (transformers keeps the unknown key as a config attribute and ignores it)."""
    d = model.config.to_dict()
    d.pop("_attn_implementation", None)
    return {**d, "vitzoo": meta}


def from_config(cfg: dict[str, Any], attn_implementation: str = ATTENTION) -> torch.nn.Module:
    """The (untrained) network a model folder's config.json describes; weights are loaded by the caller."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = {k: v for k, v in cfg.items() if k != "vitzoo"}
    conf = GPT2Config.from_dict(d, attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        model = GPT2LMHeadModel(conf)
    return tie_state_keys(model)
