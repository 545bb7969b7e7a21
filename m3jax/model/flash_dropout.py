"""Flash attention with attention-probability dropout: a Pallas TPU kernel (forward and backward) and the keep rule.

The keep/drop decision of probability (query i, key j) of batch row b and head h is a counter-based hash, so the
kernel and a plain XLA reference draw the same mask and nothing about it is ever stored:

    key[b, h] = row_head_keys(seed, ...)[b, h]         seed: 2 int32 words (the layer's flax dropout rng: it differs
                                                      per step, layer and sub-batch)
    x = fmix32(key[b, h] ^ (i * 0x9E3779B9))            murmur3's 32-bit finaliser (2 multiplies, 3 xor-shifts)
    x = fmix32(x ^ (j * 0x632BE5AB))
    keep = (x >>> 8) >= round(rate * 2**24)           24 random bits against the drop rate

All on int32 with wrap-around multiplies and logical shifts (the TPU VPU's 32-bit integer ops; the same in XLA and
in interpret mode). Kept probabilities are scaled by 1 / (1 - rate), as nn.Dropout does.

The kernel (`flash_attention`) takes q, k, v [B, N, L, D] (heads-major, L a multiple of the block), segment ids of
the queries and of the keys ([B, L] int32: a query sees the keys of its own segment -- right padding is segment 0
against real tokens' 1; packed sequences are segments 1, 2, ...), and the [B, N] keys. Forward: online softmax over
key blocks, the dropped probabilities left out of P V but not out of the normaliser; it saves the output and the
log-sum-exp per query (memory linear in L). Backward: two kernels (dK, dV over query blocks; dQ over key blocks)
recompute the scores and regenerate each block's keep mask from the hash:

    P = exp(S - lse), dV = (P * M) ^T dO, dP = (dO V^T) * M, dS = P * (dP - rowsum(dO * O)), M = keep / (1 - rate)

`interpret=True` runs the same kernels in Pallas' interpreter (CPU tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_LANES, NUM_SUBLANES = 128, 8
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
KEEP_BITS = 24  # random bits compared against the rate: keep rates are exact to 2**-24


def _i32(c: int) -> int:
    return int(np.array(c, np.uint32).view(np.int32))


FMIX_1, FMIX_2 = _i32(0x85EBCA6B), _i32(0xC2B2AE35)  # murmur3 fmix32
QUERY_MIX, KEY_MIX, HEAD_MIX = _i32(0x9E3779B9), _i32(0x632BE5AB), _i32(0x7FEB352D)


def _srl(x, n: int):
    return lax.shift_right_logical(x, jnp.full(x.shape, n, x.dtype))


def fmix32(x):
    """murmur3's finaliser on int32 (a bijection of 32-bit words; multiplies wrap)."""
    x = x ^ _srl(x, 16)
    x = x * FMIX_1
    x = x ^ _srl(x, 13)
    x = x * FMIX_2
    return x ^ _srl(x, 16)


def drop_threshold(rate: float) -> int:
    """Keep iff the hash's top 24 bits are >= this."""
    return int(round(float(rate) * 2 ** KEEP_BITS))


def seed_words(rng) -> jax.Array:
    """Two int32 words of a jax PRNG key (the layer's dropout rng)."""
    return lax.bitcast_convert_type(jax.random.bits(rng, (2,), jnp.uint32), jnp.int32)


def row_head_keys(seed, batch: int, heads: int) -> jax.Array:
    """The [batch, heads] int32 keys of the mask rows from the seed's 2 int32 words (rows and heads are global
    indices: compute this before sharding)."""
    seed = jnp.asarray(seed, jnp.int32)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None] * jnp.ones((1, heads), jnp.int32)
    cols = jnp.arange(heads, dtype=jnp.int32)[None, :] * jnp.ones((batch, 1), jnp.int32)
    x = fmix32(seed[0] ^ (rows * QUERY_MIX))
    return fmix32((x ^ (cols * HEAD_MIX)) + seed[1])


