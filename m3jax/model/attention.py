"""Bidirectional attention over right-padded sequences, one function for every implementation.

`attention(q, k, v, lengths, implementation=..., dropout=...)` with q, k, v [B, L, N, D] and lengths [B] (the real
tokens of each row; keys past them are masked). The implementation comes resolved from
`m3jax.model.loading.resolve_attention`:
  xla              XLA's attention; with attention-probability dropout in training, on probabilities it
                   materialises here
  cudnn            cuDNN's fused kernel (GPU), with its own attention dropout (cudnn_attention)
  flash-dropout    the Pallas TPU flash kernel with attention dropout (m3jax.model.flash_dropout),
                   `flash-dropout-interpret` the same kernel interpreted (CPU tests); without dropout (inference,
                   rate 0) it is splash
  splash           the Pallas TPU splash (flash) kernel, `splash-interpret` the same kernel interpreted (CPU tests);
                   no attention dropout (the fastest TPU path)
The Pallas kernels run for sequences of at least SPLASH_MIN_LENGTH; shorter ones use XLA's attention (their scores
are small), with the same dropout rule.

`dropout` is None (no attention-probability dropout: inference, or a rate of 0) or a `Dropout(rate, seed)`: seed is
2 int32 words (from the layer's flax dropout rng, so it differs per step, layer and sub-batch). The keep mask is the
counter-based hash of m3jax.model.flash_dropout (seed, batch row, head, query position, key position): the XLA path and
the flash-dropout kernel apply the same mask. cudnn applies the rate with cuDNN's own generator at the static
`cudnn_seed` (m3jax.model.encoder's layer loop gives each call site its own); splash has no dropout: it is not applied
with it (the trainer says so at start).

Packed rows (several texts per row, m3jax.core.packing): `segment_ids` [B, L] int32, 1, 2, ... per text, 0 for padding;
a query sees the keys of its own segment only (padding queries see nothing and give values nobody reads). `lengths`
is then ignored. Each implementation honours segments its own way: xla a [B, 1, L, L] boolean mask (same segment
and nonzero), splash and flash-dropout their segment ids, cudnn its packed layout (per-row segment offsets and
lengths, cuDNN's THD "max_seg_per_batch" path; Hopper or newer). With attention dropout, flash-dropout keeps its
kernel on packed rows; every other implementation takes XLA's path on materialised probabilities (cuDNN's packed
layout is not used with dropout). With segment_ids None every path is the unpacked one, unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core.sharding import current_rules, rule_axes
from m3jax.model import flash_dropout

SPLASH_MIN_LENGTH = 128  # TPU tiles are 128 wide: shorter sequences would be padded up to 128
FUSED_WITHOUT_DROPOUT = ("splash", "splash-interpret")  # implementations that do not apply dropout


class Dropout(NamedTuple):
    """Attention-probability dropout: drop rate and 2 int32 seed words (flash_dropout.seed_words of a rng)."""

    rate: float
    seed: jax.Array


def attention(q, k, v, lengths, *, implementation: str, dropout: Dropout | None = None, cudnn_seed: int = 0,
              segment_ids=None, max_segments: int | None = None):
    """Attention of q over k, v [B, L, N, D], keys past lengths [B] masked (or, with segment_ids [B, L], keys of
    other segments and padding masked; at most max_segments per row, a static bound cudnn needs); returns
    [B, L, N, D]."""
    if dropout is not None and dropout.rate <= 0:
        dropout = None
    if segment_ids is not None:
        return segment_attention(q, k, v, segment_ids, implementation=implementation, dropout=dropout,
                                 max_segments=max_segments)
    if implementation == "cudnn" and dropout is not None:
        return cudnn_attention(q, k, v, lengths, dropout_rate=dropout.rate, seed=cudnn_seed)
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


def cudnn_attention(q, k, v, lengths, *, dropout_rate: float, seed: int):
    """cuDNN's fused attention with its own attention-probability dropout (jax's lower-level cudnn module).

    The kernel draws its keep mask from Philox at (seed, offset) where the offset is a counter of the kernel's
    executions kept by XLA's runtime per compiled call site; the forward, its recomputation and the backward of one
    call site agree only when each runs once per step (or in the same order). See m3jax/model/encoder.py's cuDNN layer
    loop.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, scale=float(1.0 / np.sqrt(q.shape[-1])),
                                 mask_type=MaskType.PADDING, seed=int(seed), dropout_rate=float(dropout_rate))


