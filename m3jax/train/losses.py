"""The BGE-M3 unified fine-tuning loss (FlagEmbedding EncoderOnlyEmbedderM3Model.forward), as one pure function.
(docs/flagembedding_semantics.md, "The unified loss", states the behaviour in full.)

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

Chosen heads (m3jax's `heads`, LossConfig.heads; H = the trained heads, w = LOSS_WEIGHTS = dense 1, sparse 0.1,
colbert 1, e = ENSEMBLE_WEIGHTS = dense 1, sparse 0.3, colbert 1). With two or three heads:

    ensemble    = sum_{h in H} e_h * s_h
    base        = (sum_{h in H} w_h * CE(h) + CE(ensemble)) / (|H| + 1)
    self-distill: t = softmax(stop_grad(ensemble)),  loss = (base + sum_{h in H} w_h * sd(h) / |H|) / 2

so all three heads give FlagEmbedding's formula above, and e.g. dense + sparse gives
(CE(dense) + 0.1 CE(sparse) + CE(dense + 0.3 sparse)) / 3 and, with self-distillation,
(that + (sd(dense) + 0.1 sd(sparse)) / 2) / 2. With one head h: loss = CE(h) alone (weight 1: the weights only
balance heads against each other; no ensemble, no self-distillation), which for dense is FlagEmbedding's
unified_finetuning=False -- that flag means heads = (dense,). CE(h) includes the head's knowledge-distillation
term in every case. The other heads' outputs are never read, so their linears get no gradient.

Matryoshka (`mrl_dims` d_1..d_n with weights v_k, default 1; dense, and colbert with `mrl_colbert`):

    CE(h) = sum_k v_k * CE(h at d_k) / sum_k v_k

where "h at d" scores the first d components of every embedding (every colbert token vector), re-normalised when
normalize_embeddings -- inference's truncate_dim (cut, then normalise); a d at or above the head's size is the
head itself, untouched, so mrl_dims = (full size,) is the plain loss bit for bit. The ensemble and
self-distillation use the full-size scores.

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

from m3jax.core import scores


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
    # m3jax options (module docstring): the trained heads (unified_finetuning=False means dense only) and the
    # Matryoshka sizes of the dense head (and of the colbert vectors with mrl_colbert).
    heads: tuple[str, ...] = ("dense", "sparse", "colbert")
    mrl_dims: tuple[int, ...] = ()
    mrl_weights: tuple[float, ...] = ()  # one per mrl_dims entry; empty: all 1
    mrl_colbert: bool = False
    normalize_embeddings: bool = True  # Matryoshka cuts are re-normalised when the embeddings are

    def __post_init__(self):
        if not self.heads or any(h not in scores.HEADS for h in self.heads):
            raise ValueError(f"LossConfig.heads={self.heads!r}: expected a non-empty subset of {scores.HEADS}")
        if not self.unified_finetuning and set(self.heads) not in (set(scores.HEADS), {"dense"}):
            raise ValueError(f"LossConfig.heads={self.heads!r} contradicts unified_finetuning=False (dense only)")
        if self.mrl_weights and len(self.mrl_weights) != len(self.mrl_dims):
            raise ValueError("LossConfig.mrl_weights: one weight per mrl_dims entry")

    @property
    def trained_heads(self) -> tuple[str, ...]:
        """The heads the loss reads, in the order dense, sparse, colbert."""
        return tuple(h for h in scores.HEADS if h in self.heads) if self.unified_finetuning else ("dense",)

    def matryoshka(self, head: str) -> tuple[tuple[int, float], ...]:
        """(dim, weight) pairs the head's CE averages over; () = the full size only."""
        if not self.mrl_dims or head == "sparse" or (head == "colbert" and not self.mrl_colbert):
            return ()
        return tuple(zip(self.mrl_dims, self.mrl_weights or (1.0,) * len(self.mrl_dims)))


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


# Per-head weights of FlagEmbedding's unified loss: in the base loss and self-distillation, and in the ensemble.
LOSS_WEIGHTS = {"dense": 1.0, "sparse": 0.1, "colbert": 1.0}
ENSEMBLE_WEIGHTS = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}


def representations(q: dict, p: dict, q_ids: jax.Array, p_ids: jax.Array, q_mask: jax.Array,
                    cfg: LossConfig) -> tuple[dict, dict]:
    """Model outputs -> what each trained head's similarity (`similarity`) reads, for queries and passages.

    dense: the embeddings; sparse: `scores.SparseTokens` (token weights and ids; the similarity builds the lexical
    vectors); colbert: TokenVecs, the query's real tokens after cls as its mask, no passage mask (padded passage
    tokens are zero vectors that join the max, as in FlagEmbedding).
    """
    heads = cfg.trained_heads
    qr, pr = {}, {}
    if "dense" in heads:
        qr["dense"], pr["dense"] = q["dense"], p["dense"]
    if "sparse" in heads:
        qr["sparse"] = scores.SparseTokens(q["sparse_weights"], q_ids)
        pr["sparse"] = scores.SparseTokens(p["sparse_weights"], p_ids)
    if "colbert" in heads:
        qr["colbert"], pr["colbert"] = scores.TokenVecs(q["colbert"], q_mask[:, 1:]), scores.TokenVecs(p["colbert"])
    return qr, pr


def similarity(head: str, cfg: LossConfig):
    """The head's scores.SIMILARITIES function over `representations`' entries; sparse: scores.sparse_token_scores
    (the lexical vectors' inner products, with the same values and gradients in less memory)."""
    if head != "sparse":
        return scores.SIMILARITIES[head]

    def sim(q: scores.SparseTokens, p: scores.SparseTokens, *, grouped: bool = False, precision=None):
        return scores.sparse_token_scores(q, p, cfg.vocab_size, cfg.unused_token_ids, grouped=grouped,
                                          precision=precision)

    return sim


