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
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.sharding import current_rules, rule_axes

SPLASH_MIN_LENGTH = 128  # TPU tiles are 128 wide: shorter sequences would be padded up to 128


def attention(q, k, v, lengths, *, implementation: str, dropout: Callable | None = None, dropout_rate: float = 0.0,
              dropout_seed: int = 0):
    """Attention of q over k, v [B, L, N, D], keys past lengths [B] masked; returns [B, L, N, D].

    dropout (xla): applied to the probabilities; dropout_rate / dropout_seed (cudnn): the kernel's own dropout."""
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


def splash_attention(q, k, v, lengths, *, interpret: bool):
    """Pallas TPU splash attention (memory linear in the sequence length; scores never materialised).

    Right padding becomes segment ids (real tokens 1, padding 0: a real query sees only real keys), the sequence is
    padded to a multiple of 128 and cut back after. Inside a sharded computation the kernel runs per shard under
    shard_map: the batch over the mesh axes of the logical rule "batch", the heads over those of "heads" (the mesh
    and rules are those set by `m3jax.sharding.tracing_context`); without a mesh it runs as is (one device).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    length = q.shape[1]
    padded = -(-length // 128) * 128
    block = next(b for b in (512, 256, 128) if padded % b == 0)
    segments = (jnp.arange(padded)[None, :] < lengths[:, None]).astype(jnp.int32)
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
