"""Retrieval metrics as trec_eval / pytrec_eval compute them (what BEIR and FlagEmbedding's evaluation report), and
the forms results are shown and logged in.

nDCG@k takes the graded qrels scores as gains and a log2(rank + 1) discount, the ideal ranking from every judged
passage; Recall@k = relevant passages (score > 0) in the top k / all relevant passages; MRR@k = 1 / rank of the
first relevant passage in the top k (0 if none). Equal scores are ranked like trec_eval does (passage id,
descending), so the numbers are those pytrec_eval gives for the same run. The mean is over the evaluated queries.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from m3jax.evaluation.options import DEFAULT_METRICS, parse_metrics


def _trec_order(docs: dict[str, float]) -> list[str]:
    """Passage ids by score descending, ties by id descending (trec_eval's order)."""
    ranked = sorted(docs, reverse=True)  # id descending
    ranked.sort(key=lambda d: docs[d], reverse=True)  # stable: equal scores keep the id order
    return ranked


def _query_metrics(judged: dict[str, int], ranked: list[str], metrics: Sequence[str]) -> dict[str, float]:
    out = {}
    relevant = {d for d, g in judged.items() if g > 0}
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    for metric in metrics:
        name, k = metric.split("@")
        k = int(k)
        top = ranked[:k]
        if name == "ndcg":
            dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if judged.get(d, 0) > 0)
            idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
            out[metric] = dcg / idcg if idcg > 0 else 0.0
        elif name == "recall":
            out[metric] = len(relevant.intersection(top)) / len(relevant) if relevant else 0.0
        else:  # mrr
            out[metric] = next((1.0 / (i + 1) for i, d in enumerate(top) if d in relevant), 0.0)
    return out


def compute_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
                    metrics: Sequence[str] = DEFAULT_METRICS, *, per_query: bool = False):
    """Mean metrics over the queries of `qrels` for a run {query id: {passage id: score}} (pytrec_eval's inputs).

    A query of qrels missing from the run scores 0. With per_query=True returns (means, {query id: {metric: v}}).
    """
    metrics = parse_metrics(metrics)
    if not qrels:
        raise ValueError("qrels is empty")
    each = {q: _query_metrics(judged, _trec_order(run.get(q, {})), metrics) for q, judged in qrels.items()}
    means = {m: float(np.mean([v[m] for v in each.values()])) for m in metrics}
    return (means, each) if per_query else means


def runs_from_search(found: tuple[np.ndarray, np.ndarray], query_ids: Sequence[str],
                     corpus_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """One mode's (scores, positions) -> {query id: {passage id: score}} (pytrec_eval's run format)."""
    scores, index = found
    return {q: {corpus_ids[j]: float(s) for s, j in zip(scores[r], index[r])} for r, q in enumerate(query_ids)}


def flatten_metrics(results: dict[str, dict[str, float]], prefix: str = "eval/") -> dict[str, float]:
    """{mode: {metric: v}} -> {"eval/<mode>/<metric>": v} (TensorBoard scalars)."""
    return {f"{prefix}{mode}/{metric}": v for mode, values in results.items() for metric, v in values.items()}


def format_table(results: dict[str, dict[str, float]]) -> str:
    metrics = list(next(iter(results.values())))
    width = max(len("mode"), *(len(m) for m in results)) + 2
    cols = [max(10, len(m) + 2) for m in metrics]
    lines = ["mode".ljust(width) + "".join(m.rjust(c) for m, c in zip(metrics, cols))]
    for mode, values in results.items():
        lines.append(mode.ljust(width) + "".join(f"{values[m]:.4f}".rjust(c) for m, c in zip(metrics, cols)))
    return "\n".join(lines)


def results_json(results: dict[str, dict[str, float]], **info: Any) -> dict:
    return {"metrics": results, **info}
