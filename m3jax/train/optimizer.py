"""AdamW as HF Trainer builds it for FlagEmbedding: decay on all but biases and LayerNorm, clipping, schedules;
and which parameters train.

Which parameters train (`trainable_mask`; parameter names are their paths joined by "/", e.g.
encoder/layers/query/kernel, colbert_linear/bias, encoder/layers/query_lora/a):
  1. candidates: the names matching a `config.trainable` regex (re.search) when that list is non-empty; otherwise
     every parameter, or with LoRA adapters in the params the adapters and the two head linears;
  2. never: the pooler (M3 never uses it), the linear of a head the loss does not train (`config.heads`:
     colbert_linear, sparse_linear), the encoder with fix_encoder, the position embeddings with
     fix_position_embedding, and names matching a `config.frozen` regex;
  3. `config.freeze_layers_below = N`: rows 0..N-1 of every array under encoder/layers (the layers are stacked on
     a leading axis by nn.scan; base weights and adapters alike).
Every pattern must match some parameter, and something must train (ConfigError naming the field otherwise).

Frozen parameters get neither updates, weight decay nor optimizer moments, and are left out of the clipping norm:
in torch they have no gradient at all. Frozen *rows* of a stacked layer array (freeze_layers_below) cannot have
their moments left out -- Adam's moments have the shape of the whole array -- so they are allocated, but the rows'
gradients are zeroed before clipping and Adam (their moments stay exactly 0) and their updates, weight decay
included, are zeroed after it: the rows stay bitwise unchanged.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m3jax.core.errors import ConfigError
from m3jax.model.encoder import HEAD_PARAMS, is_lora_param, param_names, path_names


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The run config's optimisation and fine-tuning control fields (m3jax.config.optimizer_settings); defaults and
    documentation: m3jax.config.default_config."""

    learning_rate: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_grad_norm: float
    warmup_ratio: float
    warmup_steps: int
    lr_scheduler_type: str  # linear | constant | cosine
    trainable: tuple[str, ...]  # regexes (config.trainable as a tuple)
    frozen: tuple[str, ...]
    trained_heads: tuple[str, ...]  # config.trained_heads: heads, or ("dense",) without unified_finetuning
    fix_encoder: bool
    fix_position_embedding: bool
    freeze_layers_below: int


