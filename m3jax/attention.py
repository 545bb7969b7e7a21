"""Bidirectional attention over right-padded sequences, one function for every implementation.

`attention(q, k, v, lengths, implementation=..., dropout=...)` with q, k, v [B, L, N, D] and lengths [B] (the real
tokens of each row; keys past them are masked). The implementation comes resolved from
`m3jax.loading.resolve_attention`:
  xla              XLA's attention; with attention-probability dropout in training, on probabilities it
                   materialises here
  cudnn            cuDNN's fused kernel (GPU)
  splash           the Pallas TPU splash (flash) kernel, `splash-interpret` the same kernel interpreted (CPU tests);
                   sequences shorter than SPLASH_MIN_LENGTH use XLA's attention (their scores are small)
`dropout` is None (no attention-probability dropout: inference, or a rate of 0) or a function applied to the
probabilities [B, N, Lq, Lk]. The fused kernels have no dropout: it is not applied with them (the trainer says so at
start).

Packed rows (several texts per row, m3jax.packing): `segment_ids` [B, L] int32, 1, 2, ... per text, 0 for padding;
a query sees the keys of its own segment only (padding queries see nothing and give values nobody reads). `lengths`
is then ignored. Each implementation honours segments its own way: xla a [B, 1, L, L] boolean mask (same segment
and nonzero), splash its SegmentIds, cudnn its packed layout (per-row segment offsets and lengths, cuDNN's THD
"max_seg_per_batch" path; Hopper or newer). With segment_ids None every path is the unpacked one, unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.sharding import current_rules, rule_axes

SPLASH_MIN_LENGTH = 128  # TPU tiles are 128 wide: shorter sequences would be padded up to 128


def attention(q, k, v, lengths, *, implementation: str, dropout: Callable | None = None, dropout_rate: float = 0.0,
              dropout_seed: int = 0, segment_ids=None, max_segments: int | None = None):
    """Attention of q over k, v [B, L, N, D], keys past lengths [B] masked (or, with segment_ids [B, L], keys of
    other segments and padding masked; at most max_segments per row, a static bound cudnn needs); returns
    [B, L, N, D]. dropout (xla): applied to the probabilities; dropout_rate / dropout_seed (cudnn): the kernel's
    own dropout (unpacked rows)."""
    if segment_ids is not None:
        return segment_attention(q, k, v, segment_ids, implementation=implementation, dropout=dropout,
                                 max_segments=max_segments)
    if implementation == "xla" and dropout is not None:
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
        key_mask = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = dropout(jax.nn.softmax(logits, axis=-1))
        return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)
    if implementation == "cudnn" and dropout_rate > 0:
        return cudnn_attention(q, k, v, lengths, dropout_rate=dropout_rate, seed=dropout_seed)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                            implementation="cudnn")
    if implementation.startswith("splash") and q.shape[1] >= SPLASH_MIN_LENGTH:
        return splash_attention(q, k, v, lengths, interpret=implementation == "splash-interpret")
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")


def cudnn_attention(q, k, v, lengths, *, dropout_rate: float, seed: int):
    """cuDNN's fused attention with its own attention-probability dropout (jax's lower-level cudnn module).

    The kernel draws its keep mask from Philox at (seed, offset) where the offset is a counter of the kernel's
    executions kept by XLA's runtime per compiled call site; the forward, its recomputation and the backward of one
    call site agree only when each runs once per step (or in the same order). See m3jax/model.py's cuDNN layer loop.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, scale=float(1.0 / np.sqrt(q.shape[-1])),
                                 mask_type=MaskType.PADDING, seed=int(seed), dropout_rate=float(dropout_rate))


def segment_mask(segment_ids) -> jax.Array:
    """[B, 1, L, L] boolean: query and key in the same segment, and not padding (segment 0)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids[:, None, :] != 0))[:, None]


def segment_attention(q, k, v, segment_ids, *, implementation: str, dropout: Callable | None = None,
                      max_segments: int | None = None):
    """`attention` over packed rows: each query attends to the keys of its own segment."""
    if implementation == "xla" and dropout is not None:
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
        logits = jnp.where(segment_mask(segment_ids), logits, jnp.finfo(jnp.float32).min)
        probs = dropout(jax.nn.softmax(logits, axis=-1))
        return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)
    if implementation == "cudnn":
        return cudnn_packed_attention(q, k, v, segment_ids, max(2, max_segments or q.shape[1] // 2))
    if implementation.startswith("splash") and q.shape[1] >= SPLASH_MIN_LENGTH:
        return splash_attention(q, k, v, None, interpret=implementation == "splash-interpret",
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

    Segments are contiguous runs with ids 1..max_segments in order from the row start (m3jax.packing); without a
    bound, L // 2 (every text has at least <s> and </s>); at least 2 (cuDNN takes one segment per row as its
    unpacked layout). Tokens outside every segment (padding) get values nobody reads."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as fused

    offsets, seqlen = segment_offsets(segment_ids, max_segments)
    return fused(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
                           scale=float(1.0 / np.sqrt(q.shape[-1])), mask_type=MaskType.PADDING)


def splash_attention(q, k, v, lengths, *, interpret: bool, segment_ids=None):
    """Pallas TPU splash attention (memory linear in the sequence length; scores never materialised).

    Right padding becomes segment ids (real tokens 1, padding 0: a real query sees only real keys); packed rows
    bring their own (`segment_ids` [B, L], 0 for padding). The sequence is padded to a multiple of 128 and cut
    back after. Inside a sharded computation the kernel runs per shard under
    shard_map: the batch over the mesh axes of the logical rule "batch", the heads over those of "heads" (the mesh
    and rules are those set by `m3jax.sharding.tracing_context`); without a mesh it runs as is (one device).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    length = q.shape[1]
    padded = -(-length // 128) * 128
    block = next(b for b in (512, 256, 128) if padded % b == 0)
    if segment_ids is None:
        segments = (jnp.arange(padded)[None, :] < lengths[:, None]).astype(jnp.int32)
    else:
        segments = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - length)))
    scale = float(1.0 / np.sqrt(q.shape[-1]))  # a Python float: weakly typed, so q stays in its dtype (bf16)

    def local(q, k, v, segments):  # [b, L, n, d] on one shard
        kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((padded, padded))] * q.shape[2]), head_shards=1,
                                    q_seq_shards=1, block_sizes=sk.BlockSizes(*(block,) * 8), interpret=interpret)
        to_heads = lambda x: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))), 1, 2)
        out = jax.vmap(kernel)(to_heads(q * scale), to_heads(k), to_heads(v),
                               segment_ids=sk.SegmentIds(q=segments, kv=segments))
        return jnp.swapaxes(out, 1, 2)[:, :length]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segments)
    rules = current_rules()
    batch, heads = rule_axes(rules, "batch") or None, rule_axes(rules, "heads") or None
    spec = jax.sharding.PartitionSpec(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(batch, None)),
                         out_specs=spec, check_vma=False)(q, k, v, segments)
