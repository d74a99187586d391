"""Reading zoos: the :class:`Zoo` object behind ``vitzoo.load``.

One code path serves a local folder and a Hub repository: the Zoo reads every file through a
*source* whose ``local_path(relpath)`` returns a local file (the folder itself, or a lazily
downloaded copy from the Hub cache). Only the index and small metadata files are read up front;
weights are read when a state is asked for, and each weight file's sha256 is checked against the
index before its first use, so a corrupted or tampered file is never silently used.

``Zoo.download(view)`` fetches everything a view needs at once (for a Hub zoo: one
``snapshot_download`` of exactly those files, ``max_workers`` in parallel) and hashes each weight
file once, in threads; the digest is remembered by the Zoo and every view filtered from it, so
later reads never hash a file again.

This module never imports the training code.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import safetensors
import torch
from torch import nn

from vitzoo.errors import ZooError
from vitzoo.recipe import AXIS_ALIASES
from vitzoo.zoo import weights
from vitzoo.zoo.index import INDEX_FILE, arrow_ready, read_index
from vitzoo.zoo.io import sha256_file

logger = logging.getLogger(__name__)

#: The small per-model files a downloaded view also gets (config.json: the architecture; run.json: ``run_info``).
MODEL_META_FILES = ("config.json", "run.json")


class Source(Protocol):
    def local_path(self, relpath: str) -> Path: ...


class LocalSource:
    """A zoo folder on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root_hint = str(self.root)
        self.resolved_revision = None

    def local_path(self, relpath: str) -> Path:
        p = self.root / relpath
        if not p.exists():
            raise ZooError(f"{self.root}: no file {relpath!r}")
        return p

    def local_paths(self, relpaths: Iterable[str], max_workers: int = 8) -> dict[str, Path]:
        """Every path of ``relpaths`` (all must exist): the folder needs no download."""
        paths = {rel: self.root / rel for rel in relpaths}
        missing = sorted(rel for rel, p in paths.items() if not p.is_file())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ZooError(f"{self.root}: no file {missing[0]!r}{more}")
        return paths

    def json(self, relpath: str) -> dict[str, Any]:
        return json.loads(self.local_path(relpath).read_text())


def open_zoo(source: str | Path, revision: str | None = None, **kwargs: Any) -> Zoo:
    """``vitzoo.load``: a local folder, or a Hub repo id ``org/name`` (optionally at a revision)."""
    p = Path(source)
    if p.is_dir():
        if revision is not None:
            raise ZooError(f"{source}: a revision applies to Hub repositories, not local folders")
        if not (p / INDEX_FILE).is_file():
            raise ZooError(f"{source}: not a zoo (no {INDEX_FILE}); generate one with `vitzoo generate`")
        return Zoo(LocalSource(p))
    if str(source).startswith(("/", ".", "~")) or p.suffix:
        raise ZooError(f"{source}: no such zoo folder")
    from vitzoo.hub import HubSource  # only users of the Hub pay for the import

    return Zoo(HubSource(str(source), revision=revision, **kwargs))