def segment_mask(segment_ids) -> jax.Array:
    """[B, 1, L, L] boolean: query and key in the same segment, and not padding (segment 0)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids[:, None, :] != 0))[:, None]


def segment_attention(q, k, v, segment_ids, *, implementation: str, dropout: Dropout | None = None,
                      max_segments: int | None = None):
    """`attention` over packed rows: each query attends to the keys of its own segment. Dropout: the flash-dropout
    kernel with the rows' segment ids when it is the implementation (rows of at least SPLASH_MIN_LENGTH), else
    XLA's path on materialised probabilities; both with the hash rule, so the same mask."""
    long = q.shape[1] >= SPLASH_MIN_LENGTH
    if dropout is not None and implementation.startswith("flash-dropout") and long:
        return flash_dropout_attention(q, k, v, None, dropout, interpret=implementation == "flash-dropout-interpret",
                                       segment_ids=segment_ids)
    if dropout is not None:
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
        logits = jnp.where(segment_mask(segment_ids), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        keys = flash_dropout.row_head_keys(dropout.seed, q.shape[0], q.shape[2])
        keep = flash_dropout.reference_keep(keys, q.shape[1], k.shape[1], dropout.rate)
        probs = jnp.where(keep, probs * (1.0 / (1.0 - dropout.rate)), 0.0)
        return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)
    if implementation == "cudnn":
        return cudnn_packed_attention(q, k, v, segment_ids, max(2, max_segments or q.shape[1] // 2))
    if implementation.startswith(("splash", "flash-dropout")) and long:
        return splash_attention(q, k, v, None, interpret=implementation.endswith("-interpret"),
                                segment_ids=segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), implementation="xla")


def segment_offsets(segment_ids, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Per row, the start offset [B, M + 1] and length [B, M] of segments 1..M (contiguous, in order), -1 where a
    row has fewer: cuDNN's packed-layout arguments. M = max_segments."""
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    member = segment_ids[:, None, :] == ids[None, :, None]  # [B, M, L]
    seqlen = member.sum(-1).astype(jnp.int32)
    start = jnp.argmax(member, axis=-1).astype(jnp.int32)
    present = seqlen > 0
    offsets = jnp.where(present, start, -1)
    offsets = jnp.concatenate([offsets, jnp.full(offsets.shape[:1] + (1,), -1, jnp.int32)], axis=1)
    return offsets, jnp.where(present, seqlen, -1)


def cudnn_packed_attention(q, k, v, segment_ids, max_segments: int):
    """cuDNN's fused attention on packed rows (its THD layout: q_offsets / kv_offsets with per-segment lengths).

    Segments are contiguous runs with ids 1..max_segments in order from the row start (m3jax.core.packing); without a
    bound, L // 2 (every text has at least <s> and </s>); at least 2 (cuDNN takes one segment per row as its
    unpacked layout). Tokens outside every segment (padding) get values nobody reads."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as fused

    offsets, seqlen = segment_offsets(segment_ids, max_segments)
    return fused(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
                 scale=float(1.0 / np.sqrt(q.shape[-1])), mask_type=MaskType.PADDING)


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


def splash_attention(q, k, v, lengths, *, interpret: bool, segment_ids=None):
    """Pallas TPU splash attention (memory linear in the sequence length; scores never materialised).

    Right padding becomes segment ids (real tokens 1, padding 0: a real query sees only real keys); packed rows
    bring their own (`segment_ids` [B, L], 0 for padding). The sequence is padded to a multiple of 128 and cut back
    after. Inside a sharded computation the kernel runs per shard (`_per_shard`).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    length = q.shape[1]
    padded, block = _padding(length)
    segments = _kernel_segments(lengths, segment_ids, length, padded)
    scale = float(1.0 / np.sqrt(q.shape[-1]))  # a Python float: weakly typed, so q stays in its dtype (bf16)

    def local(q, k, v, segments):  # [b, L, n, d] on one shard
        kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((padded, padded))] * q.shape[2]), head_shards=1,
                                    q_seq_shards=1, block_sizes=sk.BlockSizes(*(block,) * 8), interpret=interpret)
        out = jax.vmap(kernel)(_to_heads(q * scale, padded), _to_heads(k, padded), _to_heads(v, padded),
                               segment_ids=sk.SegmentIds(q=segments, kv=segments))
        return jnp.swapaxes(out, 1, 2)[:, :length]

    return _per_shard(local, q, k, v, segments)


def _kernel_segments(lengths, segment_ids, length: int, padded: int):
    """[B, padded] int32 segment ids for the Pallas kernels: from right padding (real tokens 1, padding 0) or the
    packed rows' own, padded with 0 to the kernel's multiple of 128."""
    if segment_ids is None:
        return (jnp.arange(padded)[None, :] < lengths[:, None]).astype(jnp.int32)
    return jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - length)))


def flash_dropout_attention(q, k, v, lengths, dropout: Dropout, *, interpret: bool, segment_ids=None):
    """The flash-dropout kernel (m3jax.model.flash_dropout): segment ids from right padding as for splash, or the
    packed rows' own (`segment_ids` [B, L], 0 for padding: padding queries see padding keys only and give values
    nobody reads; real queries see their own text), the mask keys of every (row, head) computed on the global batch,
    then sharded with it (`_per_shard`)."""
    length = q.shape[1]
    padded, block = _padding(length)
    segments = _kernel_segments(lengths, segment_ids, length, padded)
    keys = flash_dropout.row_head_keys(dropout.seed, q.shape[0], q.shape[2])

    def local(q, k, v, segments, keys):
        out = flash_dropout.flash_attention(_to_heads(q, padded), _to_heads(k, padded), _to_heads(v, padded),
                                            segments, segments, keys, rate=float(dropout.rate), block_q=block,
                                            block_k=block, interpret=interpret)
        return jnp.swapaxes(out, 1, 2)[:, :length]

    return _per_shard(local, q, k, v, segments, keys)
