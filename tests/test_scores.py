"""scores.lexical_vectors' hand-written gradient (a gather, no (batch, vocab) bookkeeping) against JAX's autodiff of
the same scatter-max: equal bit for bit, ties and zeros included; and its compiled memory at bge-m3's vocabulary."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.core import scores

UNUSED = (0, 2, 1, 3)


def _autodiff_lexical(w, ids, vocab, unused):
    """The scatter-max as it was before the custom gradient: JAX differentiates it itself."""
    rows = jnp.arange(w.shape[0])[:, None]
    lexical = jnp.zeros((w.shape[0], vocab), w.dtype).at[rows, ids].max(w)
    if unused:
        lexical = lexical.at[:, jnp.asarray(unused)].set(0.0)
    return lexical


def _inputs(seed: int, n: int, length: int, vocab: int, dtype):
    """Token weights with many repeated ids per row, ties among them (weights drawn from a few values), zeros
    (relu outputs), negative weights (below the zero operand), and the unused ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, length)).astype(np.int32)
    ids[:, ::3] = rng.integers(0, 8, size=ids[:, ::3].shape)  # repeats, and the unused ids 0..3
    w = rng.choice(np.array([0.0, 0.0, 0.25, 0.5, 0.5, 1.5, -0.5], np.float32), size=(n, length))
    w = np.where(rng.random((n, length)) < 0.3, rng.random((n, length)).astype(np.float32), w)
    ids[0] = 5  # one row: a single id everywhere
    w[1] = 0.0  # one row of zero weights (every token ties with the zero operand)
    w[2] = -1.0  # one row of negative weights (the zero operand wins everywhere)
    return jnp.asarray(w, dtype), jnp.asarray(ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("unused", [UNUSED, ()])
def test_lexical_vectors_gradient_equals_autodiff_of_the_scatter_max(dtype, unused, seed):
    vocab = 40
    w, ids = _inputs(seed, 7, 24, vocab, dtype)
    cot = jnp.asarray(np.random.default_rng(100 + seed).normal(size=(7, vocab)), dtype)
    mine, vjp_mine = jax.vjp(lambda x: scores.lexical_vectors(x, ids, vocab, unused), w)
    ref, vjp_ref = jax.vjp(lambda x: _autodiff_lexical(x, ids, vocab, unused), w)
    np.testing.assert_array_equal(np.asarray(mine, np.float32), np.asarray(ref, np.float32))
    (g_mine,), (g_ref,) = vjp_mine(cot), vjp_ref(cot)
    assert g_mine.dtype == g_ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g_mine, np.float32), np.asarray(g_ref, np.float32))

    # ... and through a loss, under jit (sparse scores and a softmax, as the unified loss uses them)
    def loss(x, lex):
        v = lex(x, ids, vocab, unused)
        return jnp.sum(jax.nn.log_softmax(scores.sparse_scores(v[:3], v) / 0.02, axis=-1)[:, 0])

    g1 = jax.jit(jax.grad(lambda x: loss(x, scores.lexical_vectors)))(w)
    g2 = jax.jit(jax.grad(lambda x: loss(x, _autodiff_lexical)))(w)
    np.testing.assert_array_equal(np.asarray(g1, np.float32), np.asarray(g2, np.float32))


def test_lexical_vectors_gradient_needs_no_vocab_sized_temporaries():
    """At bge-m3's vocabulary the gradient of the lexical vectors compiles to one (batch, vocab) cotangent (the
    input, here an argument) and nothing else of that size: temp under 5% of one (batch, vocab) fp32 tensor; JAX's
    autodiff of the scatter-max needs several (batch, vocab) buffers (counts and masks)."""
    n, length, vocab = 64, 256, 250002
    sds = jax.ShapeDtypeStruct
    args = (sds((n, length), jnp.float32), sds((n, length), jnp.int32), sds((n, vocab), jnp.float32))

    def temp(lex):
        def grad(w, ids, cot):
            return jax.vjp(lambda x: lex(x, ids, vocab, UNUSED), w)[1](cot)[0]
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    nv = n * vocab * 4
    mine, autodiff = temp(scores.lexical_vectors), temp(_autodiff_lexical)
    print(f"lexical-vector gradient temp: {mine / 2**20:.1f} MiB (autodiff {autodiff / 2**20:.1f} MiB); "
          f"one (batch, vocab) fp32 tensor {nv / 2**20:.1f} MiB")
    assert mine < 0.05 * nv
    assert autodiff > nv


@pytest.mark.parametrize("grouped", [False, True])
def test_sparse_token_scores_equal_autodiff_of_the_lexical_vectors_inner_products(grouped):
    """scores.sparse_token_scores (what the loss's sparse head uses): the same scores and token-weight gradients as
    autodiff of sparse_scores over the autodiffed scatter-max, bit for bit -- flat and grouped, and vmapped over
    device blocks as the loss does."""
    vocab, b, g, lq, lp = 40, 4, 3, 10, 24
    qw, q_ids = _inputs(0, b, lq, vocab, jnp.float32)
    pw, p_ids = _inputs(1, b * g, lp, vocab, jnp.float32)
    if grouped:
        pw, p_ids = pw.reshape(b, g, lp), p_ids.reshape(b, g, lp)
    cot = jnp.asarray(np.random.default_rng(7).normal(size=(b, g if grouped else b * g)), jnp.float32)

    def mine(qw, pw):
        return scores.sparse_token_scores(scores.SparseTokens(qw, q_ids), scores.SparseTokens(pw, p_ids), vocab,
                                          UNUSED, grouped=grouped)

    def ref(qw, pw):
        lex = lambda w, i: _autodiff_lexical(w.reshape(-1, w.shape[-1]), i.reshape(-1, i.shape[-1]), vocab,
                                             UNUSED).reshape(w.shape[:-1] + (vocab,))
        return scores.sparse_scores(lex(qw, q_ids), lex(pw, p_ids), grouped=grouped)

    for fn in (lambda f: f, jax.jit):
        s1, vjp1 = jax.vjp(fn(mine), qw, pw)
        s2, vjp2 = jax.vjp(fn(ref), qw, pw)
        np.testing.assert_array_equal(s1, s2)
        for a, c in zip(vjp1(cot), vjp2(cot)):
            np.testing.assert_array_equal(a, c)
    if not grouped:  # two device blocks, as losses.m3_loss vmaps the in-batch scores
        blocks = lambda x: x.reshape((2, x.shape[0] // 2) + x.shape[1:])
        mine_b = jax.vmap(lambda qw, pw, qi, pi: scores.sparse_token_scores(
            scores.SparseTokens(qw, qi), scores.SparseTokens(pw, pi), vocab, UNUSED))
        ref_b = jax.vmap(lambda qw, pw, qi, pi: scores.sparse_scores(
            _autodiff_lexical(qw, qi, vocab, UNUSED), _autodiff_lexical(pw, pi, vocab, UNUSED)))
        args = (blocks(qw), blocks(pw), blocks(q_ids), blocks(p_ids))
        loss = lambda f: lambda qw, pw: jnp.sum(jnp.sin(f(qw, pw, *args[2:])))
        for x, y in zip(jax.grad(loss(mine_b), (0, 1))(*args[:2]), jax.grad(loss(ref_b), (0, 1))(*args[:2])):
            np.testing.assert_array_equal(x, y)