def keep_mask(key, qpos, kpos, rate: float):
    """The keep decision (bool) for int32 keys and query / key positions (broadcast together)."""
    x = fmix32(key ^ (qpos * QUERY_MIX))
    x = fmix32(x ^ (kpos * KEY_MIX))
    return _srl(x, 32 - KEEP_BITS) >= drop_threshold(rate)


def reference_keep(keys, q_len: int, k_len: int, rate: float) -> jax.Array:
    """The full [B, N, q_len, k_len] keep mask of keys [B, N] (what the XLA path applies)."""
    b, n = keys.shape
    shape = (b, n, q_len, k_len)
    key = jnp.broadcast_to(keys[:, :, None, None], shape)
    return keep_mask(key, lax.broadcasted_iota(jnp.int32, shape, 2), lax.broadcasted_iota(jnp.int32, shape, 3),
                     rate)


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Blocks: q, o, dO, dQ [bq, D]; k, v, dK, dV [bk, D]; query segment ids [bq, 128] (lanes repeated) or
# [8, bq] (sublanes repeated); log-sum-exp and rowsum(dO * O) [1, bq].


def _tile(x, width: int):
    """[r, 128] repeated along lanes to [r, width] (width a multiple of 128, or smaller: cut)."""
    reps = -(-width // NUM_LANES)
    return jnp.tile(x, (1, reps))[:, :width] if reps > 1 or width < NUM_LANES else x


def _block_keep(keys_ref, b, h, num_heads, q_start, k_start, shape, rate, q_axis):
    key = keys_ref[b * num_heads + h]
    qpos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    kpos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    return keep_mask(key, qpos, kpos, rate)


def _fwd_kernel(keys_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                scale, rate, bq, bk, num_heads):
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    head_dim = acc_sc.shape[-1]

    @pl.when(j == 0)
    def init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    same = _tile(qseg_ref[...], bk) == kvseg_ref[:1, :]
    s = jnp.where(same, s, MASK_VALUE)
    m_prev, l_prev = m_sc[...], l_sc[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])  # [bq, 128]
    p = jnp.exp(s - _tile(m_next, bk))
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_prev + lax.broadcast_in_dim(p.sum(axis=-1), l_prev.shape, (0,))
    m_sc[...] = m_next
    if rate > 0:
        keep = _block_keep(keys_ref, b, h, num_heads, i * bq, j * bk, (bq, bk), rate, 0)
        p = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    acc_sc[...] = _tile(alpha, head_dim) * acc_sc[...] + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def end():
        norm = l_sc[...]
        o_ref[...] = (acc_sc[...] * _tile(1.0 / norm, head_dim)).astype(o_ref.dtype)
        lse_ref[...] = jnp.log(norm) + m_sc[...]


def _dkv_kernel(keys_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dk_ref, dv_ref, dk_sc,
                dv_sc, *, scale, rate, bq, bk, num_heads):
    """Transposed orientation: scores [bk, bq] (a key per row), so lse and di are rows as stored."""
    b, h, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    nt = (((1,), (1,)), ((), ()))
    nn_ = (((1,), (0,)), ((), ()))
    s = lax.dot_general(k, q, nt, preferred_element_type=jnp.float32) * scale  # [bk, bq]
    same = _tile(kvseg_ref[...], bq) == qseg_ref[:1, :]
    s = jnp.where(same, s, MASK_VALUE)
    p = jnp.exp(s - lse_ref[...])
    dp = lax.dot_general(v, do, nt, preferred_element_type=jnp.float32)  # [bk, bq]
    pd = p
    if rate > 0:
        keep = _block_keep(keys_ref, b, h, num_heads, i * bq, j * bk, (bk, bq), rate, 1)
        inv = 1.0 / (1.0 - rate)
        pd = jnp.where(keep, p * inv, 0.0)
        dp = jnp.where(keep, dp * inv, 0.0)
    dv_sc[...] += lax.dot_general(pd.astype(do.dtype), do, nn_, preferred_element_type=jnp.float32)
    ds = p * (dp - di_ref[...])
    dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, nn_, preferred_element_type=jnp.float32) * scale

    @pl.when(i == pl.num_programs(3) - 1)
    def end():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(keys_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dq_ref, dq_sc, *,
               scale, rate, bq, bk, num_heads):
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    nt = (((1,), (1,)), ((), ()))
    s = lax.dot_general(q, k, nt, preferred_element_type=jnp.float32) * scale  # [bq, bk]
    same = _tile(qseg_ref[...], bk) == kvseg_ref[:1, :]
    s = jnp.where(same, s, MASK_VALUE)
    p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))
    dp = lax.dot_general(do, v, nt, preferred_element_type=jnp.float32)  # [bq, bk]
    if rate > 0:
        keep = _block_keep(keys_ref, b, h, num_heads, i * bq, j * bk, (bq, bk), rate, 0)
        dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
    ds = p * (dp - jnp.expand_dims(di_ref[0], -1))
    dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32) * scale

    @pl.when(j == pl.num_programs(3) - 1)
    def end():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# pallas_calls


