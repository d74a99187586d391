"""The dataset card of a zoo's *index dataset* (``vitzoo push --index-dataset``).

The index dataset is a companion Hub *dataset* repo holding the zoo's ``index.parquet`` (and
``analysis.parquet`` when the zoo has one), so the Hub's table viewer and SQL console, which exist
for dataset repos only, can browse it, and ``datasets.load_dataset("org/name-index")`` finds it. Its
README.md is rendered here with ``huggingface_hub``'s ``DatasetCard.from_template`` from the Jinja
template ``model_cards/index_card.md``; the YAML metadata, built with ``DatasetCardData``, carries
the ``configs:`` that tell the viewer and ``datasets`` which file is which table:

.. code-block:: yaml

    configs:
    - config_name: index          # load_dataset(repo) / load_dataset(repo, "index")
      default: true
      data_files: [{split: train, path: index.parquet}]
    - config_name: analysis       # only when the zoo has analysis.parquet
      data_files: [{split: train, path: analysis.parquet}]

The card links back to the zoo repo (and the zoo revision it was built from); the zoo's
``zoo.json`` records the dataset under ``index_dataset`` so the zoo card can link to it.
Same inputs, same bytes: re-pushing an unchanged zoo commits nothing to the dataset either.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

TEMPLATE = "index_card.md"
TEMPLATE_DIRS = (Path(__file__).resolve().parent / "model_cards", Path(__file__).resolve().parent.parent / "model_cards")
SPLIT = "train"
"""The one split of every table (the name ``datasets`` and the viewer expect for a single table)."""


@dataclasses.dataclass(frozen=True)
class Table:
    """One table of the index dataset: a config of the dataset card, one parquet file."""

    config: str
    path: str
    description: str
    default: bool = False


TABLES = (
    Table("index", "index.parquet", "one row per saved model state: identity, lineage, seeds, metrics, "
          "where the tensors are, every generating factor", default=True),
    Table("analysis", "analysis.parquet", "per-state analysis results computed from the zoo's weights"),
)
"""Every table an index dataset may hold, in card order; a zoo without ``analysis.parquet`` has only the first."""

COLUMN_MEANINGS: dict[str, str] = {
    "model_id": "the model's run id (its folder `models/<model_id>/` in the zoo repo)",
    "stage": "the recipe stage that trained it",
    "parent_id": "the model it was fine-tuned from (empty for pre-training)",
    "parent_epoch": "the parent's state it started from",
    "status": "`done` or `diverged`",
    "epoch": "the epoch of this state",
    "final": "true for the state in `model.safetensors` (the model's final state)",
    "file": "the zoo file holding this state's tensors",
    "tensor_prefix": "prefix of this state's tensor names in `file`",
    "sha256": "sha256 of `file`",
    "size": "bytes of `file`",
    "init_seed": "weight initialisation seed",
    "data_seed": "data order / augmentation seed",
    "repeat": "repetition index",
    "train_loss": "training loss of this state", "train_acc": "training top-1 accuracy",
    "val_loss": "validation loss", "val_acc": "validation top-1 accuracy (kNN top-1 for SimCLR stages)",
    "test_loss": "test loss", "test_acc": "test top-1 accuracy (kNN top-1 for SimCLR stages)",
    "grid_factors": "names of the grid axes that vary in this stage (a list)",
}


def _template(override: str | Path | None) -> str:
    if override is not None:
        return Path(override).read_text(encoding="utf-8")
    for d in TEMPLATE_DIRS:
        if (d / TEMPLATE).is_file():
            return (d / TEMPLATE).read_text(encoding="utf-8")
    raise FileNotFoundError(f"card template {TEMPLATE} not found in {', '.join(map(str, TEMPLATE_DIRS))}")


def tables_of(zoo_dir: str | Path) -> list[Table]:
    """The tables a zoo folder gives its index dataset (``index.parquet`` always, the others when present)."""
    root = Path(zoo_dir)
    return [t for t in TABLES if t.default or (root / t.path).is_file()]


def configs(tables: list[Table]) -> list[dict[str, Any]]:
    """The dataset card's ``configs:`` metadata for ``tables``."""
    out = []
    for t in tables:
        cfg: dict[str, Any] = {"config_name": t.config, "data_files": [{"split": SPLIT, "path": t.path}]}
        if t.default:
            cfg["default"] = True
        out.append(cfg)
    return out


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def _type_name(t: Any) -> str:
    return str(t).replace("<element: ", "<").replace("item: ", "")