class Zoo:
    """A zoo's index plus access to any model state in it.

    ``zoo.index`` has one row per saved state (see docs/zoo-format.md); ``zoo.models`` one row
    per model (its final state). ``filter`` narrows both without reading any weights.
    """

    def __init__(self, source: Source, index: pd.DataFrame | None = None, _verified: set[str] | None = None):
        self.source = source
        self.index = index if index is not None else read_index(source.local_path(INDEX_FILE))
        self._verified: set[str] = _verified if _verified is not None else set()  # shared by filtered views
        self._configs: dict[str, dict[str, Any]] = {}
        #: The whole zoo's index (a view's differs from ``index``): what ``models_where`` tests and
        #: what errors compare a view with.
        self._zoo_index: pd.DataFrame = self.index

    def __repr__(self) -> str:
        counts = self.models.groupby("stage").size().to_dict() if len(self.index) else {}
        return f"Zoo({getattr(self.source, 'root_hint', self.source)!s}, models={counts}, states={len(self.index)})"

    def __len__(self) -> int:
        return self.index["model_id"].nunique()

    # ------------------------------------------------------------------ metadata
    @property
    def models(self) -> pd.DataFrame:
        """One row per model: its final state."""
        return self.index[self.index["final"]].reset_index(drop=True)

    @cached_property
    def info(self) -> dict[str, Any]:
        return json.loads(self.source.local_path("zoo.json").read_text())

    def model_ids(self) -> list[str]:
        return list(dict.fromkeys(self.index["model_id"]))

    def config(self, model_id: str) -> dict[str, Any]:
        self._check_id(model_id)
        if model_id not in self._configs:  # read once: state_dict()/weights() ask for it on every call
            self._configs[model_id] = json.loads(self.source.local_path(f"models/{model_id}/config.json").read_text())
        return copy.deepcopy(self._configs[model_id])

    def run_info(self, model_id: str) -> dict[str, Any]:
        self._check_id(model_id)
        return json.loads(self.source.local_path(f"models/{model_id}/run.json").read_text())

    def epochs(self, model_id: str) -> list[int]:
        self._check_id(model_id)
        return sorted(self.index.loc[self.index["model_id"] == model_id, "epoch"].tolist())

    # ------------------------------------------------------------------ selection
    def filter(self, *, epochs: tuple[int, int] | None = None, final: bool | None = None, **conds: Any) -> Zoo:
        """The saved *states* that match, as a Zoo view; reads no weights.

        ``zoo.filter(stage="finetune", lr=1e-3, head=["linear", "mlp"], test_acc=lambda a: a > .5,
        epochs=(0, 10))``. Keys are index columns or the recipe's axis aliases (``lr``, ``head``...);
        values are a scalar, a list (any of), or a predicate on the column. On a list-valued column
        (``grid_factors``, ``finetune.lora_targets``) a scalar keeps the rows whose list contains it
        and a list the rows whose list equals it.

        Every condition is tested on every row, and the index has one row per saved state: a
        generating factor (``stage``, ``lr``, ``head``...) is the same in all states of a model, but a
        metric is not, so ``filter(test_acc=lambda a: a > .5)`` keeps only the states above 0.5 (the
        epoch-0 state of a good model is dropped). To select *models* by their final metrics and keep
        all their states, use :meth:`models_where`; to keep given models, ``filter(model_id=[...])``.
        """
        df = self.index
        for key, want in conds.items():
            df = df[_condition_mask(df, key, want)]
        if epochs is not None:
            df = df[(df["epoch"] >= epochs[0]) & (df["epoch"] <= epochs[1])]
        if final is not None:
            df = df[df["final"] == final]
        return self._view(df)

    def models_where(self, *, epochs: tuple[int, int] | None = None, **conds: Any) -> Zoo:
        """The *models* whose final state matches, with all their saved states, as a Zoo view.

        ``zoo.models_where(stage="finetune", test_acc=lambda a: a > .5)`` keeps the fine-tuned
        models whose final test accuracy is above 0.5, each with every state this view holds
        (epoch 0 included). Conditions are those of :meth:`filter`, tested on each model's final
        state in the whole zoo (also when this view lacks it); ``epochs=(lo, hi)`` then keeps only
        the states in that range.
        """
        finals = self._zoo_index[self._zoo_index["final"]
                                 & self._zoo_index["model_id"].isin(set(self.index["model_id"]))]
        for key, want in conds.items():
            finals = finals[_condition_mask(finals, key, want)]
        df = self.index[self.index["model_id"].isin(set(finals["model_id"]))]
        if epochs is not None:
            df = df[(df["epoch"] >= epochs[0]) & (df["epoch"] <= epochs[1])]
        return self._view(df)

    def _view(self, df: pd.DataFrame) -> Zoo:
        view = Zoo(self.source, df.reset_index(drop=True), self._verified)
        view._configs = self._configs
        view._zoo_index = self._zoo_index
        return view

    # ------------------------------------------------------------------ weights
    def _check_id(self, model_id: str) -> None:
        if model_id not in set(self.index["model_id"]):
            raise ZooError(f"model {model_id!r} is not in this zoo{' view' if len(self.index) else ''}"
                           f" ({len(self)} models)")

    def row(self, model_id: str, epoch: int | None = None) -> pd.Series:
        """The index row of a state: ``model_id`` at ``epoch`` (default: its final state).

        Raises :class:`~vitzoo.errors.ZooError` when the model is not in this view, or has no saved
        state at that epoch here. The row's ``file``, ``tensor_prefix`` and ``sha256`` say where the
        state's tensors are; read them through :meth:`verified_path`.
        """
        self._check_id(model_id)
        rows = self.index[self.index["model_id"] == model_id]
        if epoch is None:
            rows = rows[rows["final"]]
            if rows.empty:
                raise ZooError(f"model {model_id!r}: its final state is not in this view, which holds its "
                               f"epochs {self.epochs(model_id)}; pass an epoch, or select with zoo.models_where(...)")
        else:
            rows = rows[rows["epoch"] == epoch]
            if rows.empty:
                here = self.epochs(model_id)
                saved = sorted(self._zoo_index.loc[self._zoo_index["model_id"] == model_id, "epoch"].tolist())
                if saved == here:
                    raise ZooError(f"model {model_id!r} has no saved state at epoch {epoch}; saved: {saved}")
                raise ZooError(f"model {model_id!r}: its state at epoch {epoch} is not in this view, which holds "
                               f"its epochs {here} (the zoo saved {saved}); filter() keeps the states that match "
                               f"every condition: zoo.models_where(...) keeps whole models")
        return rows.iloc[0]

    def verified_path(self, row: pd.Series) -> Path:
        """The local path of an index row's weight file, sha256-checked against the index on first use.

        The first call for a file hashes it (downloading it first from the Hub) and raises
        :class:`~vitzoo.errors.ZooError` if the digest differs from the row's ``sha256``; later
        calls, from this Zoo or any view filtered from it, return the path without hashing again.
        """
        path = self.source.local_path(row["file"])
        if row["file"] not in self._verified:
            problem = self._check_hash(row["file"], path, str(row["sha256"]))
            if problem:
                raise ZooError(problem)
        return path

    def _check_hash(self, relpath: str, path: Path, expected: str) -> str | None:
        """Hash one file (once: it is then remembered as verified); the error text if it does not match."""
        digest = sha256_file(path)
        if digest != expected:
            where = ("" if isinstance(self.source, LocalSource)
                     else f" (cached copy {path.resolve()}: delete it to download it again)")
            return (f"{relpath}: sha256 {digest[:12]}… does not match the index ({expected[:12]}…); "
                    f"the file is corrupt or was changed{where}")
        self._verified.add(relpath)
        return None

    def download(self, view: Zoo | pd.DataFrame | None = None, *, max_workers: int = 8,
                 verify: bool = True) -> Path:
        """Fetch every file a view needs at once and verify each weight file; returns the local root.

        ``view``: a Zoo view (``zoo.filter(...)``), a DataFrame of index rows, or ``None`` for this
        Zoo's own index (so ``zoo.filter(stage="finetune").download()`` works too). The files are the
        weight files of the view's rows plus each of its models' ``config.json`` and ``run.json``.
        A Hub zoo gets them with one ``huggingface_hub.snapshot_download`` pinned to the zoo's commit
        (``allow_patterns`` = exactly those paths, ``max_workers`` parallel downloads; files already
        in the HF cache are not fetched again); a local folder needs no download. Then every weight
        file not verified yet is hashed once, ``max_workers`` at a time, and remembered (by this Zoo
        and all views filtered from it): reading states afterwards never hashes again. A mismatch
        raises :class:`~vitzoo.errors.ZooError` naming every bad file. The returned folder mirrors
        the repo (``<root>/models/<id>/...``).
        """
        rows = self._view_rows(view)
        weights_files = dict(zip(rows["file"], rows["sha256"]))  # file -> sha256 (one per file)
        model_ids = list(dict.fromkeys(rows["model_id"]))
        wanted = [*weights_files, *(f"models/{m}/{name}" for m in model_ids for name in MODEL_META_FILES)]
        paths = self._fetch(wanted, max_workers=max_workers)
        if verify:
            todo = [(rel, paths[rel], str(sha)) for rel, sha in weights_files.items() if rel not in self._verified]
            if todo:
                logger.debug("verifying sha256 of %d files (%d threads)", len(todo), max(1, max_workers))
                with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo)))) as pool:
                    problems = [p for p in pool.map(lambda t: self._check_hash(*t), todo) if p]
                if problems:
                    more = f"\n  ... and {len(problems) - 1} more" if len(problems) > 1 else ""
                    raise ZooError(f"{len(problems)} of {len(todo)} downloaded files do not match the index: "
                                   f"{problems[0]}" + "".join(f"\n  {p}" for p in problems[1:5]) + more)
        return Path(getattr(self.source, "snapshot_dir", None) or getattr(self.source, "root", ""))

    def _view_rows(self, view: Zoo | pd.DataFrame | None) -> pd.DataFrame:
        if view is None:
            return self.index
        if isinstance(view, Zoo):
            if view.source is not self.source:
                raise ZooError("download: the view belongs to another zoo")
            return view.index
        if isinstance(view, pd.DataFrame):
            missing = {"model_id", "file", "sha256"} - set(view.columns)
            if missing:
                raise ZooError(f"download: a DataFrame of index rows needs the columns {sorted(missing)}")
            return view
        raise ZooError(f"download: expected a zoo view or index rows, not {type(view).__name__}")

    def _fetch(self, relpaths: list[str], *, max_workers: int = 8) -> dict[str, Path]:
        """Local paths of ``relpaths``, fetched together where the source can (Hub: one snapshot call)."""
        bulk = getattr(self.source, "local_paths", None)
        if bulk is not None:
            return bulk(relpaths, max_workers=max_workers)
        return {rel: self.source.local_path(rel) for rel in relpaths}

    def state_dict(self, model_id: str, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """The weights of one state (default: the final one), in timm naming."""
        row = self.row(model_id, epoch)
        sd = _read_prefixed(self.verified_path(row), row["tensor_prefix"])
        # safetensors stores keys sorted; hand them back in module order where vitzoo can build the
        # architecture (reading tensors must not depend on it: a newer zoo's unknown model still reads).
        try:
            order = self.param_order(model_id)
        except (ValueError, RuntimeError, KeyError, ImportError):
            return sd
        return {k: sd[k] for k in order} if set(order) == set(sd) else sd

    def model(self, model_id: str, epoch: int | None = None) -> nn.Module:
        """A ready ``nn.Module`` in eval mode; ``model.pretrained_cfg`` holds its preprocessing."""
        from vitzoo.models import from_config

        cfg = self.config(model_id)
        net = from_config(cfg)
        net.load_state_dict(self.state_dict(model_id, epoch))
        net.pretrained_cfg = {**getattr(net, "pretrained_cfg", {}), **cfg.get("pretrained_cfg", {})}
        return net.eval()

    def transform(self, model_id: str):
        """timm's eval transform for the model's saved preprocessing."""
        from timm.data import create_transform, resolve_data_config

        return create_transform(**resolve_data_config(pretrained_cfg=self.config(model_id)["pretrained_cfg"]))

    def weights(self, model_id: str, epoch: int | None = None) -> torch.Tensor:
        """All parameters and buffers of a state as one flat float32 vector, in :meth:`param_order`."""
        sd = self.state_dict(model_id, epoch)
        return torch.cat([sd[k].reshape(-1).float() for k in self.param_order(model_id)])

    def param_order(self, model_id: str) -> list[str]:
        """The stable order of tensors in flat vectors: the architecture's ``state_dict()`` order."""
        return weights.param_order(self, model_id)  # the network is built once per distinct architecture

    def to_dataset(self):
        """The index as a ``datasets.Dataset`` (list columns as sequences; see ``vitzoo.zoo.index``)."""
        import datasets

        return datasets.Dataset.from_pandas(arrow_ready(self.index)[0], preserve_index=False)

    # ------------------------------------------------------------------ weight space (vitzoo.zoo.weights)
    def _reader_for(self, states: Any) -> tuple[Zoo, Any]:
        """(the Zoo to read through, the states for it): a view passed as ``states`` reads through itself."""
        return (states, None) if isinstance(states, Zoo) else (self, states)

    def param_layout(self, model_id: str, epoch: int | None = None):
        """Names (in :meth:`param_order`), shapes and dtypes of a state: a ``weights.ParamLayout``."""
        return weights.state_layout(self, model_id, epoch)

    def weights_batch(self, states=None, *, layers=None, dtype: torch.dtype = torch.float32):
        """``(tensor [n_states, n_params], index rows)`` of a view, index rows or (id, epoch) pairs.

        Default: every state of this view. Refuses mixed architectures; reads each file once.
        """
        zoo, states = self._reader_for(states)
        return weights.weights_batch(zoo, states, layers=layers, dtype=dtype)

    def split_models(self, seed: int = 0, fractions=(0.7, 0.15, 0.15), group: str = "model") -> dict[str, list[str]]:
        """The model ids of each split (``train``/``val``/``test``): by model, seeded, 70/15/15."""
        return weights.split_models(self.index, seed=seed, fractions=fractions, group=group)

    def torch_dataset(self, split: str = "train", seed: int = 0, properties=("test_acc",), epochs=None,
                      layers=None, **kwargs: Any):
        """A torch ``Dataset`` of (weights, properties) samples of one split (``weights.WeightDataset``)."""
        return weights.WeightDataset(self, split, seed=seed, properties=properties, epochs=epochs, layers=layers,
                                     **kwargs)

    def tokens(self, model_id: str, epoch: int | None = None, *, token_size: int = 64, layers=None):
        """SANE-style ``(tokens [n, token_size], positions [n, 3], mask [n, token_size])`` of a state."""
        return weights.state_tokens(self, model_id, epoch, token_size=token_size, layers=layers)

    def tokens_batch(self, states=None, *, token_size: int = 64, layers=None):
        """``(tokens [n_states, n, token_size], positions, mask, index rows)`` of a set of states."""
        zoo, states = self._reader_for(states)
        return weights.tokens_batch(zoo, states, token_size=token_size, layers=layers)

    def token_layout(self, model_id: str, epoch: int | None = None, *, token_size: int = 64, layers=None):
        """The ``weights.TokenLayout`` that maps this state's parameters to tokens and back."""
        return weights.token_layout(weights.state_layout(self, model_id, epoch).select(layers), token_size)

    def detokenize(self, model_id: str, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                   epoch: int | None = None, token_size: int | None = None, layers=None) -> dict[str, torch.Tensor]:
        """The exact state dict of :meth:`tokens` output (``positions`` allow tokens in any order)."""
        size = int(tokens.shape[-1]) if token_size is None else token_size
        return self.token_layout(model_id, epoch, token_size=size, layers=layers).detokenize(tokens, positions)

    def layer_stats(self, states=None, *, percentiles=(0, 25, 50, 75, 100), layers=None, long: bool = False):
        """Per-tensor mean, var and percentiles of each state (docs/reference-zoos.md#weight-space-baseline) as a DataFrame."""
        zoo, states = self._reader_for(states)
        return weights.layer_stats(zoo, states, percentiles=percentiles, layers=layers, long=long)


def _condition_mask(df: pd.DataFrame, key: str, want: Any) -> pd.Series:
    """The rows of ``df`` that satisfy one ``filter`` condition (see :meth:`Zoo.filter`)."""
    col = key if key in df.columns else AXIS_ALIASES.get(key, key)
    if col not in df.columns:
        raise ZooError(f"filter: no column {key!r}; columns: {', '.join(df.columns)}")
    if callable(want):
        return df[col].map(lambda v, f=want: bool(f(v))).astype(bool)
    if _is_list_column(df[col]):  # a scalar: rows whose list holds it; a list: rows with that list
        if isinstance(want, (list, tuple)):
            return df[col].map(lambda v, w=list(want): isinstance(v, list) and v == w).astype(bool)
        return df[col].map(lambda v, w=want: isinstance(v, list) and w in v).astype(bool)
    if isinstance(want, (list, tuple, set)):
        return df[col].isin(list(want))
    return df[col] == want


def _is_list_column(col: pd.Series) -> bool:
    """Whether an index column holds lists (``read_index`` gives Python lists for list columns)."""
    if col.dtype != object:
        return False
    first = next((v for v in col if v is not None and not (isinstance(v, float) and v != v)), None)
    return isinstance(first, list)


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def read_state(source: LocalSource, run_info: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
    """One state of a finished run, from its run.json (used before the zoo index exists)."""
    for st in run_info["states"]:
        if st["epoch"] == epoch:
            return _read_prefixed(source.local_path(st["file"]), st["tensor_prefix"])
    raise ZooError(f"model {run_info['run_id']!r} has no saved state at epoch {epoch}; saved: "
                   f"{[s['epoch'] for s in run_info['states']]}")
