"""The BGE-M3 unified fine-tuning loss (FlagEmbedding EncoderOnlyEmbedderM3Model.forward), as one pure function.

One step sees B*W queries and B*W*G passages as global arrays: W blocks (the devices the batch is sharded over,
FlagEmbedding's processes), each holding B queries followed by their G passages (positive first). Per head:

    scores      = sim(q, p) / temperature            in-batch: each block's [B, B*G]; target of query i: i*G
    CE(s)       = cross entropy over each row, averaged over all rows
    ensemble    = dense + 0.3 * sparse + colbert
    base        = (CE(dense) + CE(ensemble) + 0.1 * CE(sparse) + CE(colbert)) / 4        (dense only if not unified)
    self-distill (use_self_distill and step > self_distill_start_step):
                  t = softmax(stop_grad(ensemble));  sd(s) = -mean(sum(log_softmax(s) * t))
                  loss = (base + (sd(dense) + 0.1 * sd(sparse) + sd(colbert)) / 3) / 2
    teacher scores (knowledge distillation): t = softmax(teacher scores over the group)
                  kl_div:     CE(s) + -mean(sum(log_softmax(own-group scores) * t))
                  m3_kd_loss: sum_i mean(t[:, i] * CE(s + mask, target i*G + i)), mask = already-used targets
    no_in_batch_neg batches: each query sees only its own G passages ([B, G] scores, target 0).
    negatives_cross_device: the dense head (only) scores queries against the passages of ALL blocks [BW, BWG].

Two FlagEmbedding facts this file reproduces on purpose:
  * With negatives_cross_device the global dense term gets 1/W of its true gradient in FlagEmbedding (its
    all_gather passes no gradient to other ranks and DDP averages gradients); `_as_gathered` gives it the same
    value and gradient, so learning rates transfer between the two trainers.
  * Padded passage tokens are zero colbert vectors and join the max (see scores.colbert_scores).
Where FlagEmbedding 1.4.2 departs from the formula on no_in_batch_neg batches with unified fine-tuning (its ensemble
reads the diagonal of the [B, G] scores: an identically-zero ensemble loss and a [B, 1] self-distillation teacher
when B <= G, an IndexError when B > G; m3_kd_loss there indexes past the matrix when B > 1), this file computes the
formula above; tests/test_losses.py pins FlagEmbedding's behaviour.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m3jax import scores


@dataclasses.dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.02
    unified_finetuning: bool = True
    use_self_distill: bool = False
    self_distill_start_step: int = -1
    kd_loss_type: str = "kl_div"  # kl_div | m3_kd_loss
    negatives_cross_device: bool = False
    # m3jax option: every head (and self-distillation) over the whole global batch with exact gradients -- the loss
    # is then a function of the global batch alone, identical on any number of devices.
    cross_device_all_heads: bool = False
    num_blocks: int = 1  # W: devices the batch axis is sharded over
    vocab_size: int = 250002
    unused_token_ids: tuple[int, ...] = (0, 2, 1, 3)


def _as_gathered(term: jax.Array, num_blocks: int) -> jax.Array:
    """Same value, 1/W of the gradient: what a term over all_gather'ed reps gets under FlagEmbedding + DDP."""
    if num_blocks == 1:
        return term
    return term / num_blocks + jax.lax.stop_gradient(term * (1.0 - 1.0 / num_blocks))


def _row_ce(scores: jax.Array, target: jax.Array) -> jax.Array:
    """Per-row cross entropy; scores [..., N], target [...] int."""
    logp = jax.nn.log_softmax(scores, axis=-1)
    return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]


def _soft_ce(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """-mean(sum(log_softmax(scores) * targets)) -- FlagEmbedding's distill_loss('kl_div', ...)."""
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(scores, axis=-1) * targets, axis=-1))


def _contrastive(scores: jax.Array, teacher: jax.Array | None, group: int, kd_loss_type: str,
                 positive_stride: int) -> tuple[jax.Array, jax.Array]:
    """(ce, kd) terms of one head's loss over score blocks [W, B, N].

    Row i's own passages are columns i*positive_stride + j, j < G: stride G for in-batch scores [B, B*G],
    stride 0 for no-in-batch-negative scores [B, G].
    """
    rows = jnp.arange(scores.shape[-2])
    first = jnp.broadcast_to(rows * positive_stride, scores.shape[:-1])
    if teacher is None:
        return jnp.mean(_row_ce(scores, first)), jnp.zeros((), jnp.float32)
    if kd_loss_type == "kl_div":
        own = jnp.take_along_axis(scores, first[..., None] + jnp.arange(group), axis=-1)  # [W, B, G]
        return jnp.mean(_row_ce(scores, first)), _soft_ce(own, teacher)
    # m3_kd_loss: every passage of the group is a target in turn, weighted by the teacher, earlier targets masked.
    kd = jnp.zeros((), jnp.float32)
    mask = jnp.zeros_like(scores)
    for i in range(group):
        target = first + i
        kd = kd + jnp.mean(teacher[..., i] * _row_ce(scores + mask, target))
        hit = jax.nn.one_hot(target, scores.shape[-1], dtype=bool)
        mask = jnp.where(hit, jnp.finfo(scores.dtype).min, mask)
    return jnp.zeros((), jnp.float32), kd