def m3_loss(q: dict, p: dict, q_ids: jax.Array, p_ids: jax.Array, q_mask: jax.Array,
            teacher_scores: jax.Array | None, step: jax.Array, *, cfg: LossConfig, group_size: int,
            no_in_batch_neg: bool = False) -> tuple[jax.Array, dict]:
    """Unified loss and its parts.

    q / p: model outputs (dense [.., H], sparse_weights [.., L], colbert [.., L-1, D]) of W*B queries and W*B*G
    passages (only the trained heads' entries are read: what the gradient cache keeps, step.CACHED_OUTPUTS);
    q_ids / p_ids the token ids (for the lexical vectors); q_mask the query attention mask; teacher_scores
    [W*B, G] raw teacher scores or None; step the (traced) optimizer step, compared with self_distill_start_step.
    """
    w, g, temp = cfg.num_blocks, group_size, cfg.temperature
    n_q = q_ids.shape[0]
    heads = cfg.trained_heads
    teacher = None if teacher_scores is None else jax.nn.softmax(teacher_scores.astype(jnp.float32), axis=-1)
    qr, pr = representations(q, p, q_ids, p_ids, q_mask, cfg)

    def head_scores(head: str, dim: int | None) -> tuple[jax.Array, bool]:
        """Score tensor [W', B', N] the head's loss runs over (at Matryoshka size `dim`, None: full), and whether
        it is FlagEmbedding's gathered dense term (queries against the passages of all blocks, 1/W of its
        gradient)."""
        sim, qx, px = similarity(head, cfg), qr[head], pr[head]
        if dim is not None:
            qx, px = (scores.truncate(x, dim, cfg.normalize_embeddings) for x in (qx, px))
        if no_in_batch_neg:  # own group only: [1, WB, G]
            own = jax.tree.map(lambda x: x.reshape((n_q, g) + x.shape[1:]), px)
            return sim(qx, own, grouped=True)[None] / temp, False
        if cfg.cross_device_all_heads or (head == "dense" and cfg.negatives_cross_device):
            return sim(qx, px)[None] / temp, head == "dense" and w > 1 and not cfg.cross_device_all_heads
        blocks = lambda x: jax.tree.map(lambda a: _blocks(a, w), x)
        return jax.vmap(sim)(blocks(qx), blocks(px)) / temp, False

    def loss_of(s, is_global):
        t = None if teacher is None else (teacher[None] if s.shape[0] == 1 else _blocks(teacher, w))
        ce, kd = _contrastive(s, t, g, cfg.kd_loss_type, 0 if no_in_batch_neg else g)
        if is_global:
            ce = _as_gathered(ce, w)
            if cfg.kd_loss_type == "m3_kd_loss":  # kl_div's kd part only touches a query's own (local) passages
                kd = _as_gathered(kd, w)
        return ce + kd, kd

    def at_size(head: str, dim: int | None = None):
        """(scores the ensemble reads, loss, kd) of one head at one size."""
        sc, is_global = head_scores(head, dim)
        head_loss, head_kd = loss_of(sc, is_global)
        if is_global:  # the ensemble and self-distillation use each block's own dense scores
            per_block = sc[0].reshape(w, n_q // w, w, -1)
            sc = jnp.moveaxis(jnp.diagonal(per_block, axis1=0, axis2=2), -1, 0)  # [W, B, B*G]
        return sc, head_loss, head_kd

    def matryoshka(head: str):
        """Full-size scores, and the loss and kd averaged over the Matryoshka sizes (weights normalised first, so
        a single size at full width is the plain loss bit for bit)."""
        width = (qr[head].vecs if head == "colbert" else qr[head]).shape[-1]
        sizes = cfg.matryoshka(head)
        norm = sum(v for _, v in sizes)
        full, total, total_kd = None, 0.0, 0.0
        for dim, weight in sizes:
            sc, head_loss, head_kd = at_size(head, dim)
            full = sc if dim >= width else full
            total, total_kd = total + (weight / norm) * head_loss, total_kd + (weight / norm) * head_kd
        return (at_size(head)[0] if full is None else full), total, total_kd

    s, loss, kd = {}, {}, {}
    for head in heads:
        s[head], loss[head], kd[head] = matryoshka(head) if cfg.matryoshka(head) else at_size(head)
    if len(heads) == 1:  # one head: its CE alone (FlagEmbedding's unified_finetuning=False for dense)
        (head,) = heads
        return loss[head], {head: loss[head], "kd": kd[head]}

    ensemble_s = sum(ENSEMBLE_WEIGHTS[h] * s[h] for h in heads)
    loss["ensemble"], kd["ensemble"] = loss_of(ensemble_s, False)
    weight = dict(LOSS_WEIGHTS, ensemble=1.0)
    base = sum(weight[k] * loss[k] for k in loss) / len(loss)
    parts = dict(loss, kd=sum(weight[k] * kd[k] for k in kd) / len(kd))
    if not cfg.use_self_distill:
        parts["self_distill"] = jnp.zeros((), jnp.float32)
        return base, parts

    self_teacher = jax.nn.softmax(jax.lax.stop_gradient(ensemble_s), axis=-1)
    sd = sum(LOSS_WEIGHTS[h] * _soft_ce(s[h], self_teacher) for h in heads) / len(heads)
    active = step > cfg.self_distill_start_step
    parts["self_distill"] = jnp.where(active, sd, 0.0)
    return jnp.where(active, (base + sd) / 2, base), parts
