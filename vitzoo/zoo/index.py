"""The zoo index: one row per saved model state, rebuilt from the finished models' run.json.

The index is the single source of truth that cards, pushes and loaders read. Its columns are
listed in docs/zoo-format.md: identity and lineage, seeds, metrics, where the tensors are (file,
prefix, sha256) and every field of the run's resolved stage config, flattened with dots.

List-valued columns (``grid_factors``, config fields such as ``finetune.lora_targets``) are native
parquet list columns in format 2, so any parquet reader (pandas, DuckDB, the Hub's table viewer,
``datasets``) sees lists; format 1 stores them as JSON strings. :func:`read_index` reads both and
always hands back Python lists; :func:`index_bytes` writes either (``write_index`` writes
:data:`~vitzoo.zoo.io.FORMAT_VERSION`; the index dataset of ``vitzoo push --index-dataset`` is always 2). The file's key-value metadata says which format it is
(``vitzoo`` → ``{"format_version": 2, "list_columns": [...], "json_columns": [...]}``; format 1 files
have none). A list column whose values pyarrow cannot type as one list type (a list of mixed types,
lists in some rows and scalars in others) stays JSON in that column and is named in ``json_columns``.
Dict-valued grid axis values stay JSON strings (``sort_keys``), as in format 1: they are categories
to filter on, and a dict has no single parquet type across runs.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

import pandas as pd

from vitzoo.zoo.io import FORMAT_VERSION, atomic_write
from vitzoo.zoo.writer import MODELS_DIR

logger = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
ID_COLUMNS = ("model_id", "stage", "parent_id", "parent_epoch", "status", "epoch", "final", "file",
              "tensor_prefix", "sha256", "size", "init_seed", "data_seed", "repeat")


#: Key of the parquet key-value metadata that holds the index's format (absent in format 1 files).
META_KEY = b"vitzoo"
#: First format version with native list columns (also the newest index format this code reads and writes).
LIST_FORMAT_VERSION = 2

#: Keys of a state row in run.json that are not metrics (``lr`` and ``objective_loss`` are training logs).
_STATE_KEYS = {"epoch", "final", "file", "tensor_prefix", "sha256", "size", "lr", "objective_loss"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1e-3}}`` → ``{"optimizer.lr": 1e-3}``; lists stay lists (tuples become lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v:
                out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = list(v)
        else:
            out[key] = v
    return out


def as_list(value: Any) -> list[Any]:
    """A list-valued index cell as a Python list, whatever wrote it: a list, a numpy array (pandas'
    view of a parquet list), a format-1 JSON string, or a missing value (``[]``)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return [value]
        return decoded if isinstance(decoded, list) else [decoded]
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) >= 1:
        return value.tolist()
    try:
        if pd.isna(value):
            return []
    except (TypeError, ValueError):
        pass
    return [value]


