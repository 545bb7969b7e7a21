"""Retrieval evaluation on BEIR-style files (local paths or URLs such as gs://...): nDCG@10, Recall@100 and MRR@10
for the dense, sparse and colbert scores of a bge-m3 model and their weighted combinations.

    python -m m3jax eval --model runs/toy_export --corpus toy_eval_data/corpus.jsonl \
        --queries toy_eval_data/queries.jsonl --qrels toy_eval_data/qrels.tsv

Files (BEIR layout):
  corpus.jsonl   {"_id": "d1", "title": "...", "text": "..."}   title optional; encoded as "title text" like
                                                               FlagEmbedding's evaluation searcher
  queries.jsonl  {"_id": "q1", "text": "..."}
  qrels.tsv      query-id <tab> corpus-id <tab> score   (header line optional; TREC's "qid 0 docid rel" also read)
Only queries that have qrels are evaluated (as BEIR does); a qrels line naming an unknown query is skipped and one
naming an unknown passage is kept as a relevant passage that cannot be retrieved (as pytrec_eval counts it); both
are counted and logged.

Search is exact, on the model's devices, in blocks (`ExactSearch`, also what `m3jax mine` uses): corpus passages are
encoded a few batches at a time and every block of queries (the blocks spread over the devices) is scored against
every block of passages with one jitted function (the similarities of m3jax.scores), keeping a running top-k
(k = max(100, the largest metric cutoff)) per query with `jax.lax.top_k`:
  dense    q . p
  sparse   lexical matching: each passage block becomes a dense [block, vocab] matrix of token weights on the device
           (max weight per token id, as in the lexical_weights dicts), read at the query's token ids
  colbert  sum over query tokens of the max over passage tokens of <q_i, p_j>, divided by the query's token count
           (FlagEmbedding's colbert_score on the unpadded vectors; padded passage tokens are masked out)
  dense+sparse  (w_d * dense + w_s * sparse) / (w_d + w_s)
  all           (w_d * dense + w_s * sparse + w_c * colbert) / (w_d + w_s + w_c)
  dense@K, colbert@K   Matryoshka: the head on the first K components of every vector, re-normalised (as
                inference's truncate_dim), from the same encoding; a training run with mrl_dims reports each size
with weights [w_d, w_s, w_c] defaulting to [1, 1, 1] like FlagEmbedding's compute_score.

Metrics follow trec_eval / pytrec_eval (what BEIR and FlagEmbedding's evaluation report): nDCG@k with the graded
qrels scores as gains and a log2(rank + 1) discount, the ideal ranking taken from every judged passage; Recall@k
= relevant passages (score > 0) in the top k / all relevant passages; MRR@k = 1 / rank of the first relevant
passage in the top k (0 if none). Equal scores are ranked like trec_eval does (passage id, descending), so the
numbers are those pytrec_eval gives for the same run. The mean is over the evaluated queries.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3jax import scores, storage
from m3jax import sharding as shard_lib
from m3jax.errors import M3JaxError
from m3jax.inference import BGEM3FlagModel, pack_outputs
from m3jax.padding import round_up

logger = logging.getLogger(__name__)

MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")
_MODE_ALIASES = {"sparse+dense": "dense+sparse", "colbert+sparse+dense": "all", "lexical": "sparse",
                 "dense+sparse+colbert": "all"}
_MODE_PARTS = {"dense": ("dense",), "sparse": ("sparse",), "colbert": ("colbert",),
               "dense+sparse": ("dense", "sparse"), "all": ("dense", "sparse", "colbert")}
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)  # dense, sparse, colbert: FlagEmbedding compute_score's default
DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
METRIC_NAMES = ("ndcg", "recall", "mrr")
MIN_TOP_K = 100
_BLOCK_BYTES = 256 * 2**20  # budget for the largest intermediate of one (query block, passage block) step


class EvalDataError(M3JaxError, ValueError):
    """An eval file is missing or malformed; the message names the file and line."""


LEGACY_EVAL_SET = "eval"  # config.eval as a set: logged as eval/<mode>/<metric>, as before eval_sets existed


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    """One eval set of a run, every field resolved (max lengths -1 = the training ones); m3jax.config's
    eval_set_specs reads them from a run config."""

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


# ---------------------------------------------------------------------------------------------------------------
# Options


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


def _check_weights(weights: Sequence[float], modes: Sequence[str]) -> tuple[float, float, float]:
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
        return modes[0], _check_weights(weights, modes)
    except ValueError as e:
        raise error(f"weights: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# BEIR files


def _read_jsonl(path: str, what: str):
    if not storage.isfile(path):
        raise EvalDataError(f"{path}: {what} file does not exist")
    with storage.open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
            yield lineno, obj


def _id_of(obj: dict, path: str, lineno: int) -> str:
    key = "_id" if "_id" in obj else "id" if "id" in obj else None
    if key is None:
        raise EvalDataError(f"{path}:{lineno}: missing \"_id\"")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise EvalDataError(f"{path}:{lineno}: \"{key}\" must be a non-empty string, found {value!r}")
    return str(value)


def _text_of(obj: dict, field: str, path: str, lineno: int, *, optional: bool = False) -> str:
    value = obj.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise EvalDataError(f"{path}:{lineno}: \"{field}\" must be a string, found "
                            f"{'nothing' if field not in obj else repr(value)}")
    return value


def _load_texts(path, what: str, text_of) -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR jsonl file in file order; `text_of(obj, lineno)` makes a line's text."""
    path = os.fspath(path)
    ids, texts, seen = [], [], {}
    for lineno, obj in _read_jsonl(path, what):
        record_id = _id_of(obj, path, lineno)
        if record_id in seen:
            raise EvalDataError(f"{path}:{lineno}: duplicate _id {record_id!r} (first on line {seen[record_id]})")
        seen[record_id] = lineno
        ids.append(record_id)
        texts.append(text_of(obj, lineno))
    if not ids:
        raise EvalDataError(f"{path}: the corpus is empty" if what == "corpus" else f"{path}: no queries")
    return ids, texts


