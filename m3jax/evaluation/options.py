"""The scoring modes and metrics of retrieval eval, mining and teacher scores: their names, parsing and checks, and
how a mode combines the heads' scores.

Modes, each a score of a (query, passage) pair:
  dense, sparse, colbert   one head's similarity (m3jax.core.scores)
  dense+sparse  (w_d * dense + w_s * sparse) / (w_d + w_s)
  all           (w_d * dense + w_s * sparse + w_c * colbert) / (w_d + w_s + w_c)
  dense@K, colbert@K   Matryoshka: the head on the first K components of every vector, re-normalised (as
                inference's truncate_dim), from the same encoding; a training run with mrl_dims reports each size
with weights [w_d, w_s, w_c] defaulting to [1, 1, 1] like FlagEmbedding's compute_score.
Metrics: NAME@K with NAME one of ndcg, recall, mrr (m3jax.evaluation.metrics computes them).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")
_MODE_ALIASES = {"sparse+dense": "dense+sparse", "colbert+sparse+dense": "all", "lexical": "sparse",
                 "dense+sparse+colbert": "all"}
_MODE_PARTS = {"dense": ("dense",), "sparse": ("sparse",), "colbert": ("colbert",),
               "dense+sparse": ("dense", "sparse"), "all": ("dense", "sparse", "colbert")}
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)  # dense, sparse, colbert: FlagEmbedding compute_score's default
DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
METRIC_NAMES = ("ndcg", "recall", "mrr")
MIN_TOP_K = 100


_MATRYOSHKA_MODE = re.compile(r"(dense|colbert)@(\d+)")


def mode_parts(mode: str) -> tuple[tuple[str, ...], int | None]:
    """(the heads a mode combines, its Matryoshka size or None)."""
    match = _MATRYOSHKA_MODE.fullmatch(mode)
    return ((match.group(1),), int(match.group(2))) if match else (_MODE_PARTS[mode], None)


def matryoshka_modes(dims: Sequence[int], *, dense_size: int, colbert_size: int | None = None) -> tuple[str, ...]:
    """dense@K for the Matryoshka sizes K below the dense size (and colbert@K below colbert_size when given)."""
    out = [f"dense@{d}" for d in dims if d < dense_size]
    return tuple(out + ([f"colbert@{d}" for d in dims if d < colbert_size] if colbert_size else []))


def parse_modes(modes: str | Sequence[str]) -> tuple[str, ...]:
    """'dense,sparse' or a list -> canonical mode names (aliases: sparse+dense, colbert+sparse+dense, lexical;
    dense@K and colbert@K: Matryoshka sizes)."""
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else [str(m).strip() for m in modes]
    out = []
    for m in items:
        if not m:
            continue
        canonical = _MODE_ALIASES.get(m.lower(), m.lower())
        size = _MATRYOSHKA_MODE.fullmatch(canonical)
        if canonical not in MODES and not (size and int(size.group(2)) >= 1):
            raise ValueError(f"unknown mode {m!r}: expected some of {', '.join(MODES)}, dense@K, colbert@K")
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise ValueError("no modes given")
    return tuple(out)


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """'ndcg@10,recall@100' or a list -> canonical 'name@k' strings (name: ndcg, recall, mrr)."""
    items = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else [str(m).strip() for m in metrics]
    out = []
    for m in items:
        if not m:
            continue
        match = re.fullmatch(r"(ndcg|recall|mrr)@(\d+)", m.lower())
        if not match or int(match.group(2)) < 1:
            raise ValueError(f"unknown metric {m!r}: expected NAME@K with NAME one of {', '.join(METRIC_NAMES)}")
        name = f"{match.group(1)}@{int(match.group(2))}"
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no metrics given")
    return tuple(out)


def check_weights(weights: Sequence[float], modes: Sequence[str]) -> tuple[float, float, float]:
    w = tuple(float(x) for x in weights)
    if len(w) != 3:
        raise ValueError(f"weights={list(weights)}: expected three numbers (dense, sparse, colbert)")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights={list(weights)}: expected non-negative numbers")
    index = {"dense": 0, "sparse": 1, "colbert": 2}
    for mode in modes:
        parts = mode_parts(mode)[0]
        if len(parts) > 1 and sum(w[index[p]] for p in parts) <= 0:
            raise ValueError(f"weights={list(weights)}: the weights of mode {mode!r} sum to 0")
    return w


def scoring_mode(mode: str, weights: Sequence[float], error: type[Exception], use: str) -> tuple[str, tuple]:
    """(the one canonical mode, checked weights) for a job that ranks or scores by a single mode (`m3jax mine`,
    `m3jax score`); problems raise `error` naming the field. `use` completes "mode=...: <use> by one mode"."""
    try:
        modes = parse_modes(mode)
    except ValueError as e:
        raise error(f"mode: {e}") from None
    if len(modes) != 1:
        raise error(f"mode={mode!r}: {use} by one mode")
    if mode_parts(modes[0])[1] is not None:
        raise error(f"mode={mode!r}: Matryoshka modes (dense@K, colbert@K) are for eval; use dense, sparse, "
                    f"colbert, dense+sparse or all")
    try:
        return modes[0], check_weights(weights, modes)
    except ValueError as e:
        raise error(f"weights: {e}") from None


def combine(base: dict, mode: str, weights) -> Any:
    """One mode's scores from the heads' scores `base` {head: array}: the head itself, or the weighted mean of the
    combined heads (weights = [w_dense, w_sparse, w_colbert]). A Matryoshka mode (dense@K) is its own entry of
    `base`, scored on the cut vectors."""
    parts, dim = mode_parts(mode)
    if dim is not None:
        return base[mode]
    if len(parts) == 1:
        return base[parts[0]]
    w = {"dense": weights[0], "sparse": weights[1], "colbert": weights[2]}
    return sum(w[x] * base[x] for x in parts) / sum(w[x] for x in parts)


def heads_of(modes: Sequence[str]) -> frozenset[str]:
    """The heads (dense, sparse, colbert) that `modes` need."""
    return frozenset(p for m in parse_modes(modes) for p in mode_parts(m)[0])


def top_k_for(metrics: Sequence[str]) -> int:
    """How many passages a search keeps per query for `metrics`: max(100, the largest cutoff)."""
    return max([MIN_TOP_K] + [int(m.split("@")[1]) for m in parse_metrics(metrics)])
