"""Retrieval evaluation of a bge-m3 model on BEIR-style eval sets: nDCG@10, Recall@100 and MRR@10 for the dense,
sparse and colbert scores and their weighted combinations.

    python -m m3jax eval --model runs/toy_export --corpus toy_eval_data/corpus.jsonl \
        --queries toy_eval_data/queries.jsonl --qrels toy_eval_data/qrels.tsv

The pieces, one module each: the files (m3jax.evaluation.data), the modes and metric names (m3jax.evaluation.options),
the exact search on the devices (m3jax.evaluation.search) and the metrics (m3jax.evaluation.metrics). Here: evaluating
a model on one set (`evaluate_eval_set`, `evaluate`) and a training run's periodic eval of its sets (`EvalSettings`,
`evaluate_sets`).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax

from m3jax.core import sharding as shard_lib
from m3jax.evaluation.data import EvalDataError, EvalSet, load_eval_set
from m3jax.evaluation.metrics import compute_metrics, runs_from_search
from m3jax.evaluation.options import (
    DEFAULT_METRICS,
    DEFAULT_WEIGHTS,
    MODES,
    check_weights,
    matryoshka_modes,
    parse_metrics,
    parse_modes,
    top_k_for,
)
from m3jax.evaluation.search import search
from m3jax.model.inference import BGEM3FlagModel

logger = logging.getLogger(__name__)

LEGACY_EVAL_SET = "eval"  # config.eval as a set: logged as eval/<mode>/<metric>, as before eval_sets existed


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    """One eval set of a run, every field resolved (max lengths -1 = the training ones); m3jax.config's
    eval_settings reads them from a run config."""

    name: str
    corpus: str
    queries: str
    qrels: str
    batch_size: int
    query_max_len: int
    passage_max_len: int
    modes: tuple[str, ...]
    weights: tuple[float, float, float]
    metrics: tuple[str, ...]

    @property
    def log_prefix(self) -> str:
        """The TensorBoard / metrics.jsonl prefix: eval/<set> (the legacy set: eval)."""
        return "eval" if self.name == LEGACY_EVAL_SET else f"eval/{self.name}"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """A training run's eval (m3jax.config.eval_settings): its sets and what they share."""

    eval: EvalSetSpec  # config.eval as a set named "eval" (its corpus / queries / qrels may be empty)
    eval_set_specs: tuple[EvalSetSpec, ...]  # the run's sets: `eval` when its corpus is set, then config.eval_sets
    eval_steps: int
    eval_on_start: bool
    mrl_dims: tuple[int, ...]  # every set also reports dense@K (and colbert@K with mrl_colbert) for these
    mrl_colbert: bool
    query_instruction_for_retrieval: str | None
    query_instruction_format: str
    passage_instruction_for_retrieval: str | None
    passage_instruction_format: str

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates its sets: every eval_steps steps, or at step 0 with eval_on_start."""
        return self.eval_steps > 0 or self.eval_on_start


def evaluate_eval_set(model, eval_set: EvalSet, *, batch_size: int = 64, query_max_len: int = 512,
                      passage_max_len: int = 512, modes: Sequence[str] = MODES,
                      weights: Sequence[float] = DEFAULT_WEIGHTS, metrics: Sequence[str] = DEFAULT_METRICS,
                      passage_instruction: str | None = None, passage_instruction_format: str = "{}{}",
                      split_over_processes: bool = False) -> dict[str, dict[str, float]]:
    """{mode: {metric: mean value}} for an already loaded EvalSet (see `evaluate`). `split_over_processes`: the
    corpus is shared out over the processes of a multi-process job (see `search`); every process gets the same
    numbers."""
    modes, metrics = parse_modes(modes), parse_metrics(metrics)
    corpus_texts = eval_set.corpus_texts
    if passage_instruction:
        corpus_texts = [passage_instruction_format.format(passage_instruction, t) for t in corpus_texts]
    found = search(model, eval_set.query_texts, corpus_texts, modes=modes, weights=weights,
                   top_k=top_k_for(metrics), batch_size=batch_size, query_max_len=query_max_len,
                   passage_max_len=passage_max_len, split_over_processes=split_over_processes)
    results = {}
    for mode in modes:
        run = runs_from_search(found[mode], eval_set.query_ids, eval_set.corpus_ids)
        results[mode] = compute_metrics(eval_set.qrels, run, metrics)
    return results


def evaluate(model, corpus_path, queries_path, qrels_path, *, batch_size: int = 64, query_max_len: int = 512,
             passage_max_len: int = 512, modes: Sequence[str] = MODES, weights: Sequence[float] = DEFAULT_WEIGHTS,
             metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """Evaluate `model` (m3jax.model.inference.BGEM3FlagModel) on BEIR files: {mode: {metric: value}}.

    modes: some of dense, sparse, colbert, dense+sparse, all. weights: [dense, sparse, colbert] for the
    combinations. metrics: NAME@K with NAME in ndcg, recall, mrr (default ndcg@10, recall@100, mrr@10).
    """
    modes, metrics = parse_modes(modes), parse_metrics(metrics)
    check_weights(weights, modes)
    eval_set = load_eval_set(corpus_path, queries_path, qrels_path)
    logger.info("eval: %d queries with qrels, %d passages", len(eval_set.query_ids), len(eval_set.corpus_ids))
    return evaluate_eval_set(model, eval_set, batch_size=batch_size, query_max_len=query_max_len,
                             passage_max_len=passage_max_len, modes=modes, weights=weights, metrics=metrics)


def load_eval_sets(specs) -> dict[str, EvalSet]:
    """{name: EvalSet} of eval set specs (read once when a run starts: file errors stop it early)."""
    out = {}
    for spec in specs:
        out[spec.name] = load_eval_set(spec.corpus, spec.queries, spec.qrels)
        logger.info("eval set %s: %d queries with qrels, %d passages", spec.name, len(out[spec.name].query_ids),
                    len(out[spec.name].corpus_ids))
    return out


def evaluate_sets(settings: EvalSettings, model_cfg, params, tokenizer, *, specs: Sequence[EvalSetSpec] | None = None,
                  eval_sets=None, devices=None) -> dict[str, dict[str, dict[str, float]]]:
    """The periodic eval of a training run: {set: {mode: {metric: value}}} for each of `specs` (default: the run's,
    settings.eval_set_specs: config.eval as "eval", then config.eval_sets).

    Every set reports its modes plus dense@K (and colbert@K with mrl_colbert) for each Matryoshka size K of
    settings.mrl_dims; the query / passage instructions of the training config are applied. `eval_sets`: the
    loaded files by name (default: read now). `params` may be the train state's sharded params. In a multi-process
    run every process must call this: the params are gathered, the corpus is shared out over the processes and
    the top-k lists merged (`search`), and every process gets the same numbers.
    `devices`: as BGEM3FlagModel's (default: every local device encodes a slice of each batch).
    """
    specs = list(settings.eval_set_specs if specs is None else specs)
    if eval_sets is None:
        eval_sets = load_eval_sets(specs)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(params)):
        params = shard_lib.to_host(params)  # spread over several processes: every process gets a full copy
    sizes = matryoshka_modes(settings.mrl_dims, dense_size=model_cfg.hidden_size,
                             colbert_size=model_cfg.colbert_out_dim if settings.mrl_colbert else None)
    model = BGEM3FlagModel.from_params(
        model_cfg, params, tokenizer, use_fp16=model_cfg.dtype == "bfloat16", devices=devices,
        batch_size=specs[0].batch_size if specs else 64,
        query_instruction_for_retrieval=settings.query_instruction_for_retrieval,
        query_instruction_format=settings.query_instruction_format)
    results = {}
    for spec in specs:
        results[spec.name] = evaluate_eval_set(
            model, eval_sets[spec.name], batch_size=spec.batch_size, query_max_len=spec.query_max_len,
            passage_max_len=spec.passage_max_len, modes=parse_modes(tuple(spec.modes) + sizes), weights=spec.weights,
            metrics=spec.metrics, passage_instruction=settings.passage_instruction_for_retrieval,
            passage_instruction_format=settings.passage_instruction_format,
            split_over_processes=jax.process_count() > 1)
    return results


def evaluate_legacy_set(settings: EvalSettings, model_cfg, params, tokenizer, *,
                        devices=None) -> dict[str, dict[str, float]]:
    """The eval of config.eval alone (settings.eval; the periodic eval before eval_sets existed):
    {mode: {metric: value}}, as `evaluate_sets` computes it. EvalDataError when its corpus, queries or qrels is
    empty."""
    for field in ("corpus", "queries", "qrels"):
        if not getattr(settings.eval, field):
            raise EvalDataError(f"config.eval.{field} is empty; set corpus, queries and qrels to evaluate")
    return evaluate_sets(settings, model_cfg, params, tokenizer, specs=[settings.eval],
                         devices=devices)[settings.eval.name]
