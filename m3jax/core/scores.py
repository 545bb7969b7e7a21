"""Pooling and the three M3 similarities: the one place scores are computed (loss, eval search, compute_score).

Every similarity has the same signature, `f(q, p, *, grouped=False, precision=None)`:
  flat     q for B queries, p for P passages      -> [B, P]  (every query against every passage)
  grouped  q for B queries, p for B x G passages  -> [B, G]  (each query against its own G passages)
with the representation of each head (B queries / P passages; L tokens, H hidden, D colbert dim, V vocabulary):
  dense    [N, H] sentence embeddings                               score = <q, p>
  sparse   [N, V] lexical vectors (`lexical_vectors`), or for the query side `SparseRows` (unique token ids and
           their weights, e.g. packed lexical_weights dicts)        score = sum over shared ids of w_q(id) * w_p(id)
  colbert  `TokenVecs(vecs [N, L, D], mask [N, L] or None)`         score = sum_i max_j <q_i, p_j> / #query tokens
No temperature here; the loss divides. docs/flagembedding_semantics.md, "Similarities", states where FlagEmbedding
pads and where it does not. `SIMILARITIES` maps head name -> function, so callers treat heads uniformly.

Colbert masks: the query mask marks its real tokens (the mean is over them); a passage mask excludes padded tokens
from the max. A passage mask of None lets padded tokens (zero vectors) take part in the max, as FlagEmbedding's
training loss does (they only matter when every real token similarity is negative).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

HEADS = ("dense", "sparse", "colbert")  # the M3 heads, in the order the loss and the ensemble sum them

# torch.nn.functional.normalize's eps: x / max(||x||, eps)
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, eps), with max taken on the squared norm: the same values, and a zero (not NaN) gradient
    for the all-zero colbert vectors of padded tokens (sqrt has an infinite derivative at 0)."""
    sumsq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(jnp.maximum(sumsq, _NORM_EPS**2))).astype(x.dtype)


def truncate(x, dim: int, normalize: bool = True):
    """Matryoshka: the first `dim` components of each vector, L2-normalised again when `normalize` (FlagEmbedding's
    truncate_dim: cut, then normalise). x: [..., D] or TokenVecs (each token vector cut; the mask kept). A `dim` of
    D or more returns x itself, untouched."""
    if isinstance(x, TokenVecs):
        return x._replace(vecs=truncate(x.vecs, dim, normalize))
    if dim >= x.shape[-1]:
        return x
    cut = x[..., :dim]
    return l2_normalize(cut) if normalize else cut


def pool(hidden: jax.Array, mask: jax.Array, method: str) -> jax.Array:
    """Sentence embedding [B, H] from the last hidden state [B, L, H]: cls token or masked mean."""
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":
        return jnp.sum(hidden * mask[..., None], axis=1) / jnp.sum(mask, axis=1, keepdims=True)
    raise ValueError(f"sentence_pooling_method={method!r}: expected 'cls' or 'mean'")


def lexical_vectors(token_weights: jax.Array, input_ids: jax.Array, vocab_size: int,
                    unused_token_ids: tuple[int, ...] = ()) -> jax.Array:
    """Lexical vectors [N, V]: per token id, the max weight over its occurrences; `unused_token_ids` zeroed.

    A (batch, vocab) scatter-max: the same numbers as FlagEmbedding's (batch, seq, vocab) scatter + max over seq,
    with memory N*V instead of N*L*V. The gradient is JAX's own rule for the scatter-max, bit for bit, computed
    from a per-row sort and a gather (`_lexical_bwd`) instead of autodiff's extra (batch, vocab) buffers.
    """
    return _lexical(token_weights, input_ids, vocab_size, tuple(int(t) for t in unused_token_ids))


def _lexical_fwd_values(token_weights, input_ids, vocab_size, unused_token_ids):
    rows = jnp.arange(token_weights.shape[0])[:, None]
    lexical = jnp.zeros((token_weights.shape[0], vocab_size), token_weights.dtype).at[rows, input_ids].max(
        token_weights)
    if unused_token_ids:
        lexical = lexical.at[:, jnp.asarray(unused_token_ids)].set(0.0)
    return lexical


_lexical = jax.custom_vjp(_lexical_fwd_values, nondiff_argnums=(2, 3))


def _lexical_fwd(token_weights, input_ids, vocab_size, unused_token_ids):
    return _lexical_fwd_values(token_weights, input_ids, vocab_size, unused_token_ids), (token_weights, input_ids)


