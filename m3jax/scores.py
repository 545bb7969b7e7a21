"""Pooling and the three M3 similarity functions, as pure jnp functions (no temperature here; the loss divides).

Shapes: B queries, P passages, L tokens, H hidden, D colbert dim, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# torch.nn.functional.normalize's eps: x / max(||x||, eps)
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, eps), with max taken on the squared norm: the same values, and a zero (not NaN) gradient
    for the all-zero colbert vectors of padded tokens (sqrt has an infinite derivative at 0)."""
    sumsq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(jnp.maximum(sumsq, _NORM_EPS**2))).astype(x.dtype)


def pool(hidden: jax.Array, mask: jax.Array, method: str) -> jax.Array:
    """Sentence embedding [B, H] from the last hidden state [B, L, H]: cls token or masked mean."""
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":
        return jnp.sum(hidden * mask[..., None], axis=1) / jnp.sum(mask, axis=1, keepdims=True)
    raise ValueError(f"sentence_pooling_method={method!r}: expected 'cls' or 'mean'")


def sparse_embedding(token_weights: jax.Array, input_ids: jax.Array, vocab_size: int,
                     unused_token_ids: tuple[int, ...]) -> jax.Array:
    """Lexical vector [B, V]: per token id, the max weight over its occurrences; special ids zeroed.

    A (batch, vocab) scatter-max: the same numbers as FlagEmbedding's (batch, seq, vocab) scatter + max over seq,
    with memory (and gradient memory) B*V instead of B*L*V.
    """
    b = token_weights.shape[0]
    rows = jnp.arange(b)[:, None]
    lexical = jnp.zeros((b, vocab_size), token_weights.dtype).at[rows, input_ids].max(token_weights)
    return lexical.at[:, jnp.asarray(unused_token_ids)].set(0.0)


def dense_scores(q: jax.Array, p: jax.Array) -> jax.Array:
    """[B, H] x [P, H] -> [B, P] inner products."""
    return jnp.einsum("bh,ph->bp", q, p, preferred_element_type=jnp.float32)


def sparse_scores(q_lexical: jax.Array, p_lexical: jax.Array) -> jax.Array:
    """[B, V] x [P, V] -> [B, P]: sum over shared token ids of w_q(id) * w_p(id)."""
    return jnp.einsum("bv,pv->bp", q_lexical, p_lexical, preferred_element_type=jnp.float32)


def colbert_scores(q_vecs: jax.Array, p_vecs: jax.Array, q_mask: jax.Array,
                   block_bytes: int = 256 * 2**20) -> jax.Array:
    """Late interaction [B, Lq-1, D] x [P, Lp-1, D] -> [B, P].

    sum_i max_j <q_i, p_j> / (number of non-pad query tokens after cls). Padded passage tokens are zero vectors and
    take part in the max, as in FlagEmbedding (they only matter when every real token similarity is negative).
    The [B, Lq, P, Lp] token scores grow with the square of the batch (3 x 32 GiB at 16 x 8 passages of 8192
    tokens), so passages go in blocks of at most `block_bytes` of scores, each recomputed in the backward pass.
    """
    b, lq, d = q_vecs.shape
    p, lp, _ = p_vecs.shape
    per_passage = b * lq * lp * 4
    block = max(c for c in range(1, min(p, max(1, block_bytes // per_passage)) + 1) if p % c == 0)

    @jax.checkpoint
    def one_block(p_block):  # [c, Lp, D] -> [B, c]
        token = jnp.einsum("bid,pjd->bipj", q_vecs, p_block, preferred_element_type=jnp.float32)
        return jnp.sum(jnp.max(token, axis=-1), axis=1)

    if block == p:
        summed = one_block(p_vecs)
    else:
        summed = jax.lax.map(one_block, p_vecs.reshape(p // block, block, lp, d))  # [P/c, B, c]
        summed = jnp.moveaxis(summed, 0, 1).reshape(b, p)
    return summed / jnp.sum(q_mask[:, 1:].astype(jnp.float32), axis=-1, keepdims=True)
