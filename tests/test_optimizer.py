"""The optimizer against what HF Trainer builds for FlagEmbedding: torch AdamW with decay / no-decay groups,
gradient clipping, the warmup + decay schedules, and FlagEmbedding's frozen parameters."""
import jax
import numpy as np
import optax
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from m3jax import config as config_lib
from m3jax.train import optimizer as optim


def _config(**overrides):
    """The optimizer's settings of a run config with these fields changed."""
    c = config_lib.default_config()
    for k, v in overrides.items():
        c[k] = v
    return config_lib.optimizer_settings(c)


def _params(rng):
    return {
        "encoder": {
            "embeddings": {"position_embeddings": {"embedding": rng.standard_normal((6, 4)).astype(np.float32)},
                           "LayerNorm": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}},
            "layers": {"query": {"kernel": rng.standard_normal((2, 4, 4)).astype(np.float32),
                                 "bias": rng.standard_normal((2, 4)).astype(np.float32)}},
        },
        "colbert_linear": {"kernel": rng.standard_normal((4, 3)).astype(np.float32),
                           "bias": rng.standard_normal(3).astype(np.float32)},
        "pooler": {"kernel": rng.standard_normal((4, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)},
    }


@pytest.mark.parametrize("kind, hf_schedule", [("linear", get_linear_schedule_with_warmup),
                                               ("cosine", get_cosine_schedule_with_warmup)])
def test_schedule_matches_hf(kind, hf_schedule):
    config = _config(learning_rate=3e-5, warmup_ratio=0.1, lr_scheduler_type=kind)
    total = 50
    schedule = optim.learning_rate_schedule(config, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
    hf = hf_schedule(opt, num_warmup_steps=5, num_training_steps=total)
    for step in range(total):
        assert abs(float(schedule(step)) - opt.param_groups[0]["lr"]) <= 1e-12 + 1e-6 * 3e-5, step
        opt.step()
        hf.step()


def test_adamw_with_clipping_matches_torch_adamw_in_hf_param_groups():
    """HF Trainer: AdamW(decay group, no-decay group of biases and LayerNorm weights), clip_grad_norm_ first."""
    rng = np.random.default_rng(0)
    params = _params(rng)
    del params["pooler"]  # frozen: tested below
    config = _config(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0, warmup_ratio=0.0)
    tx, _ = optim.make_optimizer(config, params, total_steps=10)
    state = tx.init(params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    torch_params = [torch.nn.Parameter(torch.tensor(v)) for _, v in leaves]
    no_decay = [p for (path, _), p in zip(leaves, torch_params)
                if str(path[-1].key) == "bias" or any("LayerNorm" in str(k.key) for k in path)]
    decay = [p for p in torch_params if all(p is not q for q in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, 0, 10)
    jax_params = params
    for step in range(4):
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32) * 3, params)
        updates, state = tx.update(grads, state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
        for p, (_, g) in zip(torch_params, jax.tree_util.tree_flatten_with_path(grads)[0]):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
        opt.step()
        sched.step()
        for p, (path, v) in zip(torch_params, jax.tree_util.tree_flatten_with_path(jax_params)[0]):
            np.testing.assert_allclose(np.asarray(v), p.detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("flags, frozen", [
    ({}, {"pooler"}),
    ({"fix_position_embedding": True}, {"pooler", "position_embeddings"}),
    ({"fix_encoder": True}, {"pooler", "position_embeddings", "LayerNorm", "query"}),
])
def test_frozen_parameters_get_no_update_and_no_decay(flags, frozen):
    rng = np.random.default_rng(1)
    params = _params(rng)
    config = _config(learning_rate=1e-1, weight_decay=0.5, **flags)
    tx, _ = optim.make_optimizer(config, params, total_steps=5)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: np.ones_like(p), params)
    new = optax.apply_updates(params, tx.update(grads, state, params)[0])
    for path, old in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = {str(k.key) for k in path}
        changed = not np.array_equal(old, np.asarray(_get(new, path)))
        assert changed != bool(names & frozen), jax.tree_util.keystr(path)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_frozen_parameters_are_left_out_of_the_clipping_norm():
    rng = np.random.default_rng(2)
    params = _params(rng)
    tx = optim.mask_and_clip(optim.trainable_labels(params, _config()), max_grad_norm=1.0)
    grads = jax.tree.map(lambda p: np.full_like(p, 0.01), params)
    grads["pooler"]["kernel"] = np.full((4, 4), 1e6, np.float32)  # huge but frozen: must not shrink the others
    clipped, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(clipped["colbert_linear"]["kernel"], 0.01)
    assert np.all(np.asarray(clipped["pooler"]["kernel"]) == 0)