def _segment_layouts(segment_ids, length):
    """[B, L] ids -> ([B, L, 128] lanes repeated, [B, 8, L] sublanes repeated)."""
    b = segment_ids.shape[0]
    return (lax.broadcast_in_dim(segment_ids, (b, length, NUM_LANES), (0, 1)),
            lax.broadcast_in_dim(segment_ids, (b, NUM_SUBLANES, length), (0, 2)))


def _params(interpret):
    sem = ("parallel", "parallel", "parallel", "arbitrary")
    return dict(interpret=interpret, compiler_params=pltpu.CompilerParams(dimension_semantics=sem))


def _forward(q, k, v, q_seg, kv_seg, keys, *, scale, rate, block_q, block_k, interpret):
    bsz, n, lq, d = q.shape
    lk = k.shape[2]
    qseg_lanes, _ = _segment_layouts(q_seg, lq)
    _, kvseg_sub = _segment_layouts(kv_seg, lk)
    kernel = functools.partial(_fwd_kernel, scale=scale, rate=rate, bq=block_q, bk=block_k, num_heads=n)
    qmap = lambda b, h, i, j, keys: (b, h, i, 0)
    kmap = lambda b, h, i, j, keys: (b, h, j, 0)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(bsz, n, lq // block_q, lk // block_k),
            in_specs=[pl.BlockSpec((None, None, block_q, d), qmap), pl.BlockSpec((None, None, block_k, d), kmap),
                      pl.BlockSpec((None, None, block_k, d), kmap),
                      pl.BlockSpec((None, block_q, NUM_LANES), lambda b, h, i, j, keys: (b, i, 0)),
                      pl.BlockSpec((None, NUM_SUBLANES, block_k), lambda b, h, i, j, keys: (b, 0, j))],
            out_specs=[pl.BlockSpec((None, None, block_q, d), qmap),
                       pl.BlockSpec((None, None, block_q, NUM_LANES), qmap)],
            scratch_shapes=[pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((bsz, n, lq, NUM_LANES), jnp.float32)],
        name="flash_dropout_fwd", **_params(interpret),
    )(keys.reshape(-1), q, k, v, qseg_lanes, kvseg_sub)
    return o, lse[..., 0]