def _lexical_bwd(vocab_size, unused_token_ids, res, g):
    """JAX's scatter-max gradient (jax/_src/lax/slicing.py, _scatter_extremal_jvp, transposed) without (N, V)
    buffers: token l of row n gets g[n, id] / k when its weight is the row's max for its id (the max over the
    id's weights and the zero operand), else 0, where k counts the id's tokens at that max, plus one when the max
    is the zero operand's (ties share the gradient evenly); unused ids get 0. The max and the tie count come from
    each row sorted by (id, weight): an id's tokens are then contiguous, its max weight last (O(N*L) memory)."""
    w, ids = res
    n, length = w.shape
    pos = jnp.broadcast_to(jnp.arange(length), (n, length))
    ids_s, w_s, pos_s = jax.lax.sort((ids, w, pos), dimension=1, num_keys=2)
    last = jnp.concatenate([ids_s[:, 1:] != ids_s[:, :-1], jnp.ones((n, 1), bool)], axis=1)
    first = jnp.concatenate([jnp.ones((n, 1), bool), ids_s[:, 1:] != ids_s[:, :-1]], axis=1)
    end = jax.lax.cummin(jnp.where(last, pos, length), axis=1, reverse=True)  # last index of the token's id
    start = jax.lax.cummax(jnp.where(first, pos, 0), axis=1)  # its first index
    top = jnp.maximum(jnp.take_along_axis(w_s, end, axis=1), 0).astype(w.dtype)  # the id's lexical weight
    wins = w_s == top
    tied = jnp.cumsum(wins.astype(jnp.int32), axis=1)
    before = jnp.where(start > 0, jnp.take_along_axis(tied, jnp.maximum(start - 1, 0), axis=1), 0)
    ties = (jnp.take_along_axis(tied, end, axis=1) - before).astype(w.dtype)
    coef_s = jnp.where(wins, jnp.where(top == 0, 1.0 / (ties + 1), 1.0 / ties), jnp.zeros((), w.dtype))
    coef = jnp.zeros_like(w).at[jnp.arange(n)[:, None], pos_s].set(coef_s, unique_indices=True)
    gathered = jnp.take_along_axis(g, ids, axis=-1)
    if unused_token_ids:
        gathered = jnp.where(jnp.isin(ids, jnp.asarray(unused_token_ids)), jnp.zeros((), g.dtype), gathered)
    return gathered * coef, None


_lexical.defvjp(_lexical_fwd, _lexical_bwd)


class SparseRows(NamedTuple):
    """Sparse lexical vectors as (unique token ids, weights) per row, padded with weight 0: [N, T] each."""
    ids: jax.Array
    weights: jax.Array


class SparseTokens(NamedTuple):
    """Token weights [..., L] and their ids [..., L], from which `lexical_vectors` builds the lexical vectors."""
    weights: jax.Array
    ids: jax.Array


class TokenVecs(NamedTuple):
    """Colbert token vectors [N, L, D] and which of them are real tokens [N, L] (None: all of them)."""
    vecs: jax.Array
    mask: jax.Array | None = None


def _passages(p, grouped: bool):
    """Flat [P, ...] passages -> [1, P, ...] shared by every query; grouped [B, G, ...] stays."""
    return p if grouped else jax.tree.map(lambda x: x[None], p)


def dense_scores(q: jax.Array, p: jax.Array, *, grouped: bool = False, precision=None) -> jax.Array:
    """[B, H] x ([P, H] | [B, G, H]) -> inner products [B, P] | [B, G]."""
    spec = "bh,bgh->bg" if grouped else "bh,ph->bp"
    return jnp.einsum(spec, q, p, precision=precision, preferred_element_type=jnp.float32)


def sparse_scores(q: jax.Array | SparseRows, p: jax.Array, *, grouped: bool = False, precision=None) -> jax.Array:
    """Lexical matching: sum over shared token ids of w_q(id) * w_p(id).

    q: lexical vectors [B, V], or SparseRows (ids unique per row) -- then only the query's T token ids are read
    from the passages' vectors (B x P x T products instead of B x P x V); p: lexical vectors [P, V] | [B, G, V].
    """
    if isinstance(q, SparseRows):
        if grouped:  # [B, G, T]: each query's ids in its own passages
            gathered = jnp.take_along_axis(p, q.ids[:, None, :], axis=-1)
            return jnp.einsum("bt,bgt->bg", q.weights, gathered, precision=precision,
                              preferred_element_type=jnp.float32)
        gathered = p[:, q.ids]  # [P, B, T]
        return jnp.einsum("bt,pbt->bp", q.weights, gathered, precision=precision, preferred_element_type=jnp.float32)
    spec = "bv,bgv->bg" if grouped else "bv,pv->bp"
    return jnp.einsum(spec, q, p, precision=precision, preferred_element_type=jnp.float32)


