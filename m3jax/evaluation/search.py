"""Exact top-k search on the model's devices (`ExactSearch`, `search`): what `m3jax eval` and `m3jax mine` rank with.

Corpus passages are encoded a few batches at a time and every block of queries (the blocks spread over the devices)
is scored against every block of passages with one jitted function (the similarities of m3jax.core.scores), keeping a
running top-k per query (in eval k = max(100, the largest metric cutoff)) with `jax.lax.top_k`:
  dense    q . p
  sparse   lexical matching: each passage block becomes a dense [block, vocab] matrix of token weights on the device
           (max weight per token id, as in the lexical_weights dicts), read at the query's token ids
  colbert  sum over query tokens of the max over passage tokens of <q_i, p_j>, divided by the query's token count
           (FlagEmbedding's colbert_score on the unpadded vectors; padded passage tokens are masked out)
  dense+sparse, all, dense@K, colbert@K   their weighted means and Matryoshka cuts (m3jax.evaluation.options)
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core import scores
from m3jax.core.padding import round_up
from m3jax.evaluation.options import (
    DEFAULT_WEIGHTS,
    MIN_TOP_K,
    MODES,
    check_weights,
    combine,
    heads_of,
    mode_parts,
    parse_modes,
)
from m3jax.model.inference import pack_outputs

BLOCK_BYTES = 256 * 2**20  # budget for the largest intermediate of one (query block, passage block) step


@functools.partial(jax.jit, static_argnames=("modes", "k", "vocab_size", "normalize"))
def _search_block(best_scores, best_index, q, p, p_index, p_valid, weights, *, modes, k, vocab_size,
                  normalize=True):
    """Score one query block against one passage block and merge into the running top-k.

    q / p: head representations (m3jax.model.inference.pack_outputs); best_scores / best_index [M, Qb, k]; p_index [Pb]
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
            {"block_bytes": BLOCK_BYTES} if head == "colbert" else {}))

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


def model_vocab_size(model) -> int:
    """The vocabulary size of m3jax's model (its config) or FlagEmbedding's (its tokenizer)."""
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
        w = check_weights(weights, self.modes)
        self.parts = heads_of(self.modes)
        self.n_q, self.k = len(query_texts), int(top_k)
        if self.n_q == 0 or self.k < 1:
            raise ValueError("search needs at least one query and top_k >= 1")
        self.batch_size, self.passage_max_len = batch_size, passage_max_len
        self.need = dict(return_dense="dense" in self.parts, return_sparse="sparse" in self.parts,
                         return_colbert_vecs="colbert" in self.parts)
        self.devices = _devices_of(model)
        self.vocab_size = model_vocab_size(model)
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
        while q_block * 2 * per_query <= BLOCK_BYTES and q_block < per_device:
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
