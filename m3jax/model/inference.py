"""`BGEM3FlagModel`: FlagEmbedding's inference API (M3Embedder) on the JAX model.

Same constructor arguments, same `encode` / `encode_queries` / `encode_corpus` / `compute_score` outputs:
  dense_vecs       np.ndarray [N, H] (float32)
  lexical_weights  list of {token-id string: weight}, max weight per id, special ids and zero weights dropped
  colbert_vecs     list of [tokens - 1, D] arrays (no cls vector, padding removed)

Texts are packed several to a row (m3jax.core.packing: segment ids, positions restarting per text, attention confined
to each text) in rows of a small ladder of lengths, row counts and segment slots, so a large encode job computes
little padding and compiles a handful of shapes; `packing=False` encodes as before packing: texts sorted by length
in batches padded to the ladder (the same outputs within float rounding, tests/test_packing.py; the default on GPU,
until cuDNN's packed layout is checked there). On CPU the model
runs in float32 whatever use_fp16 says (FlagEmbedding does the same); on accelerators use_fp16 / use_bf16 select
bfloat16 compute.

`FlagReranker` does the same for FlagEmbedding's cross-encoder reranker (bge-reranker-v2-m3's layout): compute_score
of (query, passage) pairs with FlagEmbedding's tokenisation, on m3jax.model.encoder.Reranker.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3jax.core import packing, scores
from m3jax.core import sharding as shard_lib
from m3jax.core.padding import length_buckets, pad_length, round_up
from m3jax.model import encoder as m3model
from m3jax.model import loading

logger = logging.getLogger(__name__)


def _select_devices(devices) -> list:
    if devices is None:
        return jax.local_devices()
    if isinstance(devices, (str, int)):
        devices = [devices]
    chosen = []
    for d in devices:
        if isinstance(d, str) and d.startswith("cpu"):
            chosen.append(jax.local_devices(backend="cpu")[0])
        else:  # "cuda:1", "tpu:0", 1 -> that index among the default backend's local devices
            index = int(str(d).rsplit(":", 1)[-1]) if ":" in str(d) or isinstance(d, int) else 0
            local = jax.local_devices()
            if index >= len(local):
                raise ValueError(f"devices={devices!r}: there are only {len(local)} local {local[0].platform} devices")
            chosen.append(local[index])
    return list(dict.fromkeys(chosen))


_INFERENCE_RULES = (("batch", "batch"),)  # the inference mesh has one axis, "batch": params replicated


def bucketed_batches(token_ids: Sequence[Sequence[int]], batch_size: int, ladder: Sequence[int], n_dev: int,
                     pad_id: int, tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Length-sorted batches of token id lists, as (row indices, ids [n, L], mask [n, L]) numpy arrays.

    Texts go longest first; each batch is padded to the next length of `ladder` and to a row count from a ladder
    of powers of two (up to batch_size), rounded up to a multiple of `n_dev` so it shards over the devices; filler
    rows are "<s></s>". A job of any size thus compiles a handful of shapes."""
    order = np.argsort([-len(t) for t in token_ids], kind="stable")
    batch_ladder = [b for b in (2 ** k for k in range(20)) if b < batch_size] + [batch_size]
    for start in range(0, len(token_ids), batch_size):
        idx = order[start:start + batch_size]
        rows = [token_ids[i] for i in idx]
        length = pad_length(max(len(r) for r in rows), ladder)
        n_rows = -(-pad_length(len(rows), batch_ladder) // n_dev) * n_dev
        ids = np.full((n_rows, length), pad_id, np.int32)
        mask = np.zeros((n_rows, length), np.int32)
        ids[len(rows):, :2] = (tokenizer.cls_token_id, tokenizer.eos_token_id)  # filler rows
        mask[len(rows):, :2] = 1
        for r, toks in enumerate(rows):
            ids[r, :len(toks)] = toks
            mask[r, :len(toks)] = 1
        yield idx, ids, mask


@functools.cache
def _jitted_apply(cfg: m3model.ModelConfig, mesh: Mesh):
    """One jitted forward per model config and mesh, shared by every BGEM3FlagModel (periodic evals do not
    recompile)."""
    model = m3model.BGEM3(cfg)

    def apply(variables, ids, mask):
        with shard_lib.tracing_context(mesh, _INFERENCE_RULES):
            return model.apply(variables, ids, mask, deterministic=True)

    return jax.jit(apply)


@functools.cache
def _jitted_packed(cfg: m3model.ModelConfig, mesh: Mesh):
    """The packed forward (BGEM3.packed), one per model config and mesh."""
    model = m3model.BGEM3(cfg)

    def apply(variables, ids, segment_ids, position_ids, starts):
        with shard_lib.tracing_context(mesh, _INFERENCE_RULES):
            return model.apply(variables, ids, segment_ids, position_ids, starts, method=m3model.BGEM3.packed)

    return jax.jit(apply)


class BGEM3FlagModel:
    """Drop-in for `FlagEmbedding.BGEM3FlagModel` (M3Embedder)."""

    def __init__(
        self,
        model_name_or_path: str | None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices=None,
        pooling_method: str | None = "cls",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        colbert_dim: int = -1,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: int | None = None,
        *,
        step: int | None = None,
        base_model: str | None = None,
        packing: bool | None = None,
        _loaded: tuple | None = None,
        **kwargs: Any,
    ):
        """FlagEmbedding's arguments; `model_name_or_path` may also be an m3jax run / checkpoint directory (its latest
        step, or `step`; `base_model` overrides its base_model/ directory). pooling_method / normalize_embeddings
        None take the model's own (an m3jax export's or run's). packing=False pads each text to the length ladder
        instead of packing texts into rows (m3jax.core.packing); None: M3JAX_PACKING=1 / 0 in the environment (the
        switch for `m3jax eval`, `mine`, `score` and the periodic eval of training), else on, except with cuDNN
        attention (GPU), whose packed layout has not yet been checked on a GPU (benchmarks/packing_device.py does)."""
        self.devices = _select_devices(devices)
        platform = self.devices[0].platform
        dtype = "bfloat16" if (use_fp16 or use_bf16) and platform != "cpu" else "float32"
        if _loaded is None:
            settings = loading.ModelSettings(sentence_pooling_method=pooling_method,
                                             normalize_embeddings=normalize_embeddings, colbert_dim=colbert_dim,
                                             dtype=dtype)
            cfg, params, source = loading.load_model(model_name_or_path, settings, step=step, base_model=base_model,
                                                     platform=platform)
            tokenizer = loading.load_tokenizer(source, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
        else:
            cfg, params, tokenizer = _loaded
            cfg = loading.with_settings(cfg, sentence_pooling_method=pooling_method or cfg.sentence_pooling_method,
                                        normalize_embeddings=cfg.normalize_embeddings if normalize_embeddings is None
                                        else normalize_embeddings, dtype=dtype,
                                        attention_implementation="auto", remat_policy="none", platform=platform)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format
        self.batch_size = batch_size
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
        self.return_dense, self.return_sparse = return_dense, return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        self.truncate_dim = truncate_dim
        if packing is None:
            env = os.environ.get("M3JAX_PACKING")
            packing = env != "0" if env is not None else cfg.attention_implementation != "cudnn"
        self.packing = packing
        self._unused_ids = {tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[t])
                            for t in ("cls_token", "eos_token", "pad_token", "unk_token")
                            if t in tokenizer.special_tokens_map}

        self.mesh = Mesh(np.array(self.devices), ("batch",))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.device_put(params, replicated)
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
        self._apply = _jitted_apply(cfg, self.mesh)
        self._apply_packed = _jitted_packed(cfg, self.mesh)

    @classmethod
    def from_params(cls, cfg: m3model.ModelConfig, params, tokenizer, **kwargs) -> BGEM3FlagModel:
        """Wrap in-memory params (e.g. the train state during a periodic eval)."""
        kwargs.setdefault("pooling_method", cfg.sentence_pooling_method)
        kwargs.setdefault("normalize_embeddings", cfg.normalize_embeddings)
        return cls(None, _loaded=(cfg, params, tokenizer), **kwargs)

    # ---- encoding ------------------------------------------------------------------------------------------

    def _batches(self, texts: list[str], max_length: int, batch_size: int, *, dense: bool = True,
                 sparse: bool = True, colbert: bool = True, truncate_dim: int | None = None) -> Iterator[tuple]:
        """Per batch, (text indices, token ids, dense [n, H], sparse weights, colbert vectors) of its n texts: dense
        (truncated) rows, per text its sparse weights [tokens] and colbert vectors [tokens - 1, D] (truncated);
        None for the outputs not asked for. Packed rows (m3jax.core.packing) or, with packing off, length-sorted
        batches padded to the ladder."""
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: expected at least 2 (room for <s> and </s>)")
        token_ids = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        ladder, n_dev = length_buckets(max_length), len(self.devices)
        put = lambda a: jax.device_put(a, self._batch_sharding)
        if not self.packing:
            for idx, ids, mask in bucketed_batches(token_ids, batch_size, ladder, n_dev, self.cfg.pad_token_id,
                                                   self.tokenizer):
                out = self._apply({"params": self.params}, put(ids), put(mask))
                toks = [token_ids[i] for i in idx]
                d = self._truncate(out["dense"], truncate_dim)[:len(idx)] if dense else None
                w = np.asarray(out["sparse_weights"], np.float32) if sparse else None
                c = self._truncate(out["colbert"], truncate_dim) if colbert else None
                yield (idx, toks, d, [w[r, :len(t)] for r, t in enumerate(toks)] if sparse else None,
                       [c[r, :len(t) - 1] for r, t in enumerate(toks)] if colbert else None)
            return
        for batch in packing.packed_batches(token_ids, batch_size, ladder, n_dev, self.cfg.pad_token_id):
            out = self._apply_packed({"params": self.params}, put(batch.input_ids), put(batch.segment_ids),
                                     put(batch.position_ids), put(batch.starts))
            idx = np.array([i for i, *_ in batch.texts], np.int64)
            toks = [token_ids[i] for i in idx]
            rows = np.array([r for _, r, _, _ in batch.texts], np.int64)
            slots = np.array([(batch.segment_ids[r, at] - 1) for _, r, at, _ in batch.texts], np.int64)
            d = self._truncate(np.asarray(out["dense"])[rows, slots], truncate_dim) if dense else None
            w = np.asarray(out["sparse_weights"], np.float32) if sparse else None
            c = self._truncate(out["colbert"], truncate_dim) if colbert else None
            yield (idx, toks, d, [w[r, at:at + n] for _, r, at, n in batch.texts] if sparse else None,
                   [c[r, at + 1:at + n] for _, r, at, n in batch.texts] if colbert else None)

    def _truncate(self, vecs, truncate_dim: int | None) -> np.ndarray:
        """Matryoshka truncation as FlagEmbedding does it: cut, then L2-normalise the cut vectors."""
        vecs = np.asarray(vecs, np.float32)
        if truncate_dim is None:
            return vecs
        # normalising the cut of a unit vector = normalising the raw cut
        return np.asarray(scores.truncate(vecs, truncate_dim, self.cfg.normalize_embeddings), np.float32)

    def _lexical(self, weights: np.ndarray, ids: Sequence[int]) -> dict[str, np.float32]:
        result: dict[str, np.float32] = {}
        for w, i in zip(weights, ids):
            if i not in self._unused_ids and w > 0:
                key = str(i)
                if w > result.get(key, 0):
                    result[key] = w
        return result

    def encode(self, sentences, batch_size: int | None = None, max_length: int | None = None,
               return_dense: bool | None = None, return_sparse: bool | None = None,
               return_colbert_vecs: bool | None = None, **kwargs) -> dict:
        return self._encode(sentences, batch_size or self.batch_size, max_length or self.passage_max_length,
                            self.return_dense if return_dense is None else return_dense,
                            self.return_sparse if return_sparse is None else return_sparse,
                            self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs,
                            truncate_dim=self.truncate_dim)

    def _encode(self, sentences, batch_size: int, max_length: int, return_dense: bool, return_sparse: bool,
                return_colbert_vecs: bool, truncate_dim: int | None) -> dict:
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        dense, lexical, colbert = [None] * len(texts), [None] * len(texts), [None] * len(texts)
        for idx, rows, d, w, c in self._batches(texts, max_length, batch_size, dense=return_dense,
                                                sparse=return_sparse, colbert=return_colbert_vecs,
                                                truncate_dim=truncate_dim):
            for r, (i, toks) in enumerate(zip(idx, rows)):
                if return_dense:
                    dense[i] = d[r]
                if return_sparse:
                    lexical[i] = self._lexical(w[r], toks)
                if return_colbert_vecs:
                    colbert[i] = c[r]
        width = truncate_dim or self.cfg.hidden_size
        result = {
            "dense_vecs": (np.stack(dense) if texts else np.zeros((0, width), np.float32)) if return_dense else None,
            "lexical_weights": lexical if return_sparse else None,
            "colbert_vecs": colbert if return_colbert_vecs else None,
        }
        if single:
            result = {k: (v[0] if v is not None else None) for k, v in result.items()}
        return result

    def encode_queries(self, queries, batch_size=None, max_length=None, return_dense=None, return_sparse=None,
                       return_colbert_vecs=None, **kwargs) -> dict:
        if self.query_instruction_for_retrieval is not None:
            fmt = lambda q: self.query_instruction_format.format(self.query_instruction_for_retrieval, q)
            queries = fmt(queries) if isinstance(queries, str) else [fmt(q) for q in queries]
        return self.encode(queries, batch_size, max_length or self.query_max_length, return_dense, return_sparse,
                           return_colbert_vecs)

    def encode_corpus(self, corpus, batch_size=None, max_length=None, return_dense=None, return_sparse=None,
                      return_colbert_vecs=None, **kwargs) -> dict:
        return self.encode(corpus, batch_size, max_length or self.passage_max_length, return_dense, return_sparse,
                           return_colbert_vecs)

    # ---- scoring helpers (FlagEmbedding semantics) ---------------------------------------------------------

    def convert_id_to_token(self, lexical_weights):
        items = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
        converted = [{self.tokenizer.decode([int(i)]): w for i, w in item.items()} for item in items]
        return converted[0] if len(converted) == 1 else converted

    @staticmethod
    def compute_lexical_matching_score(lexical_weights_1, lexical_weights_2):
        def single(a: dict, b: dict) -> float:
            return sum(w * b[t] for t, w in a.items() if t in b) if a else 0

        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return single(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return np.array([[single(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
        raise ValueError("The input format of lexical_weights is not correct: expected two dicts or two lists of "
                         "dicts.")

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> np.float32:
        """One query's colbert vectors [Lq, D] against one passage's [Lp, D] (m3jax.core.scores.colbert_scores)."""
        q = np.asarray(q_reps, np.float32)[None]
        p = np.asarray(p_reps, np.float32)[None, None]
        found = scores.colbert_scores(scores.TokenVecs(q, np.ones(q.shape[:2], bool)), scores.TokenVecs(p),
                                      grouped=True, precision=jax.lax.Precision.HIGHEST)
        return np.float32(found[0, 0])

    def compute_score(self, sentence_pairs, batch_size: int | None = None, max_query_length: int | None = None,
                      max_passage_length: int | None = None, weights_for_different_modes: list[float] | None = None,
                      **kwargs) -> dict:
        """Scores of (query, passage) pairs: dense, sparse, colbert, sparse+dense and colbert+sparse+dense.

        FlagEmbedding's compute_score, including its padding: it pads each chunk of `batch_size` passages to the
        chunk's longest, and those zero colbert vectors take part in the max (a similarity of 0). A query without
        tokens after the first scores nan for colbert (0 / 0), as there; a chunk whose passages all lack them (where
        FlagEmbedding raises) is padded to one zero vector.
        """
        batch_size = batch_size or self.batch_size
        max_query_length = max_query_length or self.query_max_length
        max_passage_length = max_passage_length or self.passage_max_length
        if isinstance(sentence_pairs, list) and len(sentence_pairs) == 0:
            return []
        single = isinstance(sentence_pairs[0], str)
        pairs = [sentence_pairs] if single else list(sentence_pairs)
        kw = dict(batch_size=batch_size, return_dense=True, return_sparse=True, return_colbert_vecs=True,
                  truncate_dim=None)  # FlagEmbedding's compute_score ignores truncate_dim
        q = self._encode([p[0] for p in pairs], max_length=max_query_length, **kw)
        p = self._encode([p[1] for p in pairs], max_length=max_passage_length, **kw)
        if weights_for_different_modes is None:
            weights_for_different_modes = [1.0, 1.0, 1.0]
        assert len(weights_for_different_modes) == 3
        w_dense, w_sparse, w_colbert = weights_for_different_modes
        heads = ("dense", "sparse", "colbert")
        found = {h: [] for h in heads}
        for start in range(0, len(pairs), batch_size):
            chunk = slice(start, start + batch_size)
            n = len(pairs[chunk])
            rows = round_up(n, 1)
            q_rep = pack_outputs({k: v[chunk] for k, v in q.items()}, heads, rows)
            longest = max(1, max(len(v) for v in p["colbert_vecs"][chunk]))
            p_rep = pack_outputs({k: v[chunk] for k, v in p.items()}, heads, rows, col_length=round_up(longest))
            # FlagEmbedding's padding: every passage of the chunk has `longest` vectors, zeros after its own.
            p_rep["colbert"] = p_rep["colbert"]._replace(
                mask=np.broadcast_to(np.arange(p_rep["colbert"].vecs.shape[1]) < longest, p_rep["colbert"].mask.shape))
            out = _pair_scores(q_rep, p_rep, vocab_size=self.cfg.vocab_size)
            for h in heads:
                found[h].extend(np.asarray(out[h], np.float32)[:n].tolist())
        out = {"colbert": found["colbert"], "sparse": found["sparse"], "dense": found["dense"]}
        out["sparse+dense"] = [(s * w_sparse + d * w_dense) / (w_sparse + w_dense)
                               for s, d in zip(found["sparse"], found["dense"])]
        out["colbert+sparse+dense"] = [(c * w_colbert + s * w_sparse + d * w_dense) / (w_colbert + w_sparse + w_dense)
                                       for c, s, d in zip(found["colbert"], found["sparse"], found["dense"])]
        return {k: v[0] for k, v in out.items()} if single else out


@functools.partial(jax.jit, static_argnames=("vocab_size", "heads"))
def _pair_scores(q: dict, p: dict, *, vocab_size: int, heads=("dense", "sparse", "colbert")) -> dict:
    """Each query against its own passage (the grouped similarities with one passage per query): {head: [n]}."""
    hi = jax.lax.Precision.HIGHEST
    own = lambda x: x[:, None]  # [n, ...] -> [n, 1, ...]
    out = {}
    if "dense" in heads:
        out["dense"] = scores.dense_scores(q["dense"], own(p["dense"]), grouped=True, precision=hi)[:, 0]
    if "sparse" in heads:
        lexical = scores.lexical_vectors(p["sparse"].weights, p["sparse"].ids, vocab_size)
        out["sparse"] = scores.sparse_scores(q["sparse"], own(lexical), grouped=True, precision=hi)[:, 0]
    if "colbert" in heads:
        out["colbert"] = scores.colbert_scores(q["colbert"], jax.tree.map(own, p["colbert"]), grouped=True,
                                               precision=hi)[:, 0]
    return out


def pair_scores(model: BGEM3FlagModel, queries: Sequence[str], passages: Sequence[str], query_of: Sequence[int], *,
                heads=("dense", "sparse", "colbert"), batch_size: int | None = None,
                query_max_length: int | None = None, passage_max_length: int | None = None) -> dict[str, np.ndarray]:
    """Scores of the pairs (queries[query_of[i]], passages[i]) for each head: {head: float32 [n]}.

    compute_score's similarities on each pair's own, unpadded vectors: the same numbers as FlagEmbedding's
    compute_score with batch_size=1 (with larger batches FlagEmbedding pads the colbert vectors of a chunk of
    passages with zero vectors that join the max, which changes a score only when every real similarity of a query
    token is negative), and the numbers the exact search (m3jax.evaluation.search) ranks by. Every query is encoded
    once; texts are encoded as given (apply any instruction first).
    """
    heads = tuple(h for h in ("dense", "sparse", "colbert") if h in heads)
    batch_size = batch_size or model.batch_size
    query_of = np.asarray(query_of, np.int64)
    out = {h: np.zeros(len(passages), np.float32) for h in heads}
    if len(passages) == 0:
        return out
    kw = dict(batch_size=batch_size, return_dense="dense" in heads, return_sparse="sparse" in heads,
              return_colbert_vecs="colbert" in heads, truncate_dim=None)
    q = model._encode(list(queries), max_length=query_max_length or model.query_max_length, **kw)
    p = model._encode(list(passages), max_length=passage_max_length or model.passage_max_length, **kw)
    q = {k: v for k, v in q.items() if v is not None}
    p = {k: v for k, v in p.items() if v is not None}
    for start in range(0, len(passages), batch_size):
        rows = query_of[start:start + batch_size]
        n = len(rows)
        q_chunk = {k: (v[rows] if isinstance(v, np.ndarray) else [v[i] for i in rows]) for k, v in q.items()}
        p_chunk = {k: v[start:start + n] for k, v in p.items()}
        size = round_up(n, 1)
        found = _pair_scores(pack_outputs(q_chunk, heads, size), pack_outputs(p_chunk, heads, size),
                             vocab_size=model.cfg.vocab_size, heads=heads)
        for h in heads:
            out[h][start:start + n] = np.asarray(found[h], np.float32)[:n]
    return out


def pack_outputs(enc: dict, heads, rows: int, *, lex_width: int | None = None,
                 col_length: int | None = None) -> dict:
    """`encode` outputs of n texts -> the head representations of m3jax.core.scores, as numpy arrays with `rows` rows
    (rows >= n; the extra rows are empty): dense [rows, H]; sparse SparseRows(ids, weights) [rows, T] (the
    lexical_weights dicts: unique ids, padded with id 0 and weight 0); colbert TokenVecs(vecs [rows, L, D],
    mask [rows, L]). T and L default to a round_up of the longest, so few shapes compile."""
    n = len(next(v for v in enc.values() if v is not None))
    out: dict[str, Any] = {}
    if "dense" in heads:
        dense = np.zeros((rows, np.shape(enc["dense_vecs"])[1]), np.float32)
        dense[:n] = enc["dense_vecs"]
        out["dense"] = dense
    if "sparse" in heads:
        lexical = list(enc["lexical_weights"])
        width = lex_width or round_up(max([1] + [len(x) for x in lexical]))
        ids, weights = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.float32)
        for r, item in enumerate(lexical):
            if item:
                ids[r, :len(item)] = np.fromiter((int(t) for t in item), np.int64, len(item))
                weights[r, :len(item)] = np.fromiter(item.values(), np.float32, len(item))
        out["sparse"] = scores.SparseRows(ids, weights)
    if "colbert" in heads:
        vecs_list = list(enc["colbert_vecs"])
        length = col_length or round_up(max([1] + [len(v) for v in vecs_list]))
        vecs = np.zeros((rows, length, vecs_list[0].shape[-1]), np.float32)
        mask = np.zeros((rows, length), bool)
        for r, v in enumerate(vecs_list):
            vecs[r, :len(v)] = v
            mask[r, :len(v)] = True
        out["colbert"] = scores.TokenVecs(vecs, mask)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cross-encoder reranker


@functools.cache
def _jitted_rerank(cfg: m3model.ModelConfig):
    return jax.jit(m3model.Reranker(cfg).apply)


def _with_instruction(fmt: str, instruction: str, text: str) -> str:
    return fmt.replace("\\n", "\n").format(instruction, text)  # FlagEmbedding turns a typed "\\n" into a newline


class FlagReranker:
    """Drop-in for FlagEmbedding's `FlagReranker` (encoder-only cross-encoder such as bge-reranker-v2-m3).

    `compute_score(pairs)` tokenises like FlagEmbedding: the query alone truncated to `query_max_length` tokens
    (default 3/4 of max_length), the passage to `max_length`, then the pair `<s> q </s></s> p </s>` with only the
    passage cut so the pair fits `max_length` (when the query alone leaves no room, the pair stays whole, as in
    transformers). Pairs are length-sorted, padded to a ladder of lengths and sharded over the devices; the score
    is the one logit (sigmoid of it with normalize=True). On CPU the model runs in float32 whatever use_fp16 says.
    """

    def __init__(self, model_name_or_path: str, use_fp16: bool = False, query_instruction_for_rerank: str | None = None,
                 query_instruction_format: str = "{}{}", passage_instruction_for_rerank: str | None = None,
                 passage_instruction_format: str = "{}{}", trust_remote_code: bool = False,
                 cache_dir: str | None = None, devices=None, batch_size: int = 128,
                 query_max_length: int | None = None, max_length: int = 512, normalize: bool = False,
                 use_bf16: bool = False, **kwargs: Any):
        from transformers import AutoTokenizer

        self.devices = _select_devices(devices)
        platform = self.devices[0].platform
        dtype = "bfloat16" if (use_fp16 or use_bf16) and platform != "cpu" else "float32"
        self.cfg, params = loading.load_reranker(model_name_or_path, dtype=dtype, platform=platform)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code,
                                                       cache_dir=cache_dir)
        self.query_instruction_for_rerank = query_instruction_for_rerank
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_rerank = passage_instruction_for_rerank
        self.passage_instruction_format = passage_instruction_format
        self.batch_size, self.query_max_length, self.max_length = batch_size, query_max_length, max_length
        self.normalize = normalize
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
        self._apply = _jitted_rerank(self.cfg)

    def pair_token_ids(self, sentence_pairs, query_max_length: int, max_length: int) -> list[list[int]]:
        """The input ids FlagEmbedding builds for each (query, passage) pair (instructions already applied)."""
        tok = self.tokenizer
        queries = tok([q for q, _ in sentence_pairs], add_special_tokens=False, max_length=query_max_length,
                      truncation=True)["input_ids"]
        passages = tok([p for _, p in sentence_pairs], add_special_tokens=False, max_length=max_length,
                       truncation=True)["input_ids"]
        # XLM-RoBERTa's pair template, <s> q </s></s> p </s>, written out: transformers 5's tokenizers no longer
        # have build_inputs_with_special_tokens (the reranker is an XLM-RoBERTa, checked when it is loaded)
        special = 4
        out = []
        for q, p in zip(queries, passages):
            excess = len(q) + len(p) + special - max_length
            if 0 < excess < len(p):  # transformers' only_second: cut the passage if that is enough, else nothing
                p = p[:len(p) - excess]
            out.append([tok.cls_token_id, *q, tok.sep_token_id, tok.sep_token_id, *p, tok.sep_token_id])
        return out

    def _detailed(self, pairs):
        out = []
        for q, p in pairs:
            if self.query_instruction_for_rerank is not None:
                q = _with_instruction(self.query_instruction_format, self.query_instruction_for_rerank, q)
            if self.passage_instruction_for_rerank is not None:
                p = _with_instruction(self.passage_instruction_format, self.passage_instruction_for_rerank, p)
            out.append((q, p))
        return out

    def compute_score(self, sentence_pairs, batch_size: int | None = None, query_max_length: int | None = None,
                      max_length: int | None = None, normalize: bool | None = None, **kwargs) -> list[float]:
        """One score per (query, passage) pair, in input order (a list, also for a single pair)."""
        batch_size = batch_size or self.batch_size
        max_length = max_length or self.max_length
        if query_max_length is None:
            query_max_length = self.query_max_length if self.query_max_length is not None else max_length * 3 // 4
        normalize = self.normalize if normalize is None else normalize
        if isinstance(sentence_pairs[0], str):
            sentence_pairs = [sentence_pairs]
        pairs = self._detailed(sentence_pairs)
        token_ids = self.pair_token_ids(pairs, query_max_length, max_length)
        longest = max(len(t) for t in token_ids)
        if longest > self.cfg.max_position_embeddings - self.cfg.pad_token_id - 1:
            raise ValueError(f"a (query, passage) pair has {longest} tokens, more than the model's positions; the "
                             f"query alone fills max_length={max_length} (lower query_max_length)")
        ladder = length_buckets(max(max_length, longest))
        found = np.zeros(len(pairs), np.float32)
        for idx, ids, mask in bucketed_batches(token_ids, batch_size, ladder, len(self.devices),
                                               self.cfg.pad_token_id, self.tokenizer):
            logits = self._apply({"params": self.params}, jax.device_put(ids, self._batch_sharding),
                                 jax.device_put(mask, self._batch_sharding))
            found[idx] = np.asarray(logits, np.float32)[:len(idx)]
        if normalize:
            found = 1.0 / (1.0 + np.exp(-found.astype(np.float64)))
        return [float(x) for x in found]
