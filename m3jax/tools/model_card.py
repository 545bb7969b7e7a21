"""The README.md every export writes: a Hugging Face model card (YAML front matter, then markdown).

Front matter: base_model, tags, library_name (sentence-transformers), pipeline_tag (sentence-similarity), license
when the base model's own README declares one. Body: base model, the training data directories and their sizes,
the config fields that differ from m3jax's defaults, the eval table (per set, mode and metric; the base model at
step 0, the exported step and a merge when they were measured) and usage snippets for FlagEmbedding,
sentence-transformers and m3jax.

`card_info_from_run(work_dir, run_config, step, settings)` gathers what a run directory knows; `render(info)` writes
the text.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

from m3jax.core import storage

logger = logging.getLogger(__name__)

TAGS = ("sentence-transformers", "feature-extraction", "sentence-similarity", "bge-m3", "dense", "sparse", "colbert",
        "m3jax")
_COUNT_LINES_BELOW = 2 * 2**30  # bytes of a data directory up to which its examples are counted


@dataclasses.dataclass(frozen=True)
class ModelCardSettings:
    """What a card compares a run's saved config with (m3jax.config.model_card_settings)."""

    default_config: dict  # m3jax's defaults as a run saves its config (JSON)


# ---------------------------------------------------------------------------------------------------------------
# What a run knows


