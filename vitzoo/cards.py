"""Model cards for a zoo (the repo's README.md) and for each model, rendered from the index.

Cards are *derived data*: everything in them comes from ``index.parquet``, ``zoo.json`` and the
models' ``run.json``, so re-rendering after the zoo grows can never leave a card that disagrees
with the index. They are rendered with ``huggingface_hub``'s ``ModelCard.from_template`` from the
Jinja templates in ``model_cards/`` (pass your own with ``template=``/``model_template=``); the
YAML metadata (license, library, tags, datasets, ``base_model``, eval results as ``model-index``)
is built with ``ModelCardData`` so the Hub indexes it.

Plots (matplotlib, Agg canvas, no global backend change) are written next to the cards:
``plots/accuracy_<stage>.png`` for the zoo card, ``models/<id>/training_curves.png`` per model.
Same data → same bytes, so an unchanged zoo re-pushes nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

TEMPLATE_DIRS = (Path(__file__).resolve().parent / "model_cards", Path(__file__).resolve().parent.parent / "model_cards")
ZOO_TEMPLATE = "zoo_card.md"
MODEL_TEMPLATE = "model_card.md"
#: A stage's headline metric: the first of these its final states have, and whether higher is better. Language
#: models: perplexity (their next-token ``*_acc`` is recorded but not the headline); PINNs: relative L2 error of
#: the solution; image classifiers: accuracy. Cards, plots and ``vitzoo info`` all read this one table.
HEADLINE_METRICS = (("test_perplexity", False), ("val_perplexity", False), ("test_rel_l2", False),
                    ("test_acc", True), ("val_acc", True), ("train_acc", True))
ACC_COLUMNS = tuple(c for c, _ in HEADLINE_METRICS)
KEY_COLUMNS = ("model.variant", "objective.name", "optimizer.name", "optimizer.lr", "optimizer.weight_decay",
               "aug.level", "finetune.mode", "finetune.head", "data.source", "epochs")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _template(name: str, override: str | Path | None) -> str:
    """Template text: the user's file if given, else vitzoo's (installed copy first, then the source tree)."""
    if override is not None:
        return Path(override).read_text(encoding="utf-8")
    for d in TEMPLATE_DIRS:
        if (d / name).is_file():
            return (d / name).read_text(encoding="utf-8")
    raise FileNotFoundError(f"card template {name} not found in {', '.join(map(str, TEMPLATE_DIRS))}")


def _scrub(text: str) -> str:
    """Cards are public: drop anything that looks like a Hub token (e.g. in a recorded command line)."""
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def headline_column(df: pd.DataFrame) -> str | None:
    """The headline metric column of ``df`` (see :data:`HEADLINE_METRICS`), or None."""
    for c in ACC_COLUMNS:
        if c in df.columns and df[c].notna().any():
            return c
    return None


#: Per-split metrics of the non-image tasks (``test_perplexity``...) and their column title in model cards.
TASK_METRICS = {"perplexity": "perplexity", "rel_l2": "relative L2 error"}


def _has_vits(idx: pd.DataFrame) -> bool:
    """Whether a zoo holds ViTs (timm models, loadable with ``timm.create_model`` without vitzoo)."""
    from vitzoo.presets import parse_vit_variant

    variants = idx["model.variant"].dropna().unique() if "model.variant" in idx.columns else []
    return any(parse_vit_variant(str(v)) for v in variants)


def hub_task(objectives: Any) -> str | None:
    """The Hub task of models trained with these objectives (pipeline tag, tag, model-index task type):
    ``text-generation`` for language models, ``image-classification`` for the image stages, None for PINNs
    (the Hub has no task for a PDE solution)."""
    names = {str(o) for o in objectives if isinstance(o, str)} or {"supervised"}
    if names <= {"causal_lm"}:
        return "text-generation"
    if names <= {"pinn"}:
        return None
    return "image-classification"


def higher_is_better(col: str) -> bool:
    """Whether a larger value of headline metric ``col`` is better (accuracy) or worse (perplexity, error)."""
    return dict(HEADLINE_METRICS).get(col, True)


def metric_label(col: str) -> str:
    """``test perplexity (lower is better)``: how cards name a headline metric."""
    return f"{col.replace('_', ' ')} ({'higher' if higher_is_better(col) else 'lower'} is better)"


def _hub_datasets(values: Any) -> list[str]:
    """Only Hub dataset ids belong in ``datasets:`` metadata (``builtin:digits`` or a path do not)."""
    out = []
    for v in values:
        if isinstance(v, str) and _HUB_ID.match(v.removeprefix("hf:").removeprefix("hub:")):
            out.append(v.removeprefix("hf:").removeprefix("hub:"))
    return sorted(set(out))


def dataset_type(source: Any) -> str:
    """model-index ``dataset.type`` of a recipe's data source: its Hub id (``uoft-cs/cifar10`` for
    ``hf:uoft-cs/cifar10``), ``vitzoo-builtin/<name>`` for the built-ins (the name the data layer gives them),
    else the folder or file name."""
    s = str(source or "unknown")
    hub = _hub_datasets([s])
    if hub:
        return hub[0]
    kind, _, ref = s.partition(":")
    if kind == "builtin":
        return f"vitzoo-builtin/{ref}"
    return Path(ref).name if ref else s


def _save_png(fig: Any, path: Path) -> Path:
    """Write a figure atomically, without a timestamp, so equal data gives equal bytes."""
    from vitzoo.zoo.io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None}))
    return path


def accuracy_plot(df: pd.DataFrame, stage: str, path: Path) -> Path | None:
    """Histogram of the final-state accuracy of one stage's models (the zoo card's plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    col = headline_column(df)
    if col is None:
        return None
    values = df[col].dropna().astype(float)
    fig = Figure(figsize=(5, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bounded = col.endswith("_acc")  # accuracies: fixed 0.025-wide bins, comparable across zoos
    ax.hist(values, bins=40, range=(0, 1) if bounded else None, color="#4C72B0")
    ax.set_xlabel(f"final {metric_label(col)}")
    ax.set_ylabel("models")
    ax.set_title(f"{stage}: {len(values)} models, median {values.median():.3f}")
    fig.tight_layout()
    return _save_png(fig, path)


def training_curve_plot(history: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """Loss and accuracy per epoch for train/val/test (a model card's plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        return None
    fig = Figure(figsize=(8, 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    epochs = [h.get("epoch") for h in history]
    for ax, kind in zip(axes, ("loss", "acc"), strict=True):
        for split in ("train", "val", "test"):
            ys = [h.get(f"{split}_{kind}") for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [float("nan") if y is None else y for y in ys], marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        if ax.get_legend_handles_labels()[1]:  # SimCLR stages have no losses on eval splits
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, path)


@dataclass
class ZooFacts:
    """What the cards say, computed once from the zoo folder."""

    root: Path
    index: pd.DataFrame
    info: dict[str, Any]

    @classmethod
    def read(cls, zoo_dir: str | Path) -> ZooFacts:
        root = Path(zoo_dir)
        from vitzoo.zoo.index import read_index  # format 1 (JSON-string lists) and 2 (native lists) alike

        index = read_index(root / "index.parquet")
        info = json.loads((root / "zoo.json").read_text()) if (root / "zoo.json").is_file() else {}
        return cls(root, index, info)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.root.name)

    @property
    def finals(self) -> pd.DataFrame:
        return self.index[self.index["final"].astype(bool)] if len(self.index) else self.index

    def grid(self) -> list[dict[str, str]]:
        from vitzoo.zoo.index import as_list

        rows = []
        for stage, df in self.index.groupby("stage", sort=True):
            factors = sorted({f for g in df.get("grid_factors", pd.Series(dtype=object)) for f in as_list(g)})
            for f in factors:
                if f in df.columns:
                    uniq = list(df[f].dropna().unique())
                    try:
                        uniq = sorted(uniq)
                    except TypeError:
                        uniq = sorted(uniq, key=str)
                    rows.append({"stage": str(stage), "factor": f, "vals": ", ".join(_fmt(v) for v in uniq)})
        return rows


def _q(text: Any) -> str:
    """A Python string literal for generated code (repo ids and model ids never need escapes)."""
    return json.dumps(str(text))


def load_snippets(repo_id: str, model_id: str, config: dict[str, Any] | None, *, revision: str | None = None,
                  example_epoch: int | None = None) -> dict[str, Any]:
    """The code a card shows to load one model of a published zoo, each part runnable as pasted.

    Keys ``vitzoo``, ``timm`` (snapshot of the model's two files, then ``local-dir:``),
    ``transformers`` (``from_pretrained(repo, subfolder=..., revision=...)``, TimmWrapper) and
    ``pipeline``; a library that cannot build this model gets ``None`` and the reason in ``notes``.
    ``config`` is the model's config.json (what decides which loaders work). tests/test_hub_loading.py
    runs these exact texts against a Hub server and compares the logits with ``vitzoo.load``'s.
    """
    from vitzoo.models import TASK_NAMES, cnn_variant, timm_architecture

    rev = revision or "main"
    repo, mid, sub = _q(repo_id), _q(model_id), f"models/{model_id}"
    lines = ["import vitzoo", "",
             f"zoo = vitzoo.load({repo}, revision={_q(rev)})  # the index and cards; weights on demand",
             f"model = zoo.model({mid})  # nn.Module in eval mode; model.pretrained_cfg: its preprocessing",
             f"transform = zoo.transform({mid})  # PIL image -> input tensor"]
    cfg = config or {}
    arch = str(cfg.get("architecture") or "")
    if arch == TASK_NAMES["mlp"]:  # a PINN: points (x, t) in, u out; no preprocessing, no timm
        lines[-2:] = [f"model = zoo.model({mid})  # nn.Module in eval mode: (N, 2) points [x, t] -> (N, 1) u",
                      "# u = model(torch.stack([x, t], 1)); config.json's `problem`: the PDE and its domain"]
    gpt = cfg.get("model_type") == "gpt2"
    if gpt:  # a transformers GPT-2: tokens in, next-token logits out; its folder holds its tokenizer
        lines[-2:] = [f"model = zoo.model({mid})  # GPT2LMHeadModel in eval mode: input_ids -> next-token logits",
                      "# the tokenizer is in the model's folder: see the transformers snippet"]
    if example_epoch is not None:
        lines.append(f"state = zoo.state_dict({mid}, epoch={int(example_epoch)})  # any saved state")
    out: dict[str, Any] = {"vitzoo": "\n".join(lines), "timm": None, "transformers": None, "pipeline": None,
                           "notes": []}
    if arch == TASK_NAMES["mlp"]:
        out["notes"].append("timm and transformers cannot build this model: a PINN MLP (vitzoo architecture "
                            f"`{arch}`) takes space-time points, not images; load it with vitzoo.")
        return out
    if gpt:
        out["transformers"] = "\n".join([
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"model = AutoModelForCausalLM.from_pretrained({repo}, subfolder={_q(sub)},",
            f"{' ' * len('model = AutoModelForCausalLM.from_pretrained(')}revision={_q(rev)}).eval()",
            f"tokenizer = AutoTokenizer.from_pretrained({repo}, subfolder={_q(sub)}, revision={_q(rev)})",
            "# logits = model(**tokenizer(text, return_tensors='pt')).logits",
        ])
        out["notes"].append("timm cannot build this model (a GPT-2 language model, not an image model); "
                            "transformers and vitzoo load it.")
        return out
    name = timm_architecture(arch) if arch else None
    in_chans = int((cfg.get("model_args") or {}).get("in_chans", 3))
    classes = int(cfg.get("num_classes") or 0)
    if name != arch or not arch:
        out["notes"].append(
            f"timm and transformers cannot build this model: its config.json names the architecture `{arch}`, "
            "which is not a timm model name" + (f" (after `import vitzoo` timm knows this network as `{name}`, "
                                                "but this folder's config.json does not use that name yet)"
                                                if name else "") + "; load it with vitzoo.")
        return out
    if (cfg.get("vitzoo") or {}).get("head") == "mlp":
        out["notes"].append("timm and transformers cannot build this model: its MLP classification head is a "
                            "vitzoo extension (timm's VisionTransformer has a linear head); load it with vitzoo.")
        return out
    register = ([f"import vitzoo  # registers {name} with timm (vitzoo defines this network)"]
                if cnn_variant(arch) else [])
    out["timm"] = "\n".join([
        "import timm", *register, "from huggingface_hub import snapshot_download",
        "from timm.data import create_transform, resolve_data_config", "",
        f"folder = snapshot_download({repo}, revision={_q(rev)}, allow_patterns=[  # this model's two files only",
        f"    {_q(sub + '/config.json')}, {_q(sub + '/model.safetensors')}])",
        f'model = timm.create_model(f"local-dir:{{folder}}/{sub}", pretrained=True).eval()',
        "transform = create_transform(**resolve_data_config(model=model))  # the zoo's preprocessing",
    ])
    auto = "AutoModelForImageClassification" if classes else "AutoModel"
    use = ("logits = model(**processor(image)).logits" if classes
           else "features = model(**processor(image)).pooler_output (a backbone: no classifier)")
    out["transformers"] = "\n".join([
        *register, f"from transformers import AutoImageProcessor, {auto}", "",
        f"model = {auto}.from_pretrained({repo}, subfolder={_q(sub)},",
        f"{' ' * len(f'model = {auto}.from_pretrained(')}revision={_q(rev)}).eval()",
        f"processor = AutoImageProcessor.from_pretrained({repo}, subfolder={_q(sub)},",
        f"{' ' * len('processor = AutoImageProcessor.from_pretrained(')}revision={_q(rev)})",
        f"# {use}; image: a PIL image",
    ])
    if in_chans != 3:
        out["notes"].append(f"No pipeline snippet: the pipeline converts every image to RGB and this model takes "
                            f"{in_chans} channel(s); use the transformers snippet with a {in_chans}-channel input.")
        return out
    task, var, call = (("image-classification", "classify", "classify(image) -> [{'label': ..., 'score': ...}, ...]")
                       if classes else
                       ("image-feature-extraction", "extract", "extract(image, pool=True) -> the pooled features"))
    out["pipeline"] = "\n".join([
        *register, "from transformers import pipeline", "",
        f"{var} = pipeline({_q(task)}, model={repo}, revision={_q(rev)},",
        f"{' ' * len(var)}{' ' * len(' = pipeline(')}model_kwargs={{\"subfolder\": {_q(sub)}}})",
        f"# {call}; image: a PIL image, a path or a URL",
    ])
    return out


def _model_config(root: Path, model_id: str) -> dict[str, Any] | None:
    path = root / "models" / model_id / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _example_model(facts: ZooFacts) -> str | None:
    """The model the zoo card's snippets load: the first finished classifier timm can build, else the first."""
    ids = list(dict.fromkeys(facts.finals["model_id"])) if len(facts.finals) else []
    for mid in ids:
        snips = load_snippets("x/y", mid, _model_config(facts.root, mid))
        if snips["pipeline"] and "image-classification" in snips["pipeline"]:
            return mid
    loadable = (m for m in ids if load_snippets("x/y", m, _model_config(facts.root, m))["timm"])
    return next(loadable, ids[0] if ids else None)


def zoo_card(zoo_dir: str | Path, *, repo_id: str | None = None, revision: str | None = None,
             template: str | Path | None = None, license: str | None = None, plots: bool = True,
             citation: str | None = None, facts: ZooFacts | None = None) -> Any:
    """The zoo card (``ModelCard``) of a zoo folder; writes its plots under ``plots/`` if ``plots``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    facts = facts or ZooFacts.read(zoo_dir)
    idx, finals = facts.index, facts.finals
    repo = repo_id or f"<org>/{facts.name}"
    stages, plot_rows, evals = [], [], []
    sources = idx["data.source"].dropna().unique() if "data.source" in idx.columns else []
    task = hub_task(idx["objective.name"].dropna().unique() if "objective.name" in idx.columns else [])
    for stage, df in idx.groupby("stage", sort=True):
        fin = finals[finals["stage"] == stage]
        col = headline_column(fin)
        acc = fin[col].dropna().astype(float) if col else pd.Series(dtype=float)
        stages.append({
            "name": stage, "models": fin["model_id"].nunique(), "states": len(df),
            "done": int((fin["status"] == "done").sum()) if "status" in fin else "-",
            "diverged": int((fin["status"] == "diverged").sum()) if "status" in fin else "-",
            "epochs": f"{int(df['epoch'].min())}-{int(df['epoch'].max())}" if len(df) else "-",
            "metric": metric_label(col) if col else "-",
            "median_acc": _fmt(acc.median()) if len(acc) else "-",
            "range_acc": f"{acc.min():.3f}-{acc.max():.3f}" if len(acc) else "-",
        })
        if plots and len(acc):
            rel = f"plots/accuracy_{stage}.png"
            if accuracy_plot(fin, str(stage), facts.root / rel) is not None:
                plot_rows.append({"stage": stage, "path": rel})
        if len(acc) and task is not None:
            src = fin["data.source"].dropna().iloc[0] if "data.source" in fin.columns and fin["data.source"].notna().any() \
                else "unknown"
            evals.append(EvalResult(task_type=task, dataset_type=dataset_type(src), dataset_name=str(src),
                                    dataset_split=col.split("_")[0], metric_type=col.split("_", 1)[1],
                                    metric_name=f"median final {col.replace('_', ' ')} ({stage})",
                                    metric_value=round(float(acc.median()), 6)))
    data = ModelCardData(
        license=license or facts.info.get("license") or "mit", library_name="vitzoo",
        tags=["vitzoo", "model-zoo", "weight-space-learning", *([task] if task else ["pinn"]),
              *(["timm"] if _has_vits(idx) else [])],
        datasets=_hub_datasets(sources) or None, pipeline_tag=task,
        model_name=facts.name if evals else None, eval_results=evals or None,
    )
    grid = facts.grid()
    example = None
    if grid:
        g = grid[0]
        first = g["vals"].split(", ")[0]
        value = first if _is_number(first) else repr(first)
        example = f'stage="{g["stage"]}", **{{"{g["factor"]}": {value}}}'
    prov = _provenance_rows(facts.info)
    n_models = finals["model_id"].nunique() if len(finals) else 0
    planned = facts.info.get("planned")
    n_planned = sum(planned.values()) if isinstance(planned, dict) else None
    status_note = None
    if facts.info.get("status") not in (None, "complete", "done") or (n_planned and n_planned > n_models):
        status_note = (f"This zoo is still being generated: {n_models}"
                       + (f" of {n_planned} planned" if n_planned else "") + " models are finished and published.")
    year = str(facts.info.get("provenance", {}).get("started_at", ""))[:4] or "2026"
    cite = citation or (
        f"@misc{{{re.sub(r'[^A-Za-z0-9]', '_', facts.name)}_{year},\n"
        f"  title = {{{{{facts.name}}}: a model zoo generated with vitzoo}},\n"
        f"  year = {{{year}}},\n"
        f"  howpublished = {{\\url{{https://huggingface.co/{repo}}}}},\n"
        f"  note = {{{finals['model_id'].nunique() if len(finals) else 0} models, {len(idx)} model states}}\n}}"
    )
    example_model = _example_model(facts)
    snippets = (load_snippets(repo, example_model, _model_config(facts.root, example_model), revision=revision)
                if example_model else None)
    card = ModelCard.from_template(
        data, template_str=_template(ZOO_TEMPLATE, template), zoo_name=facts.name, repo_id=repo,
        revision=revision or "main", example_model=example_model, snippets=snippets,
        description=facts.info.get("description") or "", n_models=n_models, status_note=status_note,
        n_states=len(idx), stages=stages, grid=grid, plots=plot_rows, provenance=prov, citation=cite,
        example_filter=example, index_dataset=_index_dataset(facts.info),
    )
    return type(card)(_scrub(str(card)))


def _index_dataset(info: dict[str, Any]) -> dict[str, Any] | None:
    """zoo.json's ``index_dataset`` (written by ``vitzoo push --index-dataset``), for the zoo card's link."""
    ds = info.get("index_dataset")
    if not isinstance(ds, dict) or not ds.get("repo_id"):
        return None
    return {"repo_id": ds["repo_id"], "url": ds.get("url") or f"https://huggingface.co/datasets/{ds['repo_id']}",
            "split": ds.get("split") or "train"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _provenance_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key in ("status", "recipe_sha256", "format_version"):
        if key in info:
            rows.append((key, f"`{info[key]}`"))
    prov = info.get("provenance") or {}
    if prov.get("packages"):
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in prov["packages"].items() if v)))
    if prov.get("git"):
        git = prov["git"]
        rows.append(("vitzoo git", f"`{git.get('commit', '')[:12]}`" + (" (dirty)" if git.get("dirty") else "")))
    for k, v in (prov.get("hardware") or {}).items():
        rows.append((f"hardware.{k}", ", ".join(map(str, v)) if isinstance(v, list) else _fmt(v)))
    if prov.get("command"):
        rows.append(("command", "`" + " ".join(map(str, prov["command"])) + "`"))
    for k in ("started_at", "finished_at"):
        if prov.get(k) or info.get(k):
            rows.append((k, str(prov.get(k) or info.get(k))))
    return [(k, v.replace("|", "\\|")) for k, v in rows]


def model_card(zoo_dir: str | Path, model_id: str, *, repo_id: str | None = None, revision: str | None = None,
               template: str | Path | None = None, license: str | None = None, plot: bool = True,
               facts: ZooFacts | None = None) -> Any:
    """The card of one model (``models/<id>/README.md``); writes ``training_curves.png`` if ``plot``.

    ``revision`` (default ``main``) is the branch, tag or commit its load snippets name."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    facts = facts or ZooFacts.read(zoo_dir)
    rows = facts.index[facts.index["model_id"] == model_id]
    if rows.empty:
        raise KeyError(f"model {model_id!r} is not in {facts.root}/index.parquet")
    final = rows[rows["final"].astype(bool)].iloc[0] if rows["final"].astype(bool).any() else rows.iloc[-1]
    folder = facts.root / "models" / model_id
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    repo = repo_id or f"<org>/{facts.name}"
    src = final.get("data.source") if "data.source" in rows.columns else None
    results, evals = [], []
    task = hub_task([final.get("objective.name")])
    # the task's own metric beside loss and accuracy: perplexity (language models), the PINN's relative L2 error
    extra = next((m for m in TASK_METRICS if any(_fmt(final.get(f"{s}_{m}")) != "-"
                                                             for s in ("train", "val", "test"))), None)
    for split in ("train", "val", "test"):
        loss, acc = final.get(f"{split}_loss"), final.get(f"{split}_acc")
        if _fmt(loss) != "-" or _fmt(acc) != "-":
            results.append({"split": split, "loss": _fmt(loss), "acc": _fmt(acc),
                            "extra": _fmt(final.get(f"{split}_{extra}")) if extra else "-"})
        if split != "train" and _fmt(acc) != "-" and task is not None:
            evals.append(EvalResult(task_type=task, dataset_type=dataset_type(src),
                                    dataset_name=str(src or "unknown"), dataset_split=split, metric_type="accuracy",
                                    metric_value=round(float(acc), 6)))
    from vitzoo.zoo.index import as_list

    grid = as_list(final.get("grid_factors"))
    shown = list(dict.fromkeys([*grid, *[c for c in KEY_COLUMNS if c in rows.columns]]))
    factors = [(c, _fmt(final.get(c))) for c in shown if c in rows.columns and _fmt(final.get(c)) != "-"]
    parent = final.get("parent_id")
    parent = parent if isinstance(parent, str) and parent else None
    pretrained = [v for k, v in final.items() if isinstance(v, str) and _HUB_ID.match(v)
                  and any(w in str(k) for w in ("pretrained", "base_model", "hub_id"))]
    base = pretrained[0] if pretrained else (repo_id if parent and repo_id else None)
    data = ModelCardData(
        license=license or facts.info.get("license") or "mit", library_name="vitzoo",
        tags=["vitzoo", "model-zoo", f"stage:{final['stage']}", *([task] if task else ["pinn"])],
        datasets=_hub_datasets([src]) or None, base_model=base, model_name=model_id if evals else None,
        eval_results=evals or None, pipeline_tag=task,
        vitzoo={"zoo": repo, "model_id": model_id, "stage": str(final["stage"]), "parent_id": parent,
                "parent_epoch": None if _fmt(final.get("parent_epoch")) == "-" else str(final.get("parent_epoch")),
                "status": str(final.get("status"))},
    )
    curve = None
    if plot and run.get("history"):
        if training_curve_plot(run["history"], model_id, folder / "training_curves.png") is not None:
            curve = "training_curves.png"
    card = ModelCard.from_template(
        data, template_str=_template(MODEL_TEMPLATE, template), model_id=model_id, zoo_name=facts.name,
        zoo_link=f"https://huggingface.co/{repo}" if repo_id else "../../README.md", repo_id=repo,
        stage=final["stage"], status=final.get("status"), final_epoch=int(final["epoch"]),
        parent_id=parent, parent_epoch=None if _fmt(final.get("parent_epoch")) == "-" else final.get("parent_epoch"),
        factors=factors, init_seed=_fmt(final.get("init_seed")), data_seed=_fmt(final.get("data_seed")),
        repeat=None if _fmt(final.get("repeat")) == "-" else final.get("repeat"), results=results,
        extra=TASK_METRICS.get(extra or ""), curve=curve,
        n_checkpoints=len(rows) - 1, example_epoch=int(rows["epoch"].min()), revision=revision or "main",
        snippets=load_snippets(repo, model_id, _model_config(facts.root, model_id), revision=revision,
                               example_epoch=int(rows["epoch"].min())),
    )
    return type(card)(_scrub(str(card)))


def render_zoo_cards(zoo_dir: str | Path, *, repo_id: str | None = None, revision: str | None = None,
                     template: str | Path | None = None, model_template: str | Path | None = None,
                     models: bool = True, plots: bool = True, license: str | None = None,
                     model_plots: bool | None = None) -> list[Path]:
    """(Re)write README.md and every indexed model's README.md from the index; returns the paths written.

    ``repo_id`` and ``revision`` (default ``main``; a card cannot name the commit it is part of) are
    what the cards' load snippets use.

    Call from process 0 only (zoo-level files have one writer). Models not in the index (still
    training) get no card: their folder is not part of the published zoo yet.
    """
    from vitzoo.zoo.io import write_text

    facts = ZooFacts.read(zoo_dir)
    written = [write_text(facts.root / "README.md",
                          str(zoo_card(zoo_dir, repo_id=repo_id, revision=revision, template=template, plots=plots,
                                       license=license, facts=facts)))]
    if models:
        for model_id in dict.fromkeys(facts.index["model_id"]):
            card = model_card(zoo_dir, model_id, repo_id=repo_id, revision=revision, template=model_template,
                              plot=plots if model_plots is None else model_plots,
                              license=license, facts=facts)
            written.append(write_text(facts.root / "models" / model_id / "README.md", str(card)))
    return written