def _meaning(name: str, axes: set[str]) -> str:
    if name in COLUMN_MEANINGS:
        return COLUMN_MEANINGS[name]
    if name in axes:
        return "grid axis, as the recipe names it"
    if "." in name:
        return "run config field (generating factor)"
    return "per-state value"


def index_dataset_card(zoo_dir: str | Path, repo_id: str, *, zoo_repo_id: str, zoo_url: str | None = None,
                       zoo_revision: str | None = None, zoo_commit: str | None = None,
                       table_files: dict[str, str | Path] | None = None, template: str | Path | None = None,
                       license: str | None = None) -> Any:
    """The ``DatasetCard`` of the index dataset ``repo_id`` of the zoo folder ``zoo_dir``.

    ``table_files``: the parquet file each table is uploaded from (default: the zoo folder's files),
    read for row counts and column types. ``zoo_revision``/``zoo_commit``: the zoo version the
    index was published with (the card names it and its load snippet pins it).
    """
    import pyarrow.parquet as pq
    from huggingface_hub import DatasetCard, DatasetCardData

    from vitzoo.zoo.index import as_list, index_format, read_index

    root = Path(zoo_dir)
    info = json.loads((root / "zoo.json").read_text()) if (root / "zoo.json").is_file() else {}
    name = str(info.get("name") or root.name)
    tables = tables_of(root)
    files = {t.path: Path(table_files[t.path]) if table_files and t.path in table_files else root / t.path
             for t in tables}
    index_file = files[tables[0].path]
    index = read_index(index_file)
    fmt = int(index_format(index_file).get("format_version", 1))
    schema = pq.read_schema(index_file)
    axes = {f for v in index.get("grid_factors", []) for f in as_list(v)}
    columns = [{"name": f.name, "type": f"`{_type_name(f.type)}`", "meaning": _meaning(f.name, axes)}
               for f in schema if not f.name.startswith("__index_level_")]
    rows = {t.path: pq.ParquetFile(files[t.path]).metadata.num_rows for t in tables}
    stages = []
    if len(index):
        finals = index[index["final"].astype(bool)]
        for stage, df in index.groupby("stage", sort=True):
            stages.append({"name": str(stage), "models": int(finals.loc[finals["stage"] == stage, "model_id"].nunique()),
                           "states": int(len(df))})
    data = DatasetCardData(
        license=license or info.get("license") or "mit",
        pretty_name=f"{name} index",
        size_categories=_size_category(len(index)),
        tags=["vitzoo", "model-zoo", "model-zoo-index", "weight-space-learning", "tabular"],
        configs=configs(tables),
        vitzoo={k: v for k, v in (("zoo", zoo_repo_id), ("zoo_revision", zoo_revision), ("zoo_commit", zoo_commit),
                                   ("index_format_version", fmt)) if v is not None},
    )
    card = DatasetCard.from_template(
        data, template_str=_template(template), pretty_name=f"{name} index", repo_id=repo_id,
        zoo_repo_id=zoo_repo_id, zoo_url=zoo_url or f"https://huggingface.co/{zoo_repo_id}",
        zoo_revision=zoo_revision, zoo_commit=zoo_commit, n_rows=len(index),
        n_models=int(index["model_id"].nunique()) if len(index) else 0, stages=stages, split=SPLIT,
        tables=[{**dataclasses.asdict(t), "rows": rows[t.path]} for t in tables], columns=columns,
        format_version=fmt,
    )
    return type(card)(re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", str(card)))
