"""Bidirectional attention over right-padded sequences, one function for every implementation.

`attention(q, k, v, lengths, implementation=..., dropout=...)` with q, k, v [B, L, N, D] and lengths [B] (the real
tokens of each row; keys past them are masked). The implementation comes resolved from
`m3jax.loading.resolve_attention`:
  xla              XLA's attention; with attention-probability dropout in training, on probabilities it
                   materialises here
  cudnn            cuDNN's fused kernel (GPU); no attention dropout
  flash-dropout    the Pallas TPU flash kernel with attention dropout (m3jax.flash_dropout), `flash-dropout-interpret`
                   the same kernel interpreted (CPU tests); without dropout (inference, rate 0) it is splash
  splash           the Pallas TPU splash (flash) kernel, `splash-interpret` the same kernel interpreted (CPU tests);
                   no attention dropout (the fastest TPU path)
The Pallas kernels run for sequences of at least SPLASH_MIN_LENGTH; shorter ones use XLA's attention (their scores
are small), with the same dropout rule.

`dropout` is None (no attention-probability dropout: inference, or a rate of 0) or a `Dropout(rate, seed)`: seed is
2 int32 words (from the layer's flax dropout rng, so it differs per step, layer and sub-batch). The keep mask is the
counter-based hash of m3jax.flash_dropout (seed, batch row, head, query position, key position): the XLA path and
the flash-dropout kernel apply the same mask. cudnn and splash have no dropout: it is not applied with them (the
trainer says so at start).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m3jax import flash_dropout
from m3jax.sharding import current_rules, rule_axes

SPLASH_MIN_LENGTH = 128  # TPU tiles are 128 wide: shorter sequences would be padded up to 128
FUSED_WITHOUT_DROPOUT = ("cudnn", "splash", "splash-interpret")  # implementations that do not apply dropout


class Dropout(NamedTuple):
    """Attention-probability dropout: drop rate and 2 int32 seed words (flash_dropout.seed_words of a rng)."""

    rate: float
    seed: jax.Array


def attention(q, k, v, lengths, *, implementation: str, dropout: Dropout | None = None):
    """Attention of q over k, v [B, L, N, D], keys past lengths [B] masked; returns [B, L, N, D]."""
    if dropout is not None and dropout.rate <= 0:
        dropout = None
    long = q.shape[1] >= SPLASH_MIN_LENGTH
    if implementation.startswith("flash-dropout") and long and dropout is not None:
        return flash_dropout_attention(q, k, v, lengths, dropout,
                                       interpret=implementation == "flash-dropout-interpret")
    if dropout is not None and implementation not in FUSED_WITHOUT_DROPOUT:
        return xla_dropout_attention(q, k, v, lengths, dropout)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                            implementation="cudnn")
    if implementation.startswith(("splash", "flash-dropout")) and long:
        return splash_attention(q, k, v, lengths, interpret=implementation.endswith("-interpret"))
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")


def xla_dropout_attention(q, k, v, lengths, dropout: Dropout):
    """XLA's attention on materialised probabilities [B, N, Lq, Lk], dropout by the hash rule (the reference of the
    flash-dropout kernel)."""
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    key_mask = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keys = flash_dropout.row_head_keys(dropout.seed, q.shape[0], q.shape[2])
    keep = flash_dropout.reference_keep(keys, q.shape[1], k.shape[1], dropout.rate)
    probs = jnp.where(keep, probs * (1.0 / (1.0 - dropout.rate)), 0.0)
    return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)


def _padding(length: int) -> tuple[int, int]:
    """(length padded to a multiple of 128, the kernels' block: 512, 256 or 128, whichever divides it)."""
    padded = -(-length // 128) * 128
    return padded, next(b for b in (512, 256, 128) if padded % b == 0)


def _per_shard(local, q, k, v, segments, *extra):
    """local(q, k, v, segments, *extra) per shard: inside a sharded computation under shard_map, the batch over the
    mesh axes of the logical rule "batch", the heads over those of "heads" (extra args are [B, N]); without a mesh
    as is (one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segments, *extra)
    rules = current_rules()
    batch, heads = rule_axes(rules, "batch") or None, rule_axes(rules, "heads") or None
    P = jax.sharding.PartitionSpec
    spec = P(batch, None, heads, None)
    in_specs = (spec, spec, spec, P(batch, None)) + (P(batch, heads),) * len(extra)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(q, k, v, segments,
                                                                                                *extra)


def _to_heads(x, padded: int):
    """[b, L, n, d] -> [b, n, padded, d]."""
    return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0))), 1, 2)


def splash_attention(q, k, v, lengths, *, interpret: bool):
    """Pallas TPU splash attention (memory linear in the sequence length; scores never materialised).

    Right padding becomes segment ids (real tokens 1, padding 0: a real query sees only real keys), the sequence is
    padded to a multiple of 128 and cut back after. Inside a sharded computation the kernel runs per shard
    (`_per_shard`).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    length = q.shape[1]
    padded, block = _padding(length)
    segments = (jnp.arange(padded)[None, :] < lengths[:, None]).astype(jnp.int32)
    scale = float(1.0 / np.sqrt(q.shape[-1]))  # a Python float: weakly typed, so q stays in its dtype (bf16)

    def local(q, k, v, segments):  # [b, L, n, d] on one shard
        kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((padded, padded))] * q.shape[2]), head_shards=1,
                                    q_seq_shards=1, block_sizes=sk.BlockSizes(*(block,) * 8), interpret=interpret)
        out = jax.vmap(kernel)(_to_heads(q * scale, padded), _to_heads(k, padded), _to_heads(v, padded),
                               segment_ids=sk.SegmentIds(q=segments, kv=segments))
        return jnp.swapaxes(out, 1, 2)[:, :length]

    return _per_shard(local, q, k, v, segments)


def flash_dropout_attention(q, k, v, lengths, dropout: Dropout, *, interpret: bool):
    """The flash-dropout kernel (m3jax.flash_dropout): segment ids from right padding as for splash, the mask keys
    of every (row, head) computed on the global batch, then sharded with it (`_per_shard`)."""
    length = q.shape[1]
    padded, block = _padding(length)
    segments = (jnp.arange(padded)[None, :] < lengths[:, None]).astype(jnp.int32)
    keys = flash_dropout.row_head_keys(dropout.seed, q.shape[0], q.shape[2])

    def local(q, k, v, segments, keys):
        out = flash_dropout.flash_attention(_to_heads(q, padded), _to_heads(k, padded), _to_heads(v, padded),
                                            segments, segments, keys, rate=float(dropout.rate), block_q=block,
                                            block_k=block, interpret=interpret)
        return jnp.swapaxes(out, 1, 2)[:, :length]

    return _per_shard(local, q, k, v, segments, keys)
