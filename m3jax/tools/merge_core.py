"""Merging bge-m3 models tensor by tensor: the weights, the weighted sum and loading a model to merge (what
`m3jax merge` and `m3jax export --merge-with` share; the commands are in m3jax.tools.merge and m3jax.tools.export).

Every tensor -- encoder, pooler, colbert_linear, sparse_linear -- becomes sum_i w_i * tensor_i, computed in float64
and rounded once to float32. The weights must be non-negative and sum to 1 (within 1e-6); they are used as given,
not normalised, so a weight of exactly 1 (the others 0) gives that model bit for bit. A model is a bge-m3 directory
(with its colbert_linear.pt and sparse_linear.pt: merging needs every tensor) or an m3jax run / step directory; a
LoRA run's adapters are merged into its kernels first. The models must have the same architecture (the same
tensors and shapes).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from m3jax.core import storage
from m3jax.core.errors import M3JaxError
from m3jax.evaluation import selection
from m3jax.io import hf_layout
from m3jax.model import encoder as m3model
from m3jax.model import loading


class MergeError(M3JaxError, ValueError):
    """Models that cannot be merged, or merge weights that are not usable; the message names the model or flag."""


def check_weights(weights: Sequence[float], n: int, *, exact_pair: bool = False) -> list[float]:
    """n non-negative finite weights summing to 1 (within 1e-6). `exact_pair`: the export's (W, 1 - W)."""
    w = [float(x) for x in weights]
    if exact_pair and not 0.0 <= w[0] <= 1.0:
        raise MergeError(f"--merge-weight {w[0]:g}: expected a number in [0, 1] (W * fine-tuned + (1 - W) * "
                         f"--merge-with)")
    if len(w) != n:
        raise MergeError(f"--weights: {len(w)} weights for {n} models")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise MergeError(f"--weights {' '.join(f'{x:g}' for x in w)}: expected non-negative numbers")
    if abs(sum(w) - 1.0) > 1e-6:
        raise MergeError(f"--weights {' '.join(f'{x:g}' for x in w)}: they sum to {sum(w):g}; the weights must sum "
                         f"to 1 (they are not normalised, so that a weight of 1 reproduces a model exactly)")
    return w


def merge_params(trees: Sequence[dict], weights: Sequence[float]) -> dict:
    """sum_i w_i * tree_i, leaf by leaf (float64 sum, one rounding to float32); zero weights are skipped, so a
    weight of 1 with the others 0 returns that tree's values bit for bit. The trees must match in structure and
    shapes (load_for_merge checks that with readable messages)."""
    import jax

    terms = [(float(w), t) for w, t in zip(weights, trees) if float(w) != 0.0]
    if not terms:
        raise MergeError("every merge weight is 0")

    def leaf(*xs):
        if len(xs) == 1 and terms[0][0] == 1.0:
            return np.array(xs[0], dtype=np.float32)
        total = terms[0][0] * np.asarray(xs[0], np.float64)
        for (w, _), x in zip(terms[1:], xs[1:]):
            total = total + w * np.asarray(x, np.float64)
        return total.astype(np.float32)

    return jax.tree.map(leaf, *[t for _, t in terms])


def _shapes(params: dict) -> dict[str, tuple]:
    import jax

    return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def load_for_merge(path, *, step=None, like: tuple[str, m3model.ModelConfig] | None = None):
    """(LoadedModel with LoRA merged, params) of a model to merge; `like` = (its name, the config of the model it
    is merged with): the architecture must match. Raises MergeError naming the model."""
    path = os.fspath(path)
    is_hf = storage.isfile(storage.join(path, hf_layout.CONFIG_NAME))
    if is_hf:
        missing = [n for n in (hf_layout.COLBERT_NAME, hf_layout.SPARSE_NAME)
                   if not storage.isfile(storage.join(path, n))]
        if missing:
            raise MergeError(f"{path}: no {' or '.join(missing)}; merging needs every tensor of both models (a "
                             f"bge-m3 directory has colbert_linear.pt and sparse_linear.pt)")
        loaded = loading.load_model(path)
    else:
        loaded = loading.load_model(path, step=selection.resolve_step(path, step))
    params = m3model.merge_lora(loaded.params, loaded.cfg)
    cfg = dataclasses.replace(loaded.cfg, lora=None)
    if like is not None:
        other_name, other_cfg = like
        ours, theirs = _shapes(params), _shapes(m3model_params_like(other_cfg))
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                raise MergeError(f"{path}: cannot be merged with {other_name}: tensor {key} is "
                                 f"{list(ours[key]) if key in ours else 'missing'} here and "
                                 f"{list(theirs[key]) if key in theirs else 'missing'} there (not the same "
                                 f"architecture)")
    return loading.LoadedModel(cfg, params, loaded.source), params


def m3model_params_like(cfg: m3model.ModelConfig) -> dict:
    """Abstract params (shapes) of a model config."""
    import flax.linen as nn

    return nn.unbox(m3model.abstract_params(cfg)["params"])
