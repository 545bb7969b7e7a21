"""Merging bge-m3 models tensor by tensor (LM-Cocktail's answer to a fine-tune forgetting what the base knew).

    m3jax export --checkpoint runs/x --step best --output out --merge-with /models/bge-m3 --merge-weight 0.5
    m3jax merge --models runs/x_export /models/bge-m3 --weights 0.7 0.3 --output merged
    m3jax merge --models runs/x_export /models/bge-m3 --grid 0,0.25,0.5,0.75,1 \
        --eval-set domain=data/domain --eval-set general=data/general --output merged

Every tensor -- encoder, pooler, colbert_linear, sparse_linear -- becomes sum_i w_i * tensor_i, computed in float64
and rounded once to float32. The weights must be non-negative and sum to 1 (within 1e-6); they are used as given,
not normalised, so a weight of exactly 1 (the others 0) gives that model bit for bit. A model is a bge-m3 directory
(with its colbert_linear.pt and sparse_linear.pt: merging needs every tensor) or an m3jax run / step directory; a
LoRA run's adapters are merged into its kernels first. The models must have the same architecture (the same
tensors and shapes). The output takes config.json, the tokenizer and the pooling of the first model. The weights,
the weighted sum and loading a model to merge are m3jax.tools.merge_core's (shared with `m3jax export --merge-with`).

Grid (two models): for each W of the grid, the merge W * first + (1 - W) * second is evaluated on the eval sets
(the exact search of `m3jax eval`); the W with the best `--metric` (m3jax.evaluation.selection's syntax; default: the
first set's all/ndcg@10, the models carrying all three heads) is written, with every point's numbers in merge_grid.json
and the model card.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from m3jax.core import storage
from m3jax.evaluation import evaluate as ev
from m3jax.evaluation import selection
from m3jax.model import loading
from m3jax.model.inference import BGEM3FlagModel
from m3jax.tools import export as export_lib
from m3jax.tools import model_card
from m3jax.tools.merge_core import MergeError, check_weights, load_for_merge, merge_params

logger = logging.getLogger(__name__)

GRID_NAME = "merge_grid.json"


def load_models(paths: Sequence[str]) -> list[loading.LoadedModel]:
    models = []
    for i, path in enumerate(paths):
        like = (os.fspath(paths[0]), models[0].cfg) if models else None
        models.append(load_for_merge(path, like=like)[0])
        if i and (models[i].cfg.sentence_pooling_method, models[i].cfg.normalize_embeddings) != (
                models[0].cfg.sentence_pooling_method, models[0].cfg.normalize_embeddings):
            logger.warning("%s: pooling %s / normalize %s differ from %s's; the merge uses the first model's", path,
                           models[i].cfg.sentence_pooling_method, models[i].cfg.normalize_embeddings, paths[0])
    return models


def _write(models, paths, params, output, *, weights, card_info, overwrite, card_settings=None, extra_info=None,
           files=None) -> str:
    first = models[0]
    info = {"merge": {"models": [storage.resolve(p) for p in paths], "weights": list(weights)}, **(extra_info or {})}
    card = dict(card_info or {})
    card.setdefault("merge", info["merge"])
    if first.source.location is not None:  # an m3jax run: its card information
        run_card = model_card.card_info_from_run(first.source.location.work_dir, first.source.run_config,
                                                 first.source.location.step, card_settings)
        card = {**run_card, **card, "evals": {**run_card.get("evals", {}), **card.get("evals", {})}}
    out = export_lib.export_params(params, first.source.hf_config, output, tokenizer_dir=first.source.tokenizer_dir,
                                   sentence_pooling_method=first.cfg.sentence_pooling_method,
                                   normalize_embeddings=first.cfg.normalize_embeddings, overwrite=overwrite,
                                   export_info=info, card_info=card, extra_files=files)
    return out


def merge_models(paths: Sequence[str], weights: Sequence[float] | None, output, *, overwrite: bool = False,
                 card_settings: model_card.ModelCardSettings | None = None) -> str:
    """`m3jax merge --models ... --weights ...`: write the weighted merge (default: equal weights). `card_settings`:
    as export_checkpoint's (an m3jax run's card lists its config changes against these defaults)."""
    if len(paths) < 2:
        raise MergeError("--models: give at least two models to merge")
    weights = check_weights(weights if weights is not None else [1.0 / len(paths)] * len(paths), len(paths))
    models = load_models(paths)
    params = merge_params([m.params for m in models], weights)
    return _write(models, paths, params, output, weights=weights, card_info={}, overwrite=overwrite,
                  card_settings=card_settings)


def merge_grid(paths: Sequence[str], grid: Sequence[float], specs, output, *, metric: str = "",
               greater_is_better: bool = True, eval_sets=None, devices=None, use_fp16: bool = True,
               overwrite: bool = False,
               card_settings: model_card.ModelCardSettings | None = None) -> tuple[str, list[dict]]:
    """Evaluate W * first + (1 - W) * second for each W of `grid` on the eval sets `specs`
    (m3jax.evaluation.evaluate.EvalSetSpec), write the best merge to `output`; returns (output, points) with points
    [{"weight", "value", "metrics": {"<set>/<mode>/<metric>": v}}]."""
    if len(paths) != 2:
        raise MergeError(f"--grid: merges two models (W * first + (1 - W) * second); {len(paths)} given")
    if not grid:
        raise MergeError("--grid: no weights given")
    for w in grid:
        check_weights([w, 1.0 - w], 2, exact_pair=True)
    try:
        expression = selection.parse_metric(metric, specs)
    except ValueError as e:
        raise MergeError(f"--metric {metric!r}: {e}") from None
    logger.info("merge --grid: the weight is chosen by %s (%s; %s is better)", expression.text,
                "--metric" if expression.why == "given" else expression.why.replace("the trained heads",
                                                                                    "the models' heads"),
                "greater" if greater_is_better else "lower")
    if eval_sets is None:
        eval_sets = ev.load_eval_sets(specs)  # file errors before loading the models
    models = load_models(paths)
    first = models[0]
    limit = loading.max_tokens(first.cfg)
    for s in specs:  # before the first point is evaluated
        for name in ("query_max_len", "passage_max_len"):
            if getattr(s, name) > limit:
                raise MergeError(f"--{name.replace('_', '-')}={getattr(s, name)} (eval set {s.name}): at most "
                                 f"{limit}, the models' position limit (max_position_embeddings "
                                 f"{first.cfg.max_position_embeddings} - {int(first.cfg.pad_token_id) + 1} for XLM-R's "
                                 f"padding offset)")
    tokenizer = loading.load_tokenizer(first.source)
    points = []
    for w in grid:
        params = merge_params([models[0].params, models[1].params], [w, 1.0 - w])
        model = BGEM3FlagModel.from_params(first.cfg, params, tokenizer, use_fp16=use_fp16, devices=devices)
        results = {s.name: ev.evaluate_eval_set(model, eval_sets[s.name], batch_size=s.batch_size,
                                                query_max_len=s.query_max_len, passage_max_len=s.passage_max_len,
                                                modes=s.modes, weights=s.weights, metrics=s.metrics)
                   for s in specs}
        flat = selection.flat_metrics(results)
        points.append({"weight": float(w), "value": expression.value(flat), "metrics": flat})
        logger.info("merge W=%g: %s = %.5g", w, expression.text, points[-1]["value"])
    better = (lambda a, b: a > b) if greater_is_better else (lambda a, b: a < b)
    chosen = points[0]
    for p in points[1:]:
        if better(p["value"], chosen["value"]):
            chosen = p
    w = chosen["weight"]
    logger.info("merge --grid: chose W=%g by %s = %.5g", w, expression.text, chosen["value"])
    params = merge_params([models[0].params, models[1].params], [w, 1.0 - w])
    evals = {f"merged (W={w:g})": chosen["metrics"]}
    for p in points:  # the two ends are the models themselves
        if p["weight"] == 1.0:
            evals = {"first model (W=1)": p["metrics"], **evals}
        if p["weight"] == 0.0:
            evals = {"second model (W=0)": p["metrics"], **evals}
    grid_record = {"metric": expression.text, "greater_is_better": greater_is_better, "chosen_weight": w,
                   "models": [storage.resolve(p) for p in paths], "points": points}
    out = _write(models, paths, params, output, weights=[w, 1.0 - w], overwrite=overwrite, card_settings=card_settings,
                 card_info={"grid": points, "grid_metric": expression.text, "evals": evals},
                 extra_info={"merge_grid": {"metric": expression.text, "chosen_weight": w}},
                 files={GRID_NAME: json.dumps(grid_record, indent=2, sort_keys=True) + "\n"})
    return out, points
