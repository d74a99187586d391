"""Weight-space views of a zoo: flat vectors, batches, model-split datasets, SANE tokens, layer statistics.

Everything here reads weights through a :class:`ZooReader` (in practice a
:class:`~vitzoo.zoo.reader.Zoo` or a view of one, so every file is checked against the index's
sha256 before its first use) and is exposed as thin methods on ``Zoo``:
``weights_batch``, ``param_layout``, ``split_models``, ``torch_dataset``, ``tokens``,
``tokens_batch``, ``token_layout``, ``detokenize`` and ``layer_stats``. The reader imports this
module, never the other way round: what is needed of a zoo is the small :class:`ZooReader`
protocol, and a ``Zoo`` method given a view as ``states`` passes that view as the reader.

Parameter order (stable, documented)
------------------------------------
A model state is flattened in the **architecture's ``state_dict()`` order** (``Zoo.param_order``):
the order in which ``vitzoo.models.from_config(config).state_dict()`` lists its tensors, buffers
included (ViT: ``cls_token, pos_embed, patch_embed.proj.weight, patch_embed.proj.bias, blocks.0...,
norm.weight, norm.bias, head.weight, head.bias``; BatchNorm CNNs also ``running_mean``,
``running_var``, ``num_batches_tracked``). Each tensor contributes ``tensor.reshape(-1)`` (row-major)
as float32. This order does *not* depend on the order of keys inside the safetensors files (which
is sorted), on the zoo, or on the machine. A :class:`ParamLayout` records names, shapes and dtypes,
so a flat vector maps back to the exact state dict (``layout.unflatten``). float32/float16/bfloat16
tensors round-trip exactly; integer buffers (``num_batches_tracked``) exactly below 2**24.

Batches refuse mixed architectures: states whose layouts (names, shapes, dtypes) differ cannot
share a ``[n_states, n_params]`` tensor, and the error says which models differ and where.
A batch reads each weight file once for all the states it holds (``checkpoints.safetensors`` holds
many epochs of one model) and only the tensors asked for (safetensors reads lazily). Batches, layer
statistics and preloaded datasets first fetch all their files at once through the reader's
``download`` (for a Hub zoo: one parallel ``snapshot_download``, each file hashed once).

Splits
------
As the reference loaders (Model Zoos / SANE) do, splits are **by model, not by checkpoint**: the
distinct model ids of the view are sorted, shuffled with ``random.Random(seed)`` and cut 70/15/15
(sizes by largest-remainder rounding of ``fractions * n``, at least one model per split when
there are enough: 100 models give 70/15/15, 6 give 4/1/1, 4 give 2/1/1); every state of a model lands in the model's split. ``group="lineage"`` keeps a
pre-trained model and all models fine-tuned from it in one split (sizes then count lineages).
Epoch/layer selection happens after the split, so it never moves a model to another split.

Tokens (SANE-style)
-------------------
Tensors are grouped into *layers* in parameter order:

* a tensor of >= 2 dims named ``<m>.weight`` whose ``<m>.bias`` is 1-D with one entry per output
  row forms a layer with it: row ``r`` is ``weight[r].flatten()`` followed by ``bias[r]``
  (linear, conv, attention qkv/proj, patch embedding, head);
* every other tensor is a layer of its own: leading size-1 dims are dropped, then a tensor of
  >= 2 dims has one row per index of its first dim (``pos_embed [1, 17, D]`` -> 17 rows of D,
  ``cls_token [1, 1, D]`` -> 1 row of D) and a 1-D or 0-D tensor is a **single row** holding all
  its values (``norm.weight [D]`` -> 1 row of D; ``norm.bias`` is a separate 1-row layer;
  ``num_batches_tracked`` -> 1 row of 1).

Each row is cut into ``ceil(len / token_size)`` tokens; the last one is zero-padded. A state gives
``tokens [n_tokens, token_size]`` (float32), ``positions [n_tokens, 3]`` (int64: layer index, row
index within the layer, chunk index within the row; the sequence index is the token's position)
and ``mask [n_tokens, token_size]`` (bool, True where a value is real, False for padding).
``detokenize`` inverts it exactly (optionally from tokens in any order, given their positions).

Layer statistics
----------------
Per state and per tensor (so weights and biases of a layer separately, docs/reference-zoos.md#weight-space-baseline): mean, variance
(population, ddof=0) and percentiles 0/25/50/75/100 (numpy's linear interpolation), computed in
float64; one row per state (wide) or per state x tensor (``long=True``).
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import safetensors
import torch
from torch.utils.data import Dataset

#: Default split fractions (train, val, test), as in the reference loaders.
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
SPLITS = ("train", "val", "test")
DEFAULT_PERCENTILES = (0, 25, 50, 75, 100)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

Layers = None | str | Sequence[str] | Callable[[str], bool]
States = Any  # None (the reader's whole index), a DataFrame of index rows, or an iterable of (model_id, epoch) pairs


class ZooReader(Protocol):
    """What this module needs of a zoo (``vitzoo.zoo.reader.Zoo`` is one)."""

    index: pd.DataFrame

    def row(self, model_id: str, epoch: int | None = None) -> pd.Series:
        """The index row of a state (default: the model's final state)."""
        ...

    def verified_path(self, row: pd.Series) -> Path:
        """The row's weight file, sha256-checked against the index on first use."""
        ...

    def config(self, model_id: str) -> dict[str, Any]:
        """The model's ``config.json``."""
        ...

    def state_dict(self, model_id: str, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one state."""
        ...


class WeightSpaceError(ValueError):
    """States that cannot be combined (mixed architectures), or a bad selection."""


# ====================================================================== parameter layout
@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and dtypes of a state's tensors in the stable flat-vector order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each tensor in the flat vector."""
        out, o = [], 0
        for n in self.numels:
            out.append(o)
            o += n
        return tuple(out)

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    def __len__(self) -> int:
        return len(self.names)

    def select(self, layers: Layers) -> ParamLayout:
        """The sub-layout of the tensors ``layers`` selects (see :func:`select_names`), in order."""
        keep = set(select_names(self.names, layers))
        idx = [i for i, n in enumerate(self.names) if n in keep]
        return ParamLayout(tuple(self.names[i] for i in idx), tuple(self.shapes[i] for i in idx),
                           tuple(self.dtypes[i] for i in idx))

    def flatten(self, state: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """A state dict (at least these tensors) as one flat vector (float32 unless ``out`` says otherwise)."""
        if out is None:
            out = torch.empty(self.n_params, dtype=torch.float32)
        for name, shape, off, n in zip(self.names, self.shapes, self.offsets, self.numels, strict=True):
            t = state[name]
            if tuple(t.shape) != shape:
                raise WeightSpaceError(f"tensor {name!r} has shape {tuple(t.shape)}, the layout says {shape}")
            out[off:off + n].copy_(t.reshape(-1))
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state dict of a flat vector, with the original shapes and dtypes."""
        if flat.shape[-1] != self.n_params:
            raise WeightSpaceError(f"flat vector has {flat.shape[-1]} values, the layout {self.n_params}")
        return {name: flat[off:off + n].reshape(shape).to(dtype).clone()
                for name, shape, dtype, off, n in zip(self.names, self.shapes, self.dtypes, self.offsets,
                                                      self.numels, strict=True)}

    def difference(self, other: ParamLayout) -> str:
        """Where two layouts first differ, in words."""
        if self.names != other.names:
            a, b = set(self.names), set(other.names)
            if a != b:
                only_a, only_b = sorted(a - b)[:3], sorted(b - a)[:3]
                return f"tensors only in the first: {only_a or '-'}; only in the second: {only_b or '-'}"
            return "same tensors in a different order"
        for n, s1, s2, d1, d2 in zip(self.names, self.shapes, other.shapes, self.dtypes, other.dtypes, strict=True):
            if s1 != s2:
                return f"{n}: shape {s1} vs {s2}"
            if d1 != d2:
                return f"{n}: dtype {d1} vs {d2}"
        return "identical"

    def describe(self) -> str:
        return f"{len(self)} tensors, {self.n_params:,} values"


def select_names(names: Sequence[str], layers: Layers, strict: bool = True) -> list[str]:
    """The names ``layers`` selects, in the given order.

    ``None``: all. A string or list of strings: ``fnmatch`` patterns (``"blocks.*.attn.*"``,
    ``"head.*"``, an exact name). A callable: a predicate on the name. ``strict``: a pattern that
    matches nothing, or a selection of nothing, is an error.
    """
    if layers is None:
        return list(names)
    if callable(layers):
        out = [n for n in names if layers(n)]
    else:
        pats = [layers] if isinstance(layers, str) else list(layers)
        out = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        unused = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused and strict:
            raise WeightSpaceError(f"layers: {unused} match no tensor; tensors: {', '.join(names)}")
    if not out and strict:
        raise WeightSpaceError(f"layers={layers!r} selects no tensor")
    return out


_IDENTITY_KEYS = ("run_id", "stage", "parent_id", "parent_epoch", "dataset", "objective", "format_version")


def _arch_key(cfg: dict[str, Any]) -> str:
    """A config without the fields that do not change the network (label names, identity, lineage)."""
    cfg = {k: v for k, v in cfg.items() if k != "label_names"}
    if isinstance(cfg.get("vitzoo"), dict):
        cfg["vitzoo"] = {k: v for k, v in cfg["vitzoo"].items() if k not in _IDENTITY_KEYS}
    return json.dumps(cfg, sort_keys=True, default=str)


@lru_cache(maxsize=256)
def _param_order_for(key: str) -> tuple[str, ...]:
    from vitzoo.models import from_config

    return tuple(from_config(json.loads(key)).state_dict().keys())


def param_order(zoo: ZooReader, model_id: str) -> list[str]:
    """``Zoo.param_order`` with the network built once per distinct architecture config (cached)."""
    return list(_param_order_for(_arch_key(zoo.config(model_id))))


def _header_layout(f: Any, prefix: str, order: Sequence[str], where: str) -> ParamLayout:
    keys = {k[len(prefix):] for k in f.keys() if k.startswith(prefix)}
    if keys != set(order):
        missing, extra = sorted(set(order) - keys)[:3], sorted(keys - set(order))[:3]
        raise WeightSpaceError(f"{where}: tensors do not match the architecture (missing {missing}, "
                               f"unexpected {extra})")
    shapes, dtypes = [], []
    for n in order:
        sl = f.get_slice(prefix + n)
        shapes.append(tuple(int(d) for d in sl.get_shape()))
        dtypes.append(_ST_DTYPES[sl.get_dtype()])
    return ParamLayout(tuple(order), tuple(shapes), tuple(dtypes))


def state_layout(zoo: ZooReader, model_id: str, epoch: int | None = None) -> ParamLayout:
    """The :class:`ParamLayout` of one state (names in parameter order, shapes and dtypes from the file)."""
    row = zoo.row(model_id, epoch)
    with safetensors.safe_open(str(zoo.verified_path(row)), "pt") as f:
        return _header_layout(f, row["tensor_prefix"], param_order(zoo, model_id),
                              f"{row['model_id']} epoch {int(row['epoch'])}")


# ====================================================================== reading states
def _rows(zoo: ZooReader, states: States) -> pd.DataFrame:
    """Index rows for ``states``, in the order given."""
    if hasattr(states, "verified_path"):  # a view reads through itself: the Zoo methods pass it as `zoo`
        raise WeightSpaceError("states: a zoo view is a reader, not a set of states; call view.weights_batch() "
                               "(or pass the view as the first argument)")
    if states is None:
        df = zoo.index
    elif isinstance(states, pd.DataFrame):
        need = {"model_id", "epoch", "file", "tensor_prefix", "sha256"} - set(states.columns)
        if need:
            raise WeightSpaceError(f"states: a DataFrame of index rows needs the columns {sorted(need)}")
        df = states
    elif isinstance(states, pd.Series):
        df = states.to_frame().T
    else:
        pairs = list(states)
        df = pd.DataFrame([zoo.row(str(m), None if e is None else int(e)) for m, e in pairs])
    if df.empty:
        raise WeightSpaceError("no states selected")
    return df.reset_index(drop=True)


def _layouts(zoo: ZooReader, rows: pd.DataFrame, layers: Layers, check_all: bool = True) -> ParamLayout:
    """The one layout all ``rows`` share (after ``layers``), or a clear error naming the differences."""
    if not check_all:  # one state per model (the others are checked when read)
        rows = rows.drop_duplicates("model_id")
    seen: dict[ParamLayout, list[str]] = {}
    for file, grp in rows.groupby("file", sort=False):
        mid = str(grp["model_id"].iloc[0])
        order = param_order(zoo, mid)
        with safetensors.safe_open(str(zoo.verified_path(grp.iloc[0])), "pt") as f:
            for _, row in grp.iterrows():
                lay = _header_layout(f, row["tensor_prefix"], order, f"{mid} epoch {int(row['epoch'])} ({file})")
                ms = seen.setdefault(lay.select(layers), [])
                if mid not in ms:
                    ms.append(mid)
    if len(seen) > 1:
        lays = list(seen)
        parts = [f"  layout {i + 1}: {lay.describe()}; {len(ms)} model(s), e.g. {', '.join(ms[:3])}"
                 + ("" if i == 0 else f"; differs from layout 1: {lays[0].difference(lay)}")
                 for i, (lay, ms) in enumerate(seen.items())]
        raise WeightSpaceError(
            f"the selected states mix {len(seen)} parameter layouts (architectures, head sizes or head types); "
            "a batched tensor needs one. Narrow the view first, e.g. zoo.filter(stage=...) or "
            "zoo.filter(**{'finetune.head': ...}), or select common tensors with layers=...\n" + "\n".join(parts))
    return next(iter(seen))


def _prefetch(zoo: ZooReader, rows: pd.DataFrame) -> None:
    """Fetch and verify every file of ``rows`` in one go where the reader can (``Zoo.download``)."""
    download = getattr(zoo, "download", None)
    if download is not None and len(rows) and rows["file"].nunique() > 1:
        download(rows)


def weights_batch(zoo: ZooReader, states: States = None, *, layers: Layers = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, pd.DataFrame]:
    """``[n_states, n_params]`` flat weights of ``states`` (default: the zoo view) and their index rows.

    Row ``i`` of the tensor is the state of row ``i`` of the returned DataFrame (the order given).
    Each weight file is opened once and each selected tensor of each state read once. Refuses
    states of different layouts (:class:`WeightSpaceError` naming the layouts and the models).
    """
    rows = _rows(zoo, states)
    _prefetch(zoo, rows)
    lay: ParamLayout | None = None
    out = torch.empty(0)
    for file, grp in rows.groupby("file", sort=False):
        mid = str(grp["model_id"].iloc[0])
        order = param_order(zoo, mid)
        with safetensors.safe_open(str(zoo.verified_path(grp.iloc[0])), "pt") as f:
            for pos, row in grp.iterrows():
                p = row["tensor_prefix"]
                here = _header_layout(f, p, order, f"{mid} epoch {int(row['epoch'])} ({file})").select(layers)
                if lay is None:
                    lay, out = here, torch.empty(len(rows), here.n_params, dtype=dtype)
                elif here != lay:
                    _layouts(zoo, rows, layers)  # raises, describing every layout in the selection
                    raise WeightSpaceError(f"{mid}: {lay.difference(here)}")  # pragma: no cover
                lay.flatten({n: f.get_tensor(p + n) for n in lay.names}, out=out[int(pos)])
    return out, rows


# ====================================================================== splits and datasets
def split_sizes(n: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> list[int]:
    """Sizes of ``n`` items cut by ``fractions``: largest-remainder rounding (ties to the earlier split).

    When there are enough items, a split with a non-zero fraction gets at least one (taken from the
    largest split), so a small zoo still has a validation and a test model: 100 -> 70/15/15,
    20 -> 14/3/3, 10 -> 7/2/1, 6 -> 4/1/1, 4 -> 2/1/1, 2 -> 2/0/0.
    """
    if n < 0 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise WeightSpaceError(f"split fractions must be >= 0 and sum to 1, not {tuple(fractions)}")
    raw = [f * n for f in fractions]
    sizes = [math.floor(r + 1e-9) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    if n >= sum(f > 0 for f in fractions):
        for i, f in enumerate(fractions):
            if f > 0 and sizes[i] == 0:
                sizes[max(range(len(sizes)), key=lambda j: sizes[j])] -= 1
                sizes[i] = 1
    return sizes


def _lineage_roots(index: pd.DataFrame) -> dict[str, str]:
    parent = {}
    for mid, pid in index.drop_duplicates("model_id")[["model_id", "parent_id"]].itertuples(index=False):
        parent[mid] = pid if isinstance(pid, str) and pid else None
    roots = {}
    for mid in parent:
        cur, hops = mid, 0
        while parent.get(cur) and hops < 100:
            cur, hops = parent[cur], hops + 1
        roots[mid] = cur
    return roots


def split_models(index: pd.DataFrame, seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS,
                 group: str = "model") -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` model ids; see the module docstring."""
    if len(fractions) != 3:
        raise WeightSpaceError("fractions: three numbers (train, val, test)")
    mids = sorted(set(index["model_id"]))
    if group == "model":
        key = {m: m for m in mids}
    elif group == "lineage":
        key = _lineage_roots(index)
    else:
        raise WeightSpaceError(f"group must be 'model' or 'lineage', not {group!r}")
    groups = sorted(set(key.values()))
    random.Random(seed).shuffle(groups)
    a, b, _ = split_sizes(len(groups), fractions)
    where = {g: s for s, part in zip(SPLITS, (groups[:a], groups[a:a + b], groups[a + b:]), strict=True)
             for g in part}
    return {s: [m for m in mids if where[key[m]] == s] for s in SPLITS}


def _select_epochs(df: pd.DataFrame, epochs: Any) -> pd.DataFrame:
    if epochs is None:
        return df
    if epochs == "final":
        return df[df["final"]]
    if isinstance(epochs, (int, np.integer)):
        return df[df["epoch"] == int(epochs)]
    if isinstance(epochs, tuple) and len(epochs) == 2:
        return df[(df["epoch"] >= epochs[0]) & (df["epoch"] <= epochs[1])]
    if isinstance(epochs, (list, set, range)):
        return df[df["epoch"].isin(list(epochs))]
    raise WeightSpaceError(f"epochs: None, 'final', an int, a (first, last) tuple or a list, not {epochs!r}")


def _encode_properties(view: pd.DataFrame, rows: pd.DataFrame, names: Sequence[str]
                       ) -> tuple[torch.Tensor, dict[str, list[Any]]]:
    """float32 ``[len(rows), len(names)]``; non-numeric columns become codes over the whole view."""
    cols, cats = [], {}
    for name in names:
        if name == "gen_gap" and "gen_gap" not in view.columns:
            cols.append((rows["train_acc"] - rows["test_acc"]).to_numpy(dtype=np.float64))
            continue
        if name not in view.columns:
            raise WeightSpaceError(f"property {name!r} is not an index column (or 'gen_gap')")
        col = view[name]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            cols.append(rows[name].astype(np.float64).to_numpy())
        else:
            levels = sorted({v for v in col if not pd.isna(v)}, key=str)
            cats[name] = levels
            code = {v: i for i, v in enumerate(levels)}
            cols.append(np.array([np.nan if pd.isna(v) else code[v] for v in rows[name]], dtype=np.float64))
    arr = np.stack(cols, axis=1) if cols else np.zeros((len(rows), 0))
    return torch.from_numpy(arr).float(), cats


class WeightDataset(Dataset):
    """(weights ``[n_params]``, properties ``[n_properties]``) samples, one per model state.

    ``index`` holds the states' index rows, sorted by (model_id, epoch) (sample ``i`` is row ``i``),
    ``models`` the split's model ids, ``splits`` all three splits' ids, ``layout`` the
    :class:`ParamLayout`, ``property_names`` the target columns (index columns, or ``gen_gap`` =
    train_acc - test_acc) and ``categories[col]`` the levels of a non-numeric property (its value is
    the level's position, NaN when missing; levels are taken over the whole view, so they agree
    across splits). With ``preload=True`` the weights are read once, at construction, into
    ``self.weights``; otherwise each sample is read when asked for. With ``token_size`` the
    weights of a sample are SANE tokens ``[n_tokens, token_size]``; ``token_layout.positions`` and
    ``token_layout.mask`` are shared by all samples.
    """

    def __init__(self, zoo: ZooReader, split: str = "train", *, seed: int = 0,
                 properties: Sequence[str] = ("test_acc",), epochs: Any = None, layers: Layers = None,
                 fractions: Sequence[float] = SPLIT_FRACTIONS, group: str = "model", preload: bool = True,
                 token_size: int | None = None):
        if split not in SPLITS:
            raise WeightSpaceError(f"split must be one of {SPLITS}, not {split!r}")
        if isinstance(properties, str):
            properties = (properties,)
        self.zoo, self.split, self.seed = zoo, split, seed
        self.splits = split_models(zoo.index, seed=seed, fractions=fractions, group=group)
        self.models = self.splits[split]
        rows = zoo.index[zoo.index["model_id"].isin(self.models)]
        rows = _select_epochs(rows, epochs).sort_values(["model_id", "epoch"], kind="stable")
        self.index = rows.reset_index(drop=True)
        self.property_names = tuple(properties)
        self.properties, self.categories = _encode_properties(zoo.index, self.index, self.property_names)
        self.token_layout: TokenLayout | None = None
        if self.index.empty:
            self.layout = ParamLayout((), (), ())
            self.weights = torch.zeros(0, 0) if preload else None
            return
        if preload:
            _prefetch(zoo, self.index)
        self.layout = _layouts(zoo, self.index, layers, check_all=preload)
        self.weights = weights_batch(zoo, self.index, layers=layers)[0] if preload else None
        if token_size is not None:
            self.token_layout = token_layout(self.layout, token_size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weights is not None:
            w = self.weights[i]
        else:
            row = self.index.iloc[i]
            with safetensors.safe_open(str(self.zoo.verified_path(row)), "pt") as f:
                p = row["tensor_prefix"]
                w = self.layout.flatten({n: f.get_tensor(p + n) for n in self.layout.names})
        if self.token_layout is not None:
            w = self.token_layout.tokenize(w)
        return w, self.properties[i]

    def __repr__(self) -> str:
        return (f"WeightDataset(split={self.split!r}, models={len(self.models)}, states={len(self)}, "
                f"params={self.layout.n_params:,}, properties={self.property_names})")


# ====================================================================== tokens
@dataclass(frozen=True, eq=False)
class TokenLayout:
    """How a :class:`ParamLayout` maps to ``[n_tokens, token_size]`` tokens (and back).

    ``layers[l]`` are the tensor names of layer ``l``; ``rows[l]``/``row_len[l]`` its row count and
    row length; ``gather[k, j]`` the flat-vector index of value ``j`` of token ``k`` (``n_params``
    for padding); ``positions``/``mask`` as returned by ``tokens``.
    """

    params: ParamLayout
    token_size: int
    layers: tuple[tuple[str, ...], ...]
    rows: tuple[int, ...]
    row_len: tuple[int, ...]
    gather: torch.Tensor = field(repr=False)
    positions: torch.Tensor = field(repr=False)
    mask: torch.Tensor = field(repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.gather.shape[0])

    @cached_property
    def _layer_start(self) -> torch.Tensor:
        chunks = [r * math.ceil(n / self.token_size) for r, n in zip(self.rows, self.row_len, strict=True)]
        return torch.tensor([0, *np.cumsum(chunks)[:-1].tolist()], dtype=torch.long)

    def tokenize(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat vectors ``[..., n_params]`` -> tokens ``[..., n_tokens, token_size]``."""
        if flat.shape[-1] != self.params.n_params:
            raise WeightSpaceError(f"flat vector has {flat.shape[-1]} values, the layout {self.params.n_params}")
        padded = torch.cat([flat, flat.new_zeros(*flat.shape[:-1], 1)], dim=-1)
        return padded[..., self.gather]

    def detokenize_flat(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[..., n, token_size]`` -> flat vectors ``[..., n_params]``.

        Without ``positions`` the tokens must be in the layout's order; with them (``[n, 3]``, as
        returned by ``tokens``) they may come in any order, but every token must be there once.
        """
        if tokens.shape[-1] != self.token_size:
            raise WeightSpaceError(f"tokens of size {tokens.shape[-1]}, the layout's are {self.token_size}")
        if positions is not None:
            chunks = torch.tensor([math.ceil(n / self.token_size) for n in self.row_len], dtype=torch.long)
            lyr, row, ch = positions[:, 0].long(), positions[:, 1].long(), positions[:, 2].long()
            k = self._layer_start[lyr] + row * chunks[lyr] + ch
            if k.numel() != self.n_tokens or not torch.equal(torch.sort(k).values, torch.arange(self.n_tokens)):
                raise WeightSpaceError(f"positions must name each of the {self.n_tokens} tokens exactly once")
            canon = torch.empty_like(tokens)
            canon[..., k, :] = tokens
            tokens = canon
        elif tokens.shape[-2] != self.n_tokens:
            raise WeightSpaceError(f"{tokens.shape[-2]} tokens, the layout has {self.n_tokens}")
        flat = tokens.new_zeros(*tokens.shape[:-2], self.params.n_params + 1)
        flat[..., self.gather[self.mask]] = tokens[..., self.mask]
        return flat[..., :-1]

    def detokenize(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tokens of one state -> its exact state dict (original shapes and dtypes)."""
        if tokens.dim() != 2:
            raise WeightSpaceError("detokenize: tokens of one state, [n_tokens, token_size]")
        return self.params.unflatten(self.detokenize_flat(tokens, positions))


def _layer_groups(lay: ParamLayout) -> list[tuple[tuple[int, ...], int, int]]:
    """(tensor indices, rows, row length) per layer, in parameter order."""
    where = {n: i for i, n in enumerate(lay.names)}
    paired_bias: set[int] = set()
    groups = []
    for i, (name, shape) in enumerate(zip(lay.names, lay.shapes, strict=True)):
        if i in paired_bias:
            continue
        if name.endswith(".weight") and len(shape) >= 2:
            b = where.get(name[: -len("weight")] + "bias")
            if b is not None and b not in paired_bias and len(lay.shapes[b]) == 1 and lay.shapes[b][0] == shape[0]:
                paired_bias.add(b)
                groups.append(((i, b), shape[0], math.prod(shape[1:]) + 1))
                continue
        s = list(shape)
        while len(s) > 1 and s[0] == 1:
            s.pop(0)
        if len(s) >= 2:
            groups.append(((i,), s[0], math.prod(s[1:])))
        else:
            groups.append(((i,), 1, math.prod(s)))
    return groups


@lru_cache(maxsize=4)  # a layout holds int64 indices for every parameter: keep few
def token_layout(lay: ParamLayout, token_size: int) -> TokenLayout:
    """The :class:`TokenLayout` of a parameter layout for tokens of ``token_size`` values."""
    if token_size < 1:
        raise WeightSpaceError("token_size must be >= 1")
    t = token_size
    pad = lay.n_params
    gathers, positions = [], []
    layers, rows_l, lens = [], [], []
    for li, (tidx, rows, row_len) in enumerate(_layer_groups(lay)):
        c = math.ceil(row_len / t)
        j = torch.arange(c * t)
        r = torch.arange(rows)[:, None]
        if len(tidx) == 2:  # weight rows + bias
            w, b = tidx
            inner = row_len - 1
            src = torch.where(j < inner, lay.offsets[w] + r * inner + j,
                              torch.where(j == inner, lay.offsets[b] + r + 0 * j, pad))
        else:
            src = torch.where(j < row_len, lay.offsets[tidx[0]] + r * row_len + j, pad + 0 * r)
        gathers.append(src.reshape(rows * c, t))
        pos = torch.stack([torch.full((rows, c), li), r.expand(rows, c), torch.arange(c).expand(rows, c)], dim=-1)
        positions.append(pos.reshape(rows * c, 3))
        layers.append(tuple(lay.names[i] for i in tidx))
        rows_l.append(rows)
        lens.append(row_len)
    gather = torch.cat(gathers).long()
    return TokenLayout(lay, t, tuple(layers), tuple(rows_l), tuple(lens), gather,
                       torch.cat(positions).long(), gather != pad)


def tokenize_state(state: dict[str, torch.Tensor], token_size: int, order: Sequence[str] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout]:
    """Tokens, positions, mask and layout of any state dict (``order``: default the dict's order)."""
    names = tuple(order if order is not None else state)
    lay = ParamLayout(names, tuple(tuple(state[n].shape) for n in names), tuple(state[n].dtype for n in names))
    tl = token_layout(lay, token_size)
    return tl.tokenize(lay.flatten(state)), tl.positions.clone(), tl.mask.clone(), tl


def state_tokens(zoo: ZooReader, model_id: str, epoch: int | None = None, *, token_size: int = 64,
                 layers: Layers = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens ``[n, token_size]``, positions ``[n, 3]``, mask ``[n, token_size]``) of one state."""
    lay = state_layout(zoo, model_id, epoch).select(layers)
    sd = zoo.state_dict(model_id, epoch)
    tl = token_layout(lay, token_size)
    return tl.tokenize(lay.flatten(sd)), tl.positions.clone(), tl.mask.clone()


def tokens_batch(zoo: ZooReader, states: States = None, *, token_size: int = 64, layers: Layers = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, pd.DataFrame]:
    """(tokens ``[n_states, n, token_size]``, positions ``[n, 3]``, mask ``[n, token_size]``, index rows)."""
    rows = _rows(zoo, states)
    flat, rows = weights_batch(zoo, rows, layers=layers)
    lay = _layouts(zoo, rows.iloc[:1], layers)
    tl = token_layout(lay, token_size)
    return tl.tokenize(flat), tl.positions.clone(), tl.mask.clone(), rows


# ====================================================================== layer statistics
def _stats(x: np.ndarray, percentiles: Sequence[float]) -> list[float]:
    x = x.astype(np.float64, copy=False).reshape(-1)
    return [float(x.mean()), float(x.var()), *(float(v) for v in np.percentile(x, list(percentiles)))]


def _kind(name: str) -> str:
    return "weight" if name.endswith("weight") else "bias" if name.endswith("bias") else "other"


def layer_stats(zoo: ZooReader, states: States = None, *, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                layers: Layers = None, long: bool = False) -> pd.DataFrame:
    """Per-tensor statistics of every state: mean, var, p<q> for q in ``percentiles``.

    Wide (default): one row per state, in the order of the states, with ``model_id``, ``epoch``
    and a column ``"<tensor>:<stat>"`` per tensor and statistic (tensors in parameter order; a
    tensor a state does not have is NaN, so mixed architectures are allowed). ``long=True``: one
    row per state and tensor with ``model_id, epoch, tensor, kind (weight|bias|other), numel``
    and the statistics. Merge with ``zoo.index`` on ``(model_id, epoch)`` for targets.
    """
    rows = _rows(zoo, states)
    _prefetch(zoo, rows)
    stat_names = ["mean", "var", *(f"p{q:g}" for q in percentiles)]
    records: list[list[Any]] = []
    col_order: dict[str, None] = {}
    for _, grp in rows.groupby("file", sort=False):
        mid = str(grp["model_id"].iloc[0])
        names = select_names(param_order(zoo, mid), layers, strict=False)
        for n in names:
            col_order.setdefault(n, None)
        with safetensors.safe_open(str(zoo.verified_path(grp.iloc[0])), "pt") as f:
            for pos, row in grp.iterrows():
                for n in names:
                    t = f.get_tensor(row["tensor_prefix"] + n)
                    records.append([int(pos), row["model_id"], int(row["epoch"]), n, _kind(n), t.numel(),
                                    *_stats(t.float().numpy(), percentiles)])
    if not records:
        raise WeightSpaceError(f"layers={layers!r} selects no tensor of the selected states")
    df = pd.DataFrame(records, columns=["_pos", "model_id", "epoch", "tensor", "kind", "numel", *stat_names])
    if long:
        rank = {n: i for i, n in enumerate(col_order)}
        df["_rank"] = df["tensor"].map(rank)
        return df.sort_values(["_pos", "_rank"]).drop(columns=["_pos", "_rank"]).reset_index(drop=True)
    wide = df.pivot(index="_pos", columns="tensor", values=stat_names)
    cols = [(s, n) for n in col_order for s in stat_names]
    wide = wide.reindex(index=range(len(rows)), columns=pd.MultiIndex.from_tuples(cols))
    wide.columns = [f"{n}:{s}" for s, n in cols]
    ident = rows.loc[wide.index, ["model_id", "epoch"]]
    return pd.concat([ident, wide], axis=1).reset_index(drop=True)