def _backward(q, k, v, q_seg, kv_seg, keys, o, lse, do, *, scale, rate, block_q, block_k, interpret):
    bsz, n, lq, d = q.shape
    lk = k.shape[2]
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, N, 1, Lq]
    lse = lse[:, :, None, :]
    qseg_lanes, qseg_sub = _segment_layouts(q_seg, lq)
    kvseg_lanes, kvseg_sub = _segment_layouts(kv_seg, lk)
    common = dict(scale=scale, rate=rate, bq=block_q, bk=block_k, num_heads=n)

    # dK, dV: grid over key blocks, queries innermost.
    qmap = lambda b, h, j, i, keys: (b, h, i, 0)
    kmap = lambda b, h, j, i, keys: (b, h, j, 0)
    rowmap = lambda b, h, j, i, keys: (b, h, 0, i)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(bsz, n, lk // block_k, lq // block_q),
            in_specs=[pl.BlockSpec((None, None, block_q, d), qmap), pl.BlockSpec((None, None, block_k, d), kmap),
                      pl.BlockSpec((None, None, block_k, d), kmap), pl.BlockSpec((None, None, block_q, d), qmap),
                      pl.BlockSpec((None, None, 1, block_q), rowmap), pl.BlockSpec((None, None, 1, block_q), rowmap),
                      pl.BlockSpec((None, NUM_SUBLANES, block_q), lambda b, h, j, i, keys: (b, 0, i)),
                      pl.BlockSpec((None, block_k, NUM_LANES), lambda b, h, j, i, keys: (b, j, 0))],
            out_specs=[pl.BlockSpec((None, None, block_k, d), kmap), pl.BlockSpec((None, None, block_k, d), kmap)],
            scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_dropout_dkv", **_params(interpret),
    )(keys.reshape(-1), q, k, v, do, lse, di, qseg_sub, kvseg_lanes)

    # dQ: grid over query blocks, keys innermost.
    qmap = lambda b, h, i, j, keys: (b, h, i, 0)
    kmap = lambda b, h, i, j, keys: (b, h, j, 0)
    rowmap = lambda b, h, i, j, keys: (b, h, 0, i)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(bsz, n, lq // block_q, lk // block_k),
            in_specs=[pl.BlockSpec((None, None, block_q, d), qmap), pl.BlockSpec((None, None, block_k, d), kmap),
                      pl.BlockSpec((None, None, block_k, d), kmap), pl.BlockSpec((None, None, block_q, d), qmap),
                      pl.BlockSpec((None, None, 1, block_q), rowmap), pl.BlockSpec((None, None, 1, block_q), rowmap),
                      pl.BlockSpec((None, block_q, NUM_LANES), lambda b, h, i, j, keys: (b, i, 0)),
                      pl.BlockSpec((None, NUM_SUBLANES, block_k), lambda b, h, i, j, keys: (b, 0, j))],
            out_specs=pl.BlockSpec((None, None, block_q, d), qmap),
            scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_dropout_dq", **_params(interpret),
    )(keys.reshape(-1), q, k, v, do, lse, di, qseg_lanes, kvseg_sub)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q, k, v, q_seg, kv_seg, keys, scale, rate, block_q, block_k, interpret):
    return _forward(q, k, v, q_seg, kv_seg, keys, scale=scale, rate=rate, block_q=block_q, block_k=block_k,
                    interpret=interpret)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, keys, scale, rate, block_q, block_k, interpret):
    o, lse = _forward(q, k, v, q_seg, kv_seg, keys, scale=scale, rate=rate, block_q=block_q, block_k=block_k,
                      interpret=interpret)
    return o, (q, k, v, q_seg, kv_seg, keys, o, lse)


def _flash_bwd(scale, rate, block_q, block_k, interpret, res, do):
    q, k, v, q_seg, kv_seg, keys, o, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, keys, o, lse, do, scale=scale, rate=rate, block_q=block_q,
                           block_k=block_k, interpret=interpret)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_segment_ids, kv_segment_ids, keys=None, *, rate: float = 0.0,
                    scale: float | None = None, block_q: int = 512, block_k: int = 512, interpret: bool = False):
    """Attention of q [B, N, Lq, D] over k, v [B, N, Lk, D] where query and key segment ids ([B, Lq], [B, Lk]
    int32) are equal, with attention-probability dropout at `rate` drawn from keys [B, N] (int32, `row_head_keys`;
    unused, and may be None, at rate 0). Lq, Lk must be multiples of block_q, block_k (multiples of 128).
    Differentiable in q, k, v."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate {rate}: expected [0, 1)")
    bsz, n, lq, d = q.shape
    lk = k.shape[2]
    if lq % block_q or lk % block_k or block_q % NUM_LANES or block_k % NUM_LANES:
        raise ValueError(f"flash_attention: lengths {lq}, {lk} must be multiples of blocks {block_q}, {block_k} "
                         f"(multiples of {NUM_LANES})")
    scale = float(1.0 / np.sqrt(d)) if scale is None else float(scale)
    if keys is None or rate == 0:
        keys, rate = jnp.zeros((bsz, n), jnp.int32), 0.0
    return _flash(q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
                  keys.astype(jnp.int32), scale, float(rate), block_q, block_k, interpret)