def learning_rate_schedule(settings: OptimizerSettings, total_steps: int) -> optax.Schedule:
    """HF get_{linear,cosine,constant}_schedule_with_warmup, evaluated at the update's 0-based step."""
    s = settings
    warmup = s.warmup_steps if s.warmup_steps > 0 else int(-(-s.warmup_ratio * total_steps // 1))
    warmup = min(warmup, total_steps)
    lr = s.learning_rate
    decay_steps = max(total_steps - warmup, 1)
    if s.lr_scheduler_type == "constant":
        after = optax.constant_schedule(lr)
    elif s.lr_scheduler_type == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _compiled(patterns: tuple[str, ...], field: str, names: list[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        regex = re.compile(pattern)
        if not any(regex.search(n) for n in names):
            examples = ", ".join(next(n for n in names if part in n) for part in (
                "/embeddings/", "/layers/", "colbert_linear/", "sparse_linear/") if any(part in n for n in names))
            raise ConfigError(f"config.{field}: {pattern!r} matches no parameter (names look like {examples})")
        compiled.append(regex)
    return compiled


def trainable_mask(params, settings: OptimizerSettings) -> object:
    """Per parameter, a numpy bool array saying what trains (module docstring): shape () for the whole parameter,
    or [layers, 1, ..., 1] for the rows of a stacked layer array under freeze_layers_below."""
    names = param_names(params)
    trainable = _compiled(settings.trainable, "trainable", names)
    frozen = _compiled(settings.frozen, "frozen", names)
    heads = settings.trained_heads
    lora = any(is_lora_param(n.split("/")) for n in names)

    def trains(parts: list[str]) -> bool:
        name = "/".join(parts)
        if parts[0] == "pooler":
            return False
        if parts[0] in HEAD_PARAMS:
            if HEAD_PARAMS[parts[0]] not in heads:
                return False
        elif settings.fix_encoder:
            return False
        if (settings.fix_position_embedding and "position_embeddings" in parts) or any(r.search(name) for r in frozen):
            return False
        if trainable:
            return any(r.search(name) for r in trainable)
        return not lora or parts[0] in HEAD_PARAMS or is_lora_param(parts)

    def mask(path, leaf):
        parts = path_names(path)
        if not trains(parts):
            return np.asarray(False)
        below = settings.freeze_layers_below
        if parts[:2] == ["encoder", "layers"] and below > 0:
            layers = leaf.shape[0]
            if below >= layers:
                return np.asarray(False)
            return (np.arange(layers) >= below).reshape((layers,) + (1,) * (len(leaf.shape) - 1))
        return np.asarray(True)

    out = jax.tree_util.tree_map_with_path(mask, params)
    if not any(m.any() for m in jax.tree.leaves(out)):
        raise ConfigError("no parameter trains with these settings (heads, trainable, frozen, "
                          "freeze_layers_below, fix_encoder, lora): nothing to fine-tune")
    return out


def trainable_labels(params, settings: OptimizerSettings) -> object:
    """'train' or 'frozen' per parameter leaf ('train' when any row of it trains)."""
    return labels_of(trainable_mask(params, settings))


def labels_of(mask) -> object:
    return jax.tree.map(lambda m: "train" if m.any() else "frozen", mask)


def _as_mask(trainable) -> object:
    """A trainable mask from a mask or a label tree."""
    return jax.tree.map(lambda m: np.asarray(m == "train") if isinstance(m, str) else np.asarray(m), trainable)


def _has_frozen_rows(mask) -> bool:
    return any(m.ndim > 0 and not m.all() for m in jax.tree.leaves(mask))


def keep_trainable(tree, trainable) -> object:
    """`tree` (gradients, updates) with what does not train set to zero."""
    def keep(x, m):
        if m.all():
            return x
        if not m.any():
            return jnp.zeros_like(x)
        return jnp.where(m, x, jnp.zeros((), x.dtype))

    return jax.tree.map(keep, tree, _as_mask(trainable))


def count_parameters(params, trainable) -> tuple[int, int]:
    """(parameters that train, parameters that do not), counting the frozen rows of stacked arrays as frozen."""
    trained = total = 0
    for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(_as_mask(trainable))):
        size = int(np.prod(leaf.shape))
        total += size
        trained += int(m.sum()) * (size // max(int(m.size), 1))
    return trained, total - trained


def _zero_frozen_rows(mask) -> optax.GradientTransformation:
    return optax.stateless(lambda updates, params=None: keep_trainable(updates, mask))


def mask_and_clip(trainable, max_grad_norm: float) -> optax.GradientTransformation:
    """Zero the gradients of what does not train, then clip the global norm of the rest
    (torch.nn.utils.clip_grad_norm_ over the parameters that have gradients). `trainable`: a trainable_mask or a
    trainable_labels tree."""
    mask = _as_mask(trainable)
    steps = [optax.multi_transform({"train": optax.identity(), "frozen": optax.set_to_zero()}, labels_of(mask))]
    if _has_frozen_rows(mask):
        steps.append(_zero_frozen_rows(mask))
    steps.append(optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity())
    return optax.chain(*steps)


def make_optimizer(settings: OptimizerSettings, params, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    s = settings
    schedule = learning_rate_schedule(s, total_steps)
    mask = trainable_mask(params, s)
    labels = labels_of(mask)
    adamw = optax.adamw(schedule, b1=s.adam_beta1, b2=s.adam_beta2, eps=s.adam_epsilon,
                        weight_decay=s.weight_decay, mask=weight_decay_mask(params))
    steps = [mask_and_clip(mask, s.max_grad_norm),
             optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)]  # no moments for frozen
    if _has_frozen_rows(mask):  # frozen rows: no update, no weight decay
        steps.append(_zero_frozen_rows(mask))
    return optax.chain(*steps), schedule


def weight_decay_mask(params) -> object:
    """HF: no weight decay on biases and LayerNorm weights."""
    def decays(path, _):
        names = path_names(path)
        return names[-1] != "bias" and not any("LayerNorm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)