def rows_for_run(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Index rows of one finished run (its run.json)."""
    cfg = dict(info["config"])
    for k in ("grid", "seeds", "sample", "name"):
        cfg.pop(k, None)
    factors = flatten(cfg)
    rows = []
    for st in info["states"]:
        row: dict[str, Any] = {
            "model_id": info["run_id"], "stage": info["stage"], "parent_id": info.get("parent_id"),
            "parent_epoch": info.get("parent_epoch"), "status": info["status"], "epoch": st["epoch"],
            "final": st["final"], "file": st["file"], "tensor_prefix": st["tensor_prefix"], "sha256": st["sha256"],
            "size": st["size"], "init_seed": info["init_seed"], "data_seed": info["data_seed"],
            "repeat": info.get("repeat", 0),
        }
        row.update({m: st.get(m) for m in METRICS})
        row.update({k: v for k, v in st.items() if k not in row and k not in _STATE_KEYS})  # e.g. sparsity_ratio
        row["grid_factors"] = sorted(info.get("factors", {}))
        for axis, value in info.get("factors", {}).items():  # each axis as the recipe names it: filter(objective=...)
            row.setdefault(axis, value if isinstance(value, (str, int, float, bool)) or value is None
                           else json.dumps(value, sort_keys=True))
        for k, v in factors.items():
            row.setdefault(k, v)
        rows.append(row)
    return rows


def finished_runs(root: str | Path) -> list[dict[str, Any]]:
    models = Path(root) / MODELS_DIR
    if not models.is_dir():
        return []
    out = []
    for p in sorted(models.iterdir()):
        f = p / "run.json"
        if f.is_file():
            out.append(json.loads(f.read_text()))
    return out


def build_index(root: str | Path) -> pd.DataFrame:
    """The index of the finished runs under ``root`` (list cells as Python lists, as :func:`read_index` gives)."""
    rows = [r for info in finished_runs(root) for r in rows_for_run(info)]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=[*ID_COLUMNS, *METRICS])
    front = [c for c in (*ID_COLUMNS, *METRICS) if c in df.columns]
    df = df[front + [c for c in df.columns if c not in front]]
    return df.sort_values(["stage", "model_id", "epoch"], kind="stable").reset_index(drop=True)


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or (hasattr(v, "tolist") and getattr(v, "ndim", 0) >= 1)


def list_columns(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that hold at least one list (object columns only)."""
    return [str(c) for c in df.columns if df[c].dtype == object and any(_is_list(v) for v in df[c])]


def arrow_ready(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """``(df, native, as_json)``: a copy whose list columns pyarrow can type (``native``: kept as
    lists) or cannot (``as_json``: their lists JSON-encoded, as format 1 did)."""
    import pyarrow as pa

    df = df.copy()
    native, as_json = [], []
    for col in list_columns(df):
        values = [v.tolist() if hasattr(v, "tolist") and not isinstance(v, list) else v for v in df[col]]
        try:
            arr = pa.array([None if v is None or (not _is_list(v) and pd.isna(v)) else v for v in values])
            ok = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            ok = False
        if ok:
            native.append(col)
            df[col] = pd.Series(values, index=df.index, dtype=object)
        else:  # no single list type: JSON in this column, as format 1 did
            as_json.append(col)
            scalars = any(not _is_list(v) and v is not None and not pd.isna(v) for v in values)
            # lists as JSON; scalars too when the column mixes both (one parquet column holds one type)
            df[col] = [json.dumps(list(v) if _is_list(v) else v, default=str) if _is_list(v) or
                       (scalars and v is not None and not pd.isna(v)) else None for v in values]
            logger.debug("index column %r keeps JSON strings (no single parquet list type)", col)
    return df, native, as_json


def index_table(df: pd.DataFrame):
    """``df`` as the pyarrow Table of a format-2 ``index.parquet`` (list columns native, metadata set)."""
    import pyarrow as pa

    df, native, as_json = arrow_ready(df)
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = []
    for field in table.schema:  # all-empty lists infer list<null>: a string list reads everywhere
        if pa.types.is_list(field.type) and pa.types.is_null(field.type.value_type):
            field = field.with_type(pa.list_(pa.string()))
        fields.append(field)
    table = table.cast(pa.schema(fields, metadata=table.schema.metadata))
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps({"format_version": LIST_FORMAT_VERSION, "list_columns": native,
                                 "json_columns": as_json}).encode()
    return table.replace_schema_metadata(meta)


def index_bytes(df: pd.DataFrame, format_version: int = FORMAT_VERSION) -> bytes:
    """The bytes of an ``index.parquet`` holding ``df`` in ``format_version`` (1: JSON-string lists, as
    vitzoo wrote them first; 2: native lists and the ``vitzoo`` metadata)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    if format_version >= LIST_FORMAT_VERSION:
        pq.write_table(index_table(df), buf)
    else:
        df = df.copy()
        for col in list_columns(df):
            df[col] = [json.dumps(v.tolist() if hasattr(v, "tolist") and not isinstance(v, list) else list(v))
                       if _is_list(v) else v for v in df[col]]
        df.to_parquet(buf, index=False)
    return buf.getvalue()


def index_format(source: str | os.PathLike[str] | IO[bytes]) -> dict[str, Any]:
    """The ``vitzoo`` metadata of an ``index.parquet`` (``{"format_version": 1}`` for format-1 files)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(source).metadata or {}
    if META_KEY in meta:
        return json.loads(meta[META_KEY])
    return {"format_version": 1}


def _json_list(v: Any) -> bool:
    if not isinstance(v, str) or not (v.startswith("[") and v.endswith("]")):
        return False
    try:
        return isinstance(json.loads(v), list)
    except ValueError:
        return False


def read_index(source: str | os.PathLike[str] | IO[bytes]) -> pd.DataFrame:
    """Read an ``index.parquet`` of any format; list cells come back as Python lists.

    Format 2: the native list columns (pandas would give numpy arrays) become lists. Format 1: the
    JSON-string columns that hold lists (``grid_factors`` and list-valued config fields; a column
    counts when every non-missing value is a JSON list) are decoded. Axis columns with JSON dicts
    stay strings in both formats.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    raw = (table.schema.metadata or {}).get(META_KEY)
    fmt = json.loads(raw) if raw else {"format_version": 1}
    version = int(fmt.get("format_version", 1))
    if version > LIST_FORMAT_VERSION:
        logger.warning("index.parquet has format version %d, newer than this vitzoo reads (%d): upgrade vitzoo "
                       "if reading it fails", version, LIST_FORMAT_VERSION)
    native = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    df = table.to_pandas()
    for col in native:
        df[col] = pd.Series([v.tolist() if hasattr(v, "tolist") else v for v in df[col]], index=df.index,
                            dtype=object)
    json_cols = set(fmt.get("json_columns", [])) if version >= LIST_FORMAT_VERSION else None
    for col in df.columns:
        if col in native or (json_cols is not None and col not in json_cols):
            continue
        values = df[col].dropna()
        if len(values) and all(_json_list(v) for v in values):
            df[col] = pd.Series([json.loads(v) if isinstance(v, str) else None for v in df[col]], index=df.index,
                                dtype=object)
    return df


def write_index(root: str | Path) -> pd.DataFrame:
    """Rebuild ``index.parquet`` atomically from the finished runs (format :data:`FORMAT_VERSION`); returns it
    with list cells as Python lists."""
    df = build_index(root)
    data = index_bytes(df)
    atomic_write(Path(root) / INDEX_FILE, lambda tmp: Path(tmp).write_bytes(data))
    return df