def colbert_scores(q: TokenVecs, p: TokenVecs, *, grouped: bool = False, precision=None,
                   block_bytes: int = 256 * 2**20) -> jax.Array:
    """Late interaction: sum over real query tokens of the max over passage tokens of <q_i, p_j>, divided by the
    number of real query tokens (FlagEmbedding's colbert score; a query without tokens gives 0/0 = nan, as there).

    q: TokenVecs [B, Lq, D] with mask [B, Lq]; p: TokenVecs [P, Lp, D] | [B, G, Lp, D], mask of the same leading
    shape or None (padded tokens join the max as zero vectors). The [B, Lq, P, Lp] token scores grow with the
    square of the batch (3 x 32 GiB at 16 x 8 passages of 8192 tokens), so flat passages go in blocks of at most
    `block_bytes` of scores, each recomputed in the backward pass.
    """
    q_mask = q.mask.astype(jnp.float32)
    count = jnp.sum(q_mask, axis=-1)

    def summed(pv, pm, grouped_block: bool):  # -> [B, c] sums over query tokens of the max over passage tokens
        spec = "bid,bgjd->bigj" if grouped_block else "bid,pjd->bipj"
        token = jnp.einsum(spec, q.vecs, pv, precision=precision, preferred_element_type=jnp.float32)
        if pm is not None:
            keep = pm[:, None] if grouped_block else pm[None, None]  # [B|1, 1, c, Lp]
            token = jnp.where(keep, token, -jnp.inf)
        best = jnp.max(token, axis=-1)  # [B, Lq, c]
        return jnp.sum(jnp.where(q_mask[:, :, None] > 0, best, 0.0), axis=1)

    if grouped:
        return summed(p.vecs, p.mask, True) / count[:, None]
    b, lq, _ = q.vecs.shape
    n, lp, d = p.vecs.shape
    block = max(c for c in range(1, min(n, max(1, block_bytes // (b * lq * lp * 4))) + 1) if n % c == 0)
    one_block = jax.checkpoint(lambda pv, pm: summed(pv, pm, False))
    if block == n:
        out = one_block(p.vecs, p.mask)
    else:
        vecs = p.vecs.reshape(n // block, block, lp, d)
        masks = None if p.mask is None else p.mask.reshape(n // block, block, lp)
        out = jax.lax.map(lambda args: one_block(*args), (vecs, masks))  # [P/c, B, c]
        out = jnp.moveaxis(out, 0, 1).reshape(b, n)
    return out / count[:, None]


def sparse_token_scores(q: SparseTokens, p: SparseTokens, vocab_size: int, unused_token_ids: tuple[int, ...] = (),
                        *, grouped: bool = False, precision=None) -> jax.Array:
    """`sparse_scores` of the lexical vectors of token weights (q [B, L], p [P, L] | [B, G, L]), with the same
    values and gradients as autodiff of `sparse_scores(lexical_vectors(q), lexical_vectors(p))`, bit for bit, in
    less memory: the residuals are the token weights and ids (the backward pass builds the (batch, vocab)
    vectors again, or XLA keeps the forward pass's: the same values), and the backward pass takes the queries'
    gradient first, so the passages' vectors can go before their gradient [P, V] is formed. Compiled for a TPU
    v4 chip at 1,024 queries x 8 passages of 256 tokens, the step's temporaries drop from 27.4 to 23.2 GiB."""
    return _sparse_token_scores(q, p, vocab_size, tuple(int(t) for t in unused_token_ids), grouped, precision)


def _lexical_of(t: SparseTokens, vocab_size: int, unused: tuple[int, ...]) -> jax.Array:
    length = t.weights.shape[-1]
    rows = lexical_vectors(t.weights.reshape(-1, length), t.ids.reshape(-1, length), vocab_size, unused)
    return rows.reshape(t.weights.shape[:-1] + (vocab_size,))


def _sparse_token_values(q, p, vocab_size, unused, grouped, precision):
    return sparse_scores(_lexical_of(q, vocab_size, unused), _lexical_of(p, vocab_size, unused), grouped=grouped,
                         precision=precision)


_sparse_token_scores = jax.custom_vjp(_sparse_token_values, nondiff_argnums=(2, 3, 4, 5))


def _sparse_token_fwd(q, p, vocab_size, unused, grouped, precision):
    return _sparse_token_values(q, p, vocab_size, unused, grouped, precision), (q, p)


def _sparse_token_bwd(vocab_size, unused, grouped, precision, res, ct):
    """The transposes autodiff would take (linear_transpose of the same einsum), in a fixed order: the queries'
    vector gradient from the passages' vectors, then (after an optimization barrier, so the passages' vectors can
    be freed first) the passages' from the queries'; each pulled back to token weights by `_lexical_bwd`."""
    q, p = res
    q_lex, p_lex = _lexical_of(q, vocab_size, unused), _lexical_of(p, vocab_size, unused)
    score = lambda a, b: sparse_scores(a, b, grouped=grouped, precision=precision)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    (d_q_lex,) = jax.linear_transpose(lambda a: score(a, p_lex), spec(q_lex))(ct)
    d_q = _lexical_bwd(vocab_size, unused, (q.weights, q.ids), d_q_lex)[0]
    d_q, q_lex, ct = jax.lax.optimization_barrier((d_q, q_lex, ct))
    (d_p_lex,) = jax.linear_transpose(lambda b: score(q_lex, b), spec(p_lex))(ct)
    length = p.weights.shape[-1]
    d_p = _lexical_bwd(vocab_size, unused, (p.weights.reshape(-1, length), p.ids.reshape(-1, length)),
                       d_p_lex.reshape(-1, vocab_size))[0].reshape(p.weights.shape)
    return SparseTokens(d_q, None), SparseTokens(d_p, None)


_sparse_token_scores.defvjp(_sparse_token_fwd, _sparse_token_bwd)


SIMILARITIES = {"dense": dense_scores, "sparse": sparse_scores, "colbert": colbert_scores}
