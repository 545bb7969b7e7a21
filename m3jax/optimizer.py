"""AdamW as HF Trainer builds it for FlagEmbedding: decay on all but biases and LayerNorm, clipping, schedules.

Frozen parameters (fix_encoder, fix_position_embedding, and the pooler M3 never uses) get neither updates, weight
decay nor optimizer moments, and are left out of the clipping norm: in torch they have no gradient at all.
"""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """HF get_{linear,cosine,constant}_schedule_with_warmup, evaluated at the update's 0-based step."""
    warmup = config.warmup_steps if config.warmup_steps > 0 else int(-(-config.warmup_ratio * total_steps // 1))
    warmup = min(warmup, total_steps)
    lr = config.learning_rate
    decay_steps = max(total_steps - warmup, 1)
    if config.lr_scheduler_type == "constant":
        after = optax.constant_schedule(lr)
    elif config.lr_scheduler_type == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def trainable_labels(params, config) -> object:
    """'train' or 'frozen' per parameter leaf."""
    def label(path, _):
        names = _path_names(path)
        head = names[0] in ("colbert_linear", "sparse_linear")
        if names[0] == "pooler":
            return "frozen"
        if config.fix_encoder and not head:
            return "frozen"
        if config.fix_position_embedding and "position_embeddings" in names:
            return "frozen"
        return "train"
    return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params) -> object:
    """HF: no weight decay on biases and LayerNorm weights."""
    def decays(path, _):
        names = _path_names(path)
        return names[-1] != "bias" and not any("LayerNorm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def mask_and_clip(labels, max_grad_norm: float) -> optax.GradientTransformation:
    """Zero the gradients of frozen parameters, then clip the global norm of the rest (torch.nn.utils.clip_grad_norm_
    over the parameters that have gradients)."""
    return optax.chain(
        optax.multi_transform({"train": optax.identity(), "frozen": optax.set_to_zero()}, labels),
        optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity(),
    )


def make_optimizer(config, params, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(config, total_steps)
    labels = trainable_labels(params, config)
    adamw = optax.adamw(schedule, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
                        weight_decay=config.weight_decay, mask=weight_decay_mask(params))
    tx = optax.chain(
        mask_and_clip(labels, config.max_grad_norm),
        optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels),  # no moments for frozen
    )
    return tx, schedule
