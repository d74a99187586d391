"""Text sources of the language-model task: documents → tokens → blocks of ``context_length + 1`` tokens.

Sources (``data.source``):

- ``builtin:arithmetic``: a procedurally generated language, fully offline (:func:`arithmetic`): each
  document is one equation ``a op b = c`` with ``a, b`` in 0..99 and ``op`` in ``+ - *`` (``"37+45=82"``),
  drawn by a fixed-seed NumPy generator; train 8,000 and test 2,000 documents. Its tokenizer
  (:func:`arithmetic_tokenizer`, used when ``data.tokenizer`` is null) is a byte-level BPE of 64 tokens
  trained locally with `tokenizers` on the train documents (before the val carve, so it is the same
  whatever the recipe's split settings), ``<|endoftext|>`` its one special token;
- ``hf:<id>`` / ``parquet:<path>``: read through `datasets` (config, revision, split names from the
  recipe), documents in ``data.text_column``, tokenizer ``data.tokenizer`` (Hub id or local folder, through
  ``AutoTokenizer``).

Splits: train, val (``val_split``, else carved from train's *documents* with ``val_size`` /
``val_fraction`` and ``split_seed``, as the image sources do) and test when ``test_split`` is set.

Blocks: per split, documents in order, each followed by the tokenizer's EOS, are concatenated and cut
into consecutive blocks of ``context_length + 1`` tokens (a model sees the first ``context_length`` and
predicts the last ``context_length``); the incomplete tail is dropped. ``max_train_samples`` /
``max_eval_samples`` cap the number of *blocks*; documents are tokenized in chunks only until the cap is
reached, so a capped OpenWebText subset costs its size, not the corpus's. Tokens are stored as int32.

Tokenized once per process: :func:`text_data` caches by the data config and the context length.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from vitzoo.data.sources import DataError, carve_val, open_source
from vitzoo.recipe import DataConfig

EOS = "<|endoftext|>"
#: Size of the built-in language (documents) and its tokenizer's vocabulary.
ARITHMETIC_TRAIN, ARITHMETIC_TEST, ARITHMETIC_VOCAB = 8000, 2000, 64
_OPS = ("+", "-", "*")
#: Documents tokenized per call while filling a split's blocks.
_CHUNK = 2000


def arithmetic(n_train: int = ARITHMETIC_TRAIN, n_test: int = ARITHMETIC_TEST, seed: int = 0) -> datasets.DatasetDict:
    """The built-in language: equations with their results, ``"12+7=19"``, ``"3-40=-37"``, ``"9*11=99"``."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> datasets.Dataset:
        a, b, op = rng.integers(0, 100, n), rng.integers(0, 100, n), rng.integers(0, len(_OPS), n)
        texts = []
        for x, y, o in zip(a.tolist(), b.tolist(), op.tolist(), strict=True):
            r = x + y if o == 0 else x - y if o == 1 else x * y
            texts.append(f"{x}{_OPS[o]}{y}={r}")
        return datasets.Dataset.from_dict({"text": texts})

    return datasets.DatasetDict({"train": make(n_train), "test": make(n_test)})


def arithmetic_tokenizer(texts: list[str], vocab_size: int = ARITHMETIC_VOCAB) -> Any:
    """A byte-level BPE trained on ``texts`` (deterministic: same texts, same tokenizer), as a
    ``PreTrainedTokenizerFast`` whose EOS (also BOS, padding) is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1 << 30)


@dataclass
class TextData:
    """A text source tokenized into blocks (int32 ``[n_blocks, context_length + 1]`` per split)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor | None
    tokenizer: Any
    name: str
    """The dataset's identity for cards (a Hub id, or the built-in name)."""
    files: dict[str, bytes]
    """The tokenizer as saved by ``save_pretrained``: the files every model folder gets."""

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


_CACHE: dict[str, TextData] = {}