def _blocks(x: jax.Array, w: int) -> jax.Array:
    return x.reshape((w, x.shape[0] // w) + x.shape[1:])


def m3_loss(q: dict, p: dict, q_ids: jax.Array, p_ids: jax.Array, q_mask: jax.Array,
            teacher_scores: jax.Array | None, step: jax.Array, *, cfg: LossConfig, group_size: int,
            no_in_batch_neg: bool = False) -> tuple[jax.Array, dict]:
    """Unified loss and its parts.

    q / p: model outputs (dense [.., H], sparse_weights [.., L], colbert [.., L-1, D]) of W*B queries and W*B*G
    passages; q_ids / p_ids the token ids (for the lexical vectors); q_mask the query attention mask; teacher_scores
    [W*B, G] raw teacher scores or None; step the (traced) optimizer step, compared with self_distill_start_step.
    """
    w, g, temp = cfg.num_blocks, group_size, cfg.temperature
    n_q = q["dense"].shape[0]
    teacher = None if teacher_scores is None else jax.nn.softmax(teacher_scores.astype(jnp.float32), axis=-1)

    def head_scores(sim, qx, px, use_global: bool):
        """Score tensor [W', B', N] the head's loss runs over, and whether it spans the gathered global batch."""
        if no_in_batch_neg:  # own group only: [1, WB, G]
            return sim(qx, px.reshape((n_q, g) + px.shape[1:]), grouped=True)[None] / temp, False
        if use_global:  # FlagEmbedding's gathered dense term (1/W gradient) unless all heads are global
            return sim(qx, px)[None] / temp, w > 1 and not cfg.cross_device_all_heads
        return jax.vmap(sim)(_blocks(qx, w), _blocks(px, w)) / temp, False

    def loss_of(s, is_global):
        t = None if teacher is None else (teacher[None] if s.shape[0] == 1 else _blocks(teacher, w))
        ce, kd = _contrastive(s, t, g, cfg.kd_loss_type, 0 if no_in_batch_neg else g)
        if is_global:
            ce = _as_gathered(ce, w)
            if cfg.kd_loss_type == "m3_kd_loss":  # kl_div's kd part only touches a query's own (local) passages
                kd = _as_gathered(kd, w)
        return ce + kd, kd

    def dense_sim(a, b, grouped=False):
        return jnp.einsum("bh,bgh->bg" if grouped else "bh,ph->bp", a, b, preferred_element_type=jnp.float32)

    dense_global = cfg.negatives_cross_device or cfg.cross_device_all_heads
    dense_s, dense_is_global = head_scores(dense_sim, q["dense"], p["dense"], dense_global)
    loss_dense, kd_dense = loss_of(dense_s, dense_is_global)
    parts = {"dense": loss_dense}
    if not cfg.unified_finetuning:
        parts.update(kd=kd_dense)
        return loss_dense, parts

    q_lex = scores.sparse_embedding(q["sparse_weights"], q_ids, cfg.vocab_size, cfg.unused_token_ids)
    p_lex = scores.sparse_embedding(p["sparse_weights"], p_ids, cfg.vocab_size, cfg.unused_token_ids)

    def sparse_sim(a, b, grouped=False):
        return jnp.einsum("bv,bgv->bg" if grouped else "bv,pv->bp", a, b, preferred_element_type=jnp.float32)

    def colbert_sim(a, b, a_mask, grouped=False):
        if grouped:
            token = jnp.einsum("bid,bgjd->bgij", a, b, preferred_element_type=jnp.float32)
            summed = jnp.sum(jnp.max(token, axis=-1), axis=-1)
            return summed / jnp.sum(a_mask[:, 1:].astype(jnp.float32), axis=-1, keepdims=True)
        return scores.colbert_scores(a, b, a_mask)

    sparse_s, _ = head_scores(sparse_sim, q_lex, p_lex, cfg.cross_device_all_heads)
    if no_in_batch_neg:
        colbert_s = colbert_sim(q["colbert"], p["colbert"].reshape((n_q, g) + p["colbert"].shape[1:]), q_mask,
                                grouped=True)[None] / temp
    elif cfg.cross_device_all_heads:
        colbert_s = colbert_sim(q["colbert"], p["colbert"], q_mask)[None] / temp
    else:
        colbert_s = jax.vmap(colbert_sim)(_blocks(q["colbert"], w), _blocks(p["colbert"], w),
                                          _blocks(q_mask, w)) / temp
    loss_sparse, kd_sparse = loss_of(sparse_s, False)
    loss_colbert, kd_colbert = loss_of(colbert_s, False)

    # The ensemble (and self-distillation) use each block's own dense scores unless all heads are global.
    if dense_is_global:
        per_block = dense_s[0].reshape(w, n_q // w, w, -1)
        dense_s = jnp.moveaxis(jnp.diagonal(per_block, axis1=0, axis2=2), -1, 0)  # [W, B, B*G]
    ensemble_s = dense_s + 0.3 * sparse_s + colbert_s
    loss_ens, kd_ens = loss_of(ensemble_s, False)

    base = (loss_dense + loss_ens + 0.1 * loss_sparse + loss_colbert) / 4
    parts.update(sparse=loss_sparse, colbert=loss_colbert, ensemble=loss_ens,
                 kd=(kd_dense + kd_ens + 0.1 * kd_sparse + kd_colbert) / 4)
    if not cfg.use_self_distill:
        parts["self_distill"] = jnp.zeros((), jnp.float32)
        return base, parts

    self_teacher = jax.nn.softmax(jax.lax.stop_gradient(ensemble_s), axis=-1)
    sd = (_soft_ce(dense_s, self_teacher) + 0.1 * _soft_ce(sparse_s, self_teacher)
          + _soft_ce(colbert_s, self_teacher)) / 3
    active = step > cfg.self_distill_start_step
    parts["self_distill"] = jnp.where(active, sd, 0.0)
    return jnp.where(active, (base + sd) / 2, base), parts