def load_corpus(path) -> tuple[list[str], list[str]]:
    """(passage ids, passage texts) in file order; the text is "title text" when there is a title."""
    def text_of(obj, lineno):
        title = _text_of(obj, "title", path, lineno, optional=True)
        text = _text_of(obj, "text", path, lineno)
        return f"{title} {text}".strip() if title else text

    return _load_texts(path, "corpus", text_of)


def load_queries(path) -> tuple[list[str], list[str]]:
    """(query ids, query texts) in file order."""
    return _load_texts(path, "queries", lambda obj, lineno: _text_of(obj, "text", path, lineno))


def _parse_score(value: str, path: str, lineno: int) -> int:
    try:
        score = float(value)
    except ValueError:
        score = float("nan")
    if not math.isfinite(score) or score != int(score):
        raise EvalDataError(f"{path}:{lineno}: score {value!r} is not an integer relevance grade")
    return int(score)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def load_qrels(path) -> dict[str, dict[str, int]]:
    """{query id: {passage id: grade}} from a BEIR qrels TSV (query-id, corpus-id, score; header optional) or a
    TREC qrels file (query-id, iteration, corpus-id, grade)."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise EvalDataError(f"{path}: qrels file does not exist")
    qrels: dict[str, dict[str, int]] = {}
    where: dict[tuple[str, str], int] = {}
    with storage.open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            fields = [x.strip() for x in fields]
            if len(fields) == 4:  # TREC: qid iter docid rel
                fields = [fields[0], fields[2], fields[3]]
            if len(fields) != 3:
                raise EvalDataError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                                    f"found {len(fields)}")
            qid, pid, score = fields
            if lineno == 1 and not _is_number(score):
                continue  # header (query-id corpus-id score)
            if not qid or not pid:
                raise EvalDataError(f"{path}:{lineno}: empty query-id or corpus-id")
            grade = _parse_score(score, path, lineno)
            previous = qrels.setdefault(qid, {}).get(pid)
            if previous is not None and previous != grade:
                raise EvalDataError(f"{path}:{lineno}: ({qid}, {pid}) graded {grade} here and {previous} on line "
                                    f"{where[(qid, pid)]}")
            qrels[qid][pid] = grade
            where[(qid, pid)] = lineno
    if not qrels:
        raise EvalDataError(f"{path}: no qrels")
    return qrels


@dataclasses.dataclass
class EvalSet:
    query_ids: list[str]  # the evaluated queries (those with qrels), in queries-file order
    query_texts: list[str]
    corpus_ids: list[str]
    corpus_texts: list[str]
    qrels: dict[str, dict[str, int]]  # restricted to the evaluated queries
    unknown_query_qrels: int = 0  # qrels lines whose query is not in the queries file (skipped)
    unknown_passage_qrels: int = 0  # qrels lines whose passage is not in the corpus (kept: unretrievable)
    queries_without_qrels: int = 0  # queries in the file that are not evaluated


def load_eval_set(corpus_path, queries_path, qrels_path) -> EvalSet:
    corpus_ids, corpus_texts = load_corpus(corpus_path)
    all_qids, all_qtexts = load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    known_q = set(all_qids)
    known_p = set(corpus_ids)
    unknown_q = [q for q in qrels if q not in known_q]
    unknown_q_lines = sum(len(qrels[q]) for q in unknown_q)
    unknown_p_lines = sum(1 for q in qrels if q in known_q for p in qrels[q] if p not in known_p)
    if unknown_q:
        logger.warning("%s: %d qrels lines name %d queries that are not in %s (e.g. %r); skipped", qrels_path,
                       unknown_q_lines, len(unknown_q), queries_path, unknown_q[0])
    if unknown_p_lines:
        example = next(p for q in qrels if q in known_q for p in qrels[q] if p not in known_p)
        logger.warning("%s: %d qrels lines name passages that are not in %s (e.g. %r); they count as relevant "
                       "passages that cannot be retrieved", qrels_path, unknown_p_lines, corpus_path, example)
    pairs = [(q, t) for q, t in zip(all_qids, all_qtexts) if q in qrels]
    if not pairs:
        raise EvalDataError(f"{qrels_path}: none of its query ids is in {queries_path}; nothing to evaluate")
    return EvalSet(query_ids=[q for q, _ in pairs], query_texts=[t for _, t in pairs], corpus_ids=corpus_ids,
                   corpus_texts=corpus_texts, qrels={q: dict(qrels[q]) for q, _ in pairs},
                   unknown_query_qrels=unknown_q_lines, unknown_passage_qrels=unknown_p_lines,
                   queries_without_qrels=len(all_qids) - len(pairs))


# ---------------------------------------------------------------------------------------------------------------
# Metrics


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


# ---------------------------------------------------------------------------------------------------------------
# Exact search on the devices


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


@functools.partial(jax.jit, static_argnames=("modes", "k", "vocab_size", "normalize"))
def _search_block(best_scores, best_index, q, p, p_index, p_valid, weights, *, modes, k, vocab_size,
                  normalize=True):
    """Score one query block against one passage block and merge into the running top-k.

    q / p: head representations (m3jax.inference.pack_outputs); best_scores / best_index [M, Qb, k]; p_index [Pb]
    (corpus positions); p_valid [Pb] (False for padding rows); normalize: re-normalise Matryoshka cuts.
    """
    hi = jax.lax.Precision.HIGHEST  # exact float32 products on TPU/GPU too

    def similarity(head, dim=None):
        qx, px = q[head], p[head]
        if head == "sparse":  # the block's lexical vectors [Pb, V]; the queries' token ids are read from them
            px = scores.lexical_vectors(px.weights, px.ids, vocab_size)
        if dim is not None:
            qx, px = scores.truncate(qx, dim, normalize), scores.truncate(px, dim, normalize)
        return scores.SIMILARITIES[head](qx, px, precision=hi, **(
            {"block_bytes": _BLOCK_BYTES} if head == "colbert" else {}))

    base = {}
    for mode in modes:
        parts, dim = mode_parts(mode)
        for head in parts if dim is None else ():
            base.setdefault(head, similarity(head))
        if dim is not None:
            base[mode] = similarity(parts[0], dim)
    found = jnp.stack([combine(base, mode, weights) for mode in modes])
    found = jnp.where(p_valid[None, None, :], found, -jnp.inf)  # [M, Qb, Pb]
    index = jnp.broadcast_to(p_index[None, None, :], found.shape)
    all_scores = jnp.concatenate([best_scores, found], axis=-1)
    all_index = jnp.concatenate([best_index, index], axis=-1)
    top, pos = jax.lax.top_k(all_scores, k)  # equal scores: the lower index (the earlier passage) first
    return top, jnp.take_along_axis(all_index, pos, axis=-1)


def _devices_of(model) -> list:
    devices = getattr(model, "devices", None)  # m3jax: jax devices; FlagEmbedding: strings like "cpu"
    if devices and isinstance(devices[0], jax.Device):
        return list(devices)
    return [jax.devices()[0]]


def _vocab_size(model) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    return len(model.tokenizer)


class ExactSearch:
    """Exact top-k search of a fixed set of queries over passages fed in chunks (`add`), any number of them.

    `model`: m3jax's (or FlagEmbedding's) BGEM3FlagModel; queries go through encode_queries (query instruction),
    passages through encode_corpus. The queries are encoded once, padded and cut into blocks that are spread
    round-robin over the model's devices, each block with its running top-k on its device; every block of
    `passages_per_block` passages (default batch_size) is copied to each device and scored against that device's
    query blocks (jax runs the devices' work concurrently). Memory: the query representations, k scores per query
    and mode, and one passage chunk. Passages fed in increasing corpus position give ties to the lower position.

    `state()` / `load_state()` save and restore the running top-k (resume after an interruption); `result()`
    returns {mode: (scores [n_queries, k'], corpus positions [n_queries, k'])}, best first, k' = min(k, passages fed).
    """

    def __init__(self, model, query_texts: Sequence[str], *, modes: Sequence[str] = MODES,
                 weights: Sequence[float] = DEFAULT_WEIGHTS, top_k: int = MIN_TOP_K, batch_size: int = 64,
                 query_max_len: int = 512, passage_max_len: int = 512, passages_per_block: int | None = None):
        self.model, self.modes = model, parse_modes(modes)
        w = _check_weights(weights, self.modes)
        self.parts = heads_of(self.modes)
        self.n_q, self.k = len(query_texts), int(top_k)
        if self.n_q == 0 or self.k < 1:
            raise ValueError("search needs at least one query and top_k >= 1")
        self.batch_size, self.passage_max_len = batch_size, passage_max_len
        self.need = dict(return_dense="dense" in self.parts, return_sparse="sparse" in self.parts,
                         return_colbert_vecs="colbert" in self.parts)
        self.devices = _devices_of(model)
        self.vocab_size = _vocab_size(model)
        # Matryoshka cuts are re-normalised as the model's embeddings are (m3jax's cfg; FlagEmbedding's model itself)
        self.normalize = bool(getattr(getattr(model, "cfg", None), "normalize_embeddings",
                                      getattr(model, "normalize_embeddings", True)))
        self.seen = 0

        # Queries: encoded once, padded to a fixed block size, the blocks spread over the devices.
        q_enc = model.encode_queries(list(query_texts), batch_size=batch_size, max_length=query_max_len, **self.need)
        self._check_vocab(q_enc, "queries")
        self.p_block = max(1, int(passages_per_block or batch_size))
        p_len = round_up(max(1, passage_max_len))
        q_pack = pack_outputs(q_enc, self.parts, self.n_q)
        q_len = q_pack["colbert"].vecs.shape[1] if "colbert" in self.parts else 1
        q_lex = q_pack["sparse"].ids.shape[1] if "sparse" in self.parts else 1
        per_query = self.p_block * max(q_len * p_len if "colbert" in self.parts else 1, q_lex, 1) * 4
        per_device = -(-self.n_q // len(self.devices))
        q_block = 1
        while q_block * 2 * per_query <= _BLOCK_BYTES and q_block < per_device:
            q_block *= 2
        self.q_block, n_q_blocks = q_block, -(-self.n_q // q_block)
        q_pack = pack_outputs(q_enc, self.parts, n_q_blocks * q_block,
                              lex_width=q_lex if "sparse" in self.parts else None,
                              col_length=q_len if "colbert" in self.parts else None)
        del q_enc
        self.block_device = [self.devices[i % len(self.devices)] for i in range(n_q_blocks)]
        self.q_blocks = [jax.device_put(jax.tree.map(lambda v, s=slice(i * q_block, (i + 1) * q_block): v[s], q_pack),
                                        d) for i, d in enumerate(self.block_device)]
        self.weights = {d: jax.device_put(jnp.asarray(w, jnp.float32), d) for d in self.devices}
        m = len(self.modes)
        self.load_state(np.full((m, self.n_q, self.k), -np.inf, np.float32), np.zeros((m, self.n_q, self.k), np.int32))

    def _check_vocab(self, enc, what):
        if "sparse" in self.parts:
            top = max((int(t) for x in enc["lexical_weights"] for t in x), default=0)
            if top >= self.vocab_size:
                raise ValueError(f"{what}: token id {top} is outside the vocabulary ({self.vocab_size})")

    def add(self, texts: Sequence[str], positions: Sequence[int] | None = None) -> None:
        """Search the passages `texts`, at corpus `positions` (default: the next ones after those fed so far)."""
        n = len(texts)
        if n == 0:
            return
        positions = np.arange(self.seen, self.seen + n) if positions is None else np.asarray(positions)
        enc = self.model.encode_corpus(list(texts), batch_size=self.batch_size, max_length=self.passage_max_len,
                                       **self.need)
        self._check_vocab(enc, "corpus")
        for sub in range(0, n, self.p_block):
            sl = slice(sub, sub + self.p_block)
            count = len(positions[sl])
            packed = pack_outputs({key: (v[sl] if v is not None else None) for key, v in enc.items()}, self.parts,
                                  self.p_block)
            p_index = np.zeros(self.p_block, np.int32)
            p_index[:count] = positions[sl]
            p_valid = np.arange(self.p_block) < count
            on_device = {d: jax.device_put((packed, p_index, p_valid), d) for d in self.devices}
            for i, d in enumerate(self.block_device):
                self.best[i] = _search_block(*self.best[i], self.q_blocks[i], *on_device[d], self.weights[d],
                                             modes=self.modes, k=self.k, vocab_size=self.vocab_size,
                                             normalize=self.normalize)
        self.seen += n

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """The running top-k: (scores [modes, n_queries, k] float32, corpus positions [modes, n_queries, k])."""
        top = np.concatenate([np.asarray(s) for s, _ in self.best], axis=1)[:, :self.n_q]
        index = np.concatenate([np.asarray(i) for _, i in self.best], axis=1)[:, :self.n_q]
        return top, index

    def load_state(self, top: np.ndarray, index: np.ndarray) -> None:
        """Restore a running top-k saved by `state()`."""
        m, qb = len(self.modes), self.q_block
        rows = len(self.block_device) * qb
        if top.shape != (m, self.n_q, self.k) or index.shape != top.shape:
            raise ValueError(f"search state of shape {top.shape} / {index.shape}, expected {(m, self.n_q, self.k)}")
        full_top = np.full((m, rows, self.k), -np.inf, np.float32)
        full_index = np.zeros((m, rows, self.k), np.int32)
        full_top[:, :self.n_q], full_index[:, :self.n_q] = top, index
        self.best = [(jax.device_put(full_top[:, i * qb:(i + 1) * qb], d),
                      jax.device_put(full_index[:, i * qb:(i + 1) * qb], d)) for i, d in enumerate(self.block_device)]

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        top, index = self.state()
        k = min(self.k, self.seen)
        return {mode: (top[m, :, :k], index[m, :, :k]) for m, mode in enumerate(self.modes)}


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge running top-k lists over disjoint passage sets (e.g. one per process): (scores, positions) [..., k_i]
    each -> the best k, equal scores ordered by position."""
    top = np.concatenate([s for s, _ in parts], axis=-1)
    index = np.concatenate([i for _, i in parts], axis=-1)
    order = np.lexsort((index, -top.astype(np.float64)), axis=-1)[..., :k]
    return np.take_along_axis(top, order, axis=-1), np.take_along_axis(index, order, axis=-1)


def search(model, query_texts: Sequence[str], corpus_texts: Sequence[str], *, modes: Sequence[str] = MODES,
           weights: Sequence[float] = DEFAULT_WEIGHTS, top_k: int = MIN_TOP_K, batch_size: int = 64,
           query_max_len: int = 512, passage_max_len: int = 512, passages_per_encode: int | None = None,
           split_over_processes: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact top-k search: {mode: (scores [n_queries, k], corpus positions [n_queries, k])}, best first.

    `model`: m3jax's (or FlagEmbedding's) BGEM3FlagModel; queries go through encode_queries (query instruction),
    passages through encode_corpus, a few blocks at a time (ExactSearch). k = min(top_k, corpus size).

    `split_over_processes` (a multi-process job; every process must call this with the same arguments): the corpus
    chunks are dealt round-robin to the processes, each searches its chunks on its local devices, and the running
    top-k lists are all-gathered and merged (merge_top_k). Chunk boundaries, blocks and tie order (lower corpus
    position first) are those of a single process, so with the same number of local devices the result is the same
    to the last bit.
    """
    n_q, n_p = len(query_texts), len(corpus_texts)
    if n_q == 0 or n_p == 0:
        raise ValueError("search needs at least one query and one passage")
    searcher = ExactSearch(model, query_texts, modes=modes, weights=weights, top_k=min(int(top_k), n_p),
                           batch_size=batch_size, query_max_len=query_max_len, passage_max_len=passage_max_len)
    chunk = passages_per_encode or 8 * searcher.p_block
    chunk = max(searcher.p_block, chunk - chunk % searcher.p_block)
    rank, n_proc = (jax.process_index(), jax.process_count()) if split_over_processes else (0, 1)
    for start in list(range(0, n_p, chunk))[rank::n_proc]:
        stop = min(start + chunk, n_p)
        searcher.add(corpus_texts[start:stop], positions=np.arange(start, stop))
    if n_proc == 1:
        return searcher.result()
    top, index = searcher.state()
    top, index = merge_top_k(list(zip(_process_allgather(top), _process_allgather(index))), searcher.k)
    return {mode: (top[m], index[m]) for m, mode in enumerate(searcher.modes)}


def _process_allgather(x: np.ndarray) -> list[np.ndarray]:
    """Every process's `x` (same shape on all), in process order."""
    from jax.experimental import multihost_utils

    return list(np.asarray(multihost_utils.process_allgather(x)))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def top_k_for(metrics: Sequence[str]) -> int:
    return max([MIN_TOP_K] + [int(m.split("@")[1]) for m in parse_metrics(metrics)])


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


def runs_from_search(found: tuple[np.ndarray, np.ndarray], query_ids: Sequence[str],
                     corpus_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """One mode's (scores, positions) -> {query id: {passage id: score}} (pytrec_eval's run format)."""
    scores, index = found
    return {q: {corpus_ids[j]: float(s) for s, j in zip(scores[r], index[r])} for r, q in enumerate(query_ids)}


def evaluate(model, corpus_path, queries_path, qrels_path, *, batch_size: int = 64, query_max_len: int = 512,
             passage_max_len: int = 512, modes: Sequence[str] = MODES, weights: Sequence[float] = DEFAULT_WEIGHTS,
             metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """Evaluate `model` (m3jax.inference.BGEM3FlagModel) on BEIR files: {mode: {metric: value}}.

    modes: some of dense, sparse, colbert, dense+sparse, all. weights: [dense, sparse, colbert] for the
    combinations. metrics: NAME@K with NAME in ndcg, recall, mrr (default ndcg@10, recall@100, mrr@10).
    """
    modes, metrics = parse_modes(modes), parse_metrics(metrics)
    _check_weights(weights, modes)
    eval_set = load_eval_set(corpus_path, queries_path, qrels_path)
    logger.info("eval: %d queries with qrels, %d passages", len(eval_set.query_ids), len(eval_set.corpus_ids))
    return evaluate_eval_set(model, eval_set, batch_size=batch_size, query_max_len=query_max_len,
                             passage_max_len=passage_max_len, modes=modes, weights=weights, metrics=metrics)


def evaluate_from_config(config, model_cfg, params, tokenizer, *, devices=None) -> dict[str, dict[str, float]]:
    """The eval of config.eval alone (the periodic eval before eval_sets existed): {mode: {metric: value}}.

    Reads config.eval.{corpus, queries, qrels, batch_size, query_max_len, passage_max_len} (a max_len of -1 takes
    the training one) and config.eval.{modes, weights, metrics}; see `evaluate_sets_from_config`.
    """
    ev = config.eval
    for field in ("corpus", "queries", "qrels"):
        if not ev[field]:
            raise EvalDataError(f"config.eval.{field} is empty; set corpus, queries and qrels to evaluate")
    get = lambda name, default: ev[name] if name in ev and ev[name] is not None else default
    spec = EvalSetSpec(
        name=LEGACY_EVAL_SET, corpus=ev.corpus, queries=ev.queries, qrels=ev.qrels,
        batch_size=ev.batch_size, query_max_len=ev.query_max_len if ev.query_max_len > 0 else config.query_max_len,
        passage_max_len=ev.passage_max_len if ev.passage_max_len > 0 else config.passage_max_len,
        modes=parse_modes(tuple(get("modes", MODES))), weights=tuple(get("weights", DEFAULT_WEIGHTS)),
        metrics=parse_metrics(tuple(get("metrics", DEFAULT_METRICS))))
    return evaluate_sets_from_config(config, model_cfg, params, tokenizer, specs=[spec], devices=devices)[spec.name]


def load_eval_sets(specs) -> dict[str, EvalSet]:
    """{name: EvalSet} of config.eval_set_specs(config) (read once when a run starts: file errors stop it early)."""
    out = {}
    for spec in specs:
        out[spec.name] = load_eval_set(spec.corpus, spec.queries, spec.qrels)
        logger.info("eval set %s: %d queries with qrels, %d passages", spec.name, len(out[spec.name].query_ids),
                    len(out[spec.name].corpus_ids))
    return out


def evaluate_sets_from_config(config, model_cfg, params, tokenizer, *, specs, eval_sets=None,
                              devices=None) -> dict[str, dict[str, dict[str, float]]]:
    """The periodic eval of a training run: {set: {mode: {metric: value}}} for each of `specs` (the run's:
    m3jax.config.eval_set_specs(config), config.eval as "eval", then config.eval_sets).

    Every set reports its modes plus dense@K (and colbert@K with mrl_colbert) for each Matryoshka size K of
    config.mrl_dims; the query / passage instructions of the training config are applied. `eval_sets`: the
    loaded files by name (default: read now). `params` may be the train state's sharded params. In a multi-process
    run every process must call this: the params are gathered, the corpus is shared out over the processes and
    the top-k lists merged (`search`), and every process gets the same numbers.
    `devices`: as BGEM3FlagModel's (default: every local device encodes a slice of each batch).
    """
    specs = list(specs)
    if eval_sets is None:
        eval_sets = load_eval_sets(specs)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(params)):
        params = shard_lib.to_host(params)  # spread over several processes: every process gets a full copy
    dims = tuple(config.mrl_dims) if "mrl_dims" in config else ()
    sizes = matryoshka_modes(dims, dense_size=model_cfg.hidden_size,
                             colbert_size=model_cfg.colbert_out_dim if config.get("mrl_colbert") else None)
    model = BGEM3FlagModel.from_params(
        model_cfg, params, tokenizer, use_fp16=model_cfg.dtype == "bfloat16", devices=devices,
        batch_size=specs[0].batch_size if specs else 64,
        query_instruction_for_retrieval=config.query_instruction_for_retrieval,
        query_instruction_format=config.query_instruction_format)
    results = {}
    for spec in specs:
        results[spec.name] = evaluate_eval_set(
            model, eval_sets[spec.name], batch_size=spec.batch_size, query_max_len=spec.query_max_len,
            passage_max_len=spec.passage_max_len, modes=parse_modes(tuple(spec.modes) + sizes), weights=spec.weights,
            metrics=spec.metrics, passage_instruction=config.passage_instruction_for_retrieval,
            passage_instruction_format=config.passage_instruction_format,
            split_over_processes=jax.process_count() > 1)
    return results


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