def read_front_matter(readme_path: str) -> dict:
    """The YAML front matter of a model card ({} if none or unreadable)."""
    try:
        text = storage.read_bytes(readme_path).decode("utf-8")
    except (OSError, ValueError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        import yaml

        data = yaml.safe_load(match.group(1))
    except Exception:  # noqa: BLE001 - a card we cannot read just gives no license
        return {}
    return data if isinstance(data, dict) else {}


def base_model_name(path: str | None) -> str | None:
    """A Hugging Face id for a local model directory when its path shows one (the hub cache's
    models--ORG--NAME/snapshots/<hash>), else the directory name."""
    if not path:
        return None
    path = storage.resolve(path)
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    return storage.basename(path)


def data_dir_sizes(dirs) -> list[dict]:
    """Per training data directory: its .json/.jsonl files, bytes, and examples (lines; counted when the directory
    holds under 2 GiB). A directory missing here is listed as such."""
    out = []
    for d in dirs:
        entry: dict[str, Any] = {"path": d}
        if not storage.isdir(d):
            entry["missing"] = True
            out.append(entry)
            continue
        files = sorted(f for f in storage.listdir(d) if f.endswith((".json", ".jsonl")))
        size = sum(storage.getsize(storage.join(d, f)) for f in files)
        entry.update(files=len(files), bytes=size)
        if size < _COUNT_LINES_BELOW:
            count = 0
            for f in files:
                with storage.open_binary(storage.join(d, f)) as fh:
                    count += sum(1 for line in fh if line.strip())
            entry["examples"] = count
        out.append(entry)
    return out


def config_changes(run_config: dict, defaults: dict) -> dict:
    """The run config's fields (dotted names) whose values differ from `defaults` (m3jax's, ModelCardSettings)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v and k != "eval_sets":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    ours, theirs = flat(run_config), flat(defaults)
    return {k: v for k, v in sorted(ours.items()) if theirs.get(k, object()) != v}


def eval_rows(work_dir: str) -> dict[int, dict[str, float]]:
    """{step: {"<set>/<mode>/<metric>": value}} from a run's metrics.jsonl (the last row of a step wins: a resumed
    run redoes the evals after its checkpoint). The set of config.eval is "eval"."""
    path = storage.join(work_dir, "metrics.jsonl")
    out: dict[int, dict[str, float]] = {}
    if not storage.isfile(path):
        return out
    with storage.open_text(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            split = row.get("split", "")
            if split != "eval" and not split.startswith("eval/"):
                continue
            name = "eval" if split == "eval" else split[len("eval/"):]
            values = {f"{name}/{k}": v for k, v in row.items() if k not in ("step", "split")}
            out.setdefault(int(row["step"]), {}).update(values)
    return out


def card_info_from_run(work_dir: str | None, run_config: dict | None, step: int | None,
                       settings: ModelCardSettings | None = None) -> dict:
    """What the card of an export of `step` shows, from the run's directory and saved config; the config fields
    that differ from m3jax's defaults when `settings` gives those."""
    run_config = run_config or {}
    info: dict[str, Any] = {"step": step}
    base_path = run_config.get("model_name_or_path") or None
    info["base_model_path"] = base_path
    info["base_model"] = base_model_name(base_path)
    if base_path:
        license_ = read_front_matter(storage.join(base_path, "README.md")).get("license")
        if license_:
            info["license"] = license_
    train_data = run_config.get("train_data") or ""
    dirs = [p.strip() for p in train_data.split(",") if p.strip()] if isinstance(train_data, str) else list(train_data)
    info["train_data"] = data_dir_sizes(dirs)
    info["config_changes"] = config_changes(run_config, settings.default_config) if run_config and settings else {}
    columns = {}
    if work_dir:
        rows = eval_rows(work_dir)
        if 0 in rows:
            columns["base (step 0)"] = rows[0]
        if step is not None and step in rows:
            columns[f"fine-tuned (step {step})"] = rows[step]
        best_path = storage.join(work_dir, "best.json")
        if storage.isfile(best_path):
            best = json.loads(storage.read_bytes(best_path))
            info["best"] = {k: best.get(k) for k in ("metric_for_best_model", "greater_is_better", "step", "value")}
    info["evals"] = columns
    return info


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _front_matter(info: dict) -> str:
    import yaml

    meta: dict[str, Any] = {}
    if info.get("base_model"):
        meta["base_model"] = info["base_model"]
    meta["tags"] = list(TAGS) + (["merge"] if info.get("merge") else [])
    meta["library_name"] = "sentence-transformers"
    meta["pipeline_tag"] = "sentence-similarity"
    if info.get("license"):
        meta["license"] = info["license"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return json.dumps(value) if not isinstance(value, str) else value


def eval_table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per set/mode/metric, one column per model (base, fine-tuned, merged ...)."""
    names = []
    for values in columns.values():
        names += [n for n in values if n not in names]
    head = "| set | mode | metric | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    for name in names:
        set_name, mode, metric = name.split("/", 2) if name.count("/") >= 2 else ("", *name.split("/", 1))
        cells = [f"{columns[c][name]:.4f}" if name in columns[c] else "" for c in columns]
        lines.append(f"| {set_name} | {mode} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(info: dict, *, pooling: str = "cls") -> str:
    """The card text. `info`: card_info_from_run's dict, plus optionally "merge" ({"models", "weights"}),
    "grid" ([{"weight", "metrics", "value"}]), "title"."""
    title = info.get("title") or "bge-m3 fine-tuned with m3jax"
    out = [_front_matter(info), f"# {title}\n"]
    base = info.get("base_model")
    intro = "A BGE-M3 model (dense, sparse and ColBERT retrieval heads)"
    if base:
        intro += f" fine-tuned from `{base}`" + (f" (`{info['base_model_path']}`)" if info.get("base_model_path")
                                                  and info["base_model_path"] != base else "")
    out.append(intro + " with m3jax (BGE-M3 unified fine-tuning in JAX/Flax). It loads unchanged in FlagEmbedding, "
               "sentence-transformers and transformers.\n")
    if info.get("step") is not None:
        out.append(f"Exported from training step {info['step']}.")
    best = info.get("best")
    if best and best.get("step") is not None:
        marker = " (this export)" if best["step"] == info.get("step") else ""
        out.append(f"Best checkpoint by `{best['metric_for_best_model']}` "
                   f"({'higher' if best.get('greater_is_better', True) else 'lower'} is better): step "
                   f"{best['step']}{marker}, value {best['value']:.4f}.")
    out.append("")

    merge = info.get("merge")
    if merge:
        out.append("## Merge\n")
        out.append("Every tensor (encoder and heads) is the weighted sum of the models' tensors:\n")
        out.append("| model | weight |\n|---|---|")
        out += [f"| `{m}` | {w:g} |" for m, w in zip(merge["models"], merge["weights"])]
        out.append("")
    grid = info.get("grid")
    if grid:
        out.append("## Merge weight chosen on the eval sets\n")
        out.append(f"Weight W of the first model (1 - W for the second); chosen by `{info.get('grid_metric')}`.\n")
        names = list(grid[0]["metrics"])
        out.append("| W | " + " | ".join(names) + " | score |")
        out.append("|" + "---|" * (len(names) + 2))
        for point in grid:
            cells = " | ".join(f"{point['metrics'][n]:.4f}" for n in names)
            out.append(f"| {point['weight']:g} | {cells} | {point['value']:.4f} |")
        out.append("")

    out.append("## Training data\n")
    data = info.get("train_data") or []
    if data:
        out.append("| directory | files | examples | size |\n|---|---|---|---|")
        for d in data:
            if d.get("missing"):
                out.append(f"| `{d['path']}` | (not found where the export ran) | | |")
            else:
                examples = d.get("examples", "")
                out.append(f"| `{d['path']}` | {d['files']} | {examples} | {d['bytes'] / 2**20:.1f} MiB |")
    else:
        out.append("Not recorded (an export of in-memory params or a merge).")
    out.append("")
    changes = info.get("config_changes") or {}
    if changes:
        out.append("## Training configuration (fields that differ from m3jax's defaults)\n")
        out.append("| field | value |\n|---|---|")
        out += [f"| `{k}` | `{_fmt(v)}` |" for k, v in changes.items()]
        out.append("")
    columns = info.get("evals") or {}
    if columns:
        out.append("## Evaluation\n")
        out.append("Exact retrieval on each eval set (nDCG / Recall / MRR as trec_eval computes them).\n")
        out.append(eval_table(columns))
        out.append("")

    name = "path/to/this/model"
    pool = f', pooling_method="{pooling}"' if pooling != "cls" else ""
    out.append("## Usage\n")
    out.append("FlagEmbedding:\n")
    out.append("```python\nfrom FlagEmbedding import BGEM3FlagModel\n\n"
               f'model = BGEM3FlagModel("{name}", use_fp16=True{pool})\n'
               'out = model.encode(["What is BGE M3?"], return_dense=True, return_sparse=True, '
               'return_colbert_vecs=True)\n'
               'scores = model.compute_score([("What is BGE M3?", "BGE M3 is an embedding model.")])\n```\n')
    out.append("sentence-transformers (dense embeddings):\n")
    out.append("```python\nfrom sentence_transformers import SentenceTransformer\n\n"
               f'model = SentenceTransformer("{name}")\n'
               'embeddings = model.encode(["What is BGE M3?"], normalize_embeddings=True)\n```\n')
    out.append("m3jax (JAX; the same API as FlagEmbedding):\n")
    out.append("```python\nfrom m3jax import BGEM3FlagModel\n\n"
               f'model = BGEM3FlagModel("{name}", use_fp16=True)\n'
               'out = model.encode(["What is BGE M3?"], return_dense=True, return_sparse=True, '
               'return_colbert_vecs=True)\n```\n')
    out.append("Evaluate it: `m3jax eval --model path/to/this/model --corpus corpus.jsonl --queries queries.jsonl "
               "--qrels qrels.tsv`.\n")
    return "\n".join(out)