def text_data(cfg: DataConfig, context_length: int) -> TextData:
    """The tokenized blocks of ``cfg`` (cached per process). Raises :class:`DataError` naming the key."""
    key = json.dumps([dataclasses.asdict(cfg), context_length], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = _load(cfg, context_length)
    return _CACHE[key]


def _load(cfg: DataConfig, context_length: int) -> TextData:
    kind, _, ref = cfg.source.partition(":")
    if kind == "builtin":
        dd, name = arithmetic(), f"vitzoo-builtin/{ref}"
    elif kind in ("hf", "parquet"):
        dd, name = open_source(cfg)
    else:  # the recipe refuses imagefolder sources for causal_lm
        raise DataError(f"data.source: objective causal_lm reads text; got {cfg.source!r}")

    def get(split: str, key: str) -> datasets.Dataset:
        if split not in dd:
            raise DataError(f"data.{key}: split {split!r} not in {cfg.source} (has: {', '.join(dd)})")
        ds = dd[split]
        if cfg.text_column not in ds.column_names:
            raise DataError(f"data.text_column: column {cfg.text_column!r} not in {cfg.source}:{split} "
                            f"(has: {', '.join(ds.column_names)})")
        return ds.select_columns([cfg.text_column])

    train = get(cfg.train_split, "train_split")
    tokenizer = _tokenizer(cfg, train)
    if cfg.val_split is not None:
        val = get(cfg.val_split, "val_split")
    else:  # documents carved, as images are
        train, val = carve_val(train, cfg, unit="documents")
    test = get(cfg.test_split, "test_split") if cfg.test_split is not None else None
    block = context_length + 1
    out = {s: blocks(ds, cfg.text_column, tokenizer, block, cap)
           for s, ds, cap in (("train", train, cfg.max_train_samples), ("val", val, cfg.max_eval_samples),
                              ("test", test, cfg.max_eval_samples)) if ds is not None}
    if len(out["train"]) == 0:
        raise DataError(f"data.source: the train split of {cfg.source} has fewer tokens than one block of "
                        f"objective.context_length + 1 = {block}")
    return TextData(out["train"], out["val"], out.get("test"), tokenizer, name, tokenizer_files(tokenizer))


def _tokenizer(cfg: DataConfig, train: datasets.Dataset) -> Any:
    if cfg.tokenizer is None:
        if cfg.source != "builtin:arithmetic":
            raise DataError(f"data.tokenizer: a text source needs a tokenizer (a Hub id such as 'gpt2' or a local "
                            f"folder); only builtin:arithmetic trains its own (got source {cfg.source!r})")
        return arithmetic_tokenizer(list(arithmetic()["train"]["text"]))
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer: cannot load tokenizer {cfg.tokenizer!r} (a Hub id or a folder with "
                        f"tokenizer files): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tok.eos_token_id is None:
        raise DataError(f"data.tokenizer: tokenizer {cfg.tokenizer!r} has no EOS token (documents are joined by it)")
    return tok


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (the fast backend directly: no length warnings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def blocks(ds: datasets.Dataset, column: str, tokenizer: Any, block: int, cap: int | None = None) -> torch.Tensor:
    """Documents of ``ds`` in order, each followed by EOS, concatenated and cut into ``[n, block]`` int32
    blocks (at most ``cap``; the tail shorter than a block is dropped)."""
    eos = int(tokenizer.eos_token_id)
    parts: list[np.ndarray] = []
    total = 0
    want = None if cap is None else cap * block
    for lo in range(0, len(ds), _CHUNK):
        texts = ds[lo:lo + _CHUNK][column]
        ids = [t + [eos] for t in encode(tokenizer, [x or "" for x in texts])]
        flat = np.fromiter((i for t in ids for i in t), dtype=np.int32)
        parts.append(flat)
        total += len(flat)
        if want is not None and total >= want:
            break
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n = len(flat) // block
    if cap is not None:
        n = min(n, cap)
    return torch.from_numpy(flat[:n * block].reshape(n, block).copy())


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """What ``save_pretrained`` writes for ``tokenizer``, as name → bytes (the model folders' tokenizer)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())
                if p.is_file() and p.name not in ("config.json", "run.json") and not p.name.endswith(".safetensors")}
